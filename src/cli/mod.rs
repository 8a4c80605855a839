//! The commands of the `riftmesh` binary, one file per group; main.rs
//! parses the command line and dispatches here.

pub mod blobs;
pub mod cluster;
pub mod config;
pub mod consumers;
pub mod events;
pub mod exit;
pub mod lockrun;
pub mod locks;
pub mod names;
pub mod progress;
pub mod token;
pub mod wait;

use std::io::Write;

/// Write to standard output; a reader that stopped early (`| head`) is not an error.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
