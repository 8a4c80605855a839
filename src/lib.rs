//! riftmesh: a peer-to-peer cluster agent for GPU training fleets.
//! See ARCHITECTURE.md (the map of the code) and proto-notes/ (the wire).

pub mod agent;
pub mod api;
pub mod blob;
pub mod bufpool;
pub mod catchup;
pub mod codec;
pub mod config;
pub mod durable;
pub mod event;
pub mod keys;
pub mod leader;
pub mod limits;
pub mod logging;
pub mod membership;
pub mod metrics;
pub use net::mux;
pub mod net;
pub mod node;
pub use net::privnet;
pub mod publisher;
pub mod store;
pub mod tasks;
pub mod util;
