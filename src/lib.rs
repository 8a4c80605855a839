//! riftmesh: a peer-to-peer cluster agent for GPU training fleets.
//! See ARCHITECTURE (shared) and proto-notes/ for the shape and the wire.

pub mod agent;
pub mod api;
pub mod blob;
pub mod bufpool;
pub mod catchup;
pub mod codec;
pub mod config;
pub mod durable;
pub mod event;
pub mod leader;
pub mod limits;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod mux;
pub mod net;
pub mod node;
pub mod privnet;
pub mod store;
pub mod util;
