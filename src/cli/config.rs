//! Commands that need no agent: `keygen`, `config check`, `man`, `completion`.

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;
use serde_json::json;

use riftmesh::config::{AgentArgs, AgentConfig};

use super::exit::{self, usage, Classed};
use super::{print_json, write_stdout};
use crate::Cli;

/// `riftmesh keygen`: a new swarm key on standard output or into a file.
///
/// With `--json`: a JSON object saying what was written (path, key
/// fingerprint), never the key itself; so `--json` needs `--out`.
pub fn keygen(out: Option<PathBuf>, force: bool, json_out: bool) -> anyhow::Result<()> {
    let psk = riftmesh::net::generate_psk();
    let text = psk.to_string();
    match out {
        None if json_out => {
            return Err(usage(
                "keygen --json prints what was written, never the key: pass --out FILE \
                 (or leave out --json to print the key)",
            ))
        }
        None => print!("{text}"),
        Some(path) => {
            if path.exists() && !force {
                return Err(Classed {
                    code: exit::CONFLICT,
                    msg: format!("{} exists; pass --force to overwrite it", path.display()),
                }
                .into());
            }
            let replaced = path.exists();
            riftmesh::node::write_private(&path, text.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            if json_out {
                return print_json(&json!({
                    "path": path.display().to_string(),
                    "written": true,
                    "replaced": replaced,
                    "kind": "swarm_key",
                    "fingerprint": psk.fingerprint().to_string(),
                }));
            }
            eprintln!(
                "wrote swarm key to {} (copy it to every host)",
                path.display()
            );
        }
    }
    Ok(())
}

/// `riftmesh man`: the page on standard output, or every command's page in a directory.
pub fn man(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match out_dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            write_stdout(&page)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
        }
    }
    Ok(())
}

/// `riftmesh completion SHELL`: the completion script on standard output.
pub fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "riftmesh", &mut script);
    write_stdout(&script)
}

/// `riftmesh config check [FILE]`: what `agent` would resolve, validated,
/// without binding a port or opening the store.
pub fn check(
    file: Option<PathBuf>,
    args: &AgentArgs,
    matches: Option<&clap::ArgMatches>,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut args = args.clone();
    if file.is_some() {
        args.config = file;
    }
    let cfg = AgentConfig::resolve(&args, matches)?;
    // The swarm key must exist and parse if one is named; without one the
    // agent makes <data-dir>/swarm.key at its first start.
    let key = match &cfg.swarm_key {
        Some(p) => {
            let psk = riftmesh::node::load_swarm_key(&cfg).map_err(|e| usage(e.to_string()))?;
            format!("{} (fingerprint {})", p.display(), psk.fingerprint())
        }
        None => {
            let p = cfg.data_dir.join("swarm.key");
            if p.exists() {
                let psk = riftmesh::node::load_swarm_key(&cfg).map_err(|e| usage(e.to_string()))?;
                format!("{} (fingerprint {})", p.display(), psk.fingerprint())
            } else {
                format!(
                    "{} (made at the first start: copy it to every host)",
                    p.display()
                )
            }
        }
    };
    // The API token file: a named one must be usable now; the default
    // one is made at the first start.
    let token = match riftmesh::keys::api_token_path(&cfg) {
        None => "none (the API is on loopback)".to_string(),
        Some(p) if cfg.api_token_file.is_some() || p.exists() => {
            riftmesh::keys::read_api_token_file(&p).map_err(|e| usage(e.to_string()))?;
            p.display().to_string()
        }
        Some(p) => format!("{} (made at the first start)", p.display()),
    };
    riftmesh::api::check_fault_injection(
        cfg.api,
        cfg.fault_injection,
        riftmesh::keys::api_token_needed(&cfg),
    )
    .map_err(usage)?;
    let mut warnings = Vec::new();
    if cfg.bootstrap.is_empty() {
        warnings.push(if cfg.mdns {
            "no bootstrap: this host finds peers only by mDNS on its local network (set bootstrap = [\"/ip4/<peer>/tcp/4001\"])".to_string()
        } else {
            "no bootstrap and mDNS off: this host will form a cluster of one until a peer dials it (set bootstrap = [\"/ip4/<peer>/tcp/4001\"])".to_string()
        });
    }
    if !cfg.api.ip().is_loopback() {
        warnings.push(format!(
            "the local API listens on {} (not loopback): clients need its token (riftmesh \
             --api-token-file, or RIFTMESH_API_TOKEN_FILE)",
            cfg.api
        ));
    }
    if json_out {
        return print_json(&json!({
            "valid": true,
            "config": args.config.as_ref().map(|p| p.display().to_string()),
            "name": cfg.name,
            "data_dir": cfg.data_dir.display().to_string(),
            "listen": cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "bootstrap": cfg.bootstrap.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "api": cfg.api.to_string(),
            "metrics": cfg.metrics.to_string(),
            "mdns": cfg.mdns,
            "voters": cfg.voters,
            "swarm_key": key,
            "api_token_file": token,
            "warnings": warnings,
        }));
    }
    println!(
        "{}: valid",
        args.config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration (no file)".into())
    );
    println!("name       {}", cfg.name);
    println!("data dir   {}", cfg.data_dir.display());
    println!(
        "listen     {}",
        cfg.listen
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "bootstrap  {}",
        if cfg.bootstrap.is_empty() {
            "none".to_string()
        } else {
            cfg.bootstrap
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("mdns       {}", if cfg.mdns { "on" } else { "off" });
    println!("api        {}   metrics {}", cfg.api, cfg.metrics);
    println!(
        "voters     {}",
        if cfg.voters.is_empty() {
            "none (no leader in this cluster)".to_string()
        } else if cfg.voters.contains(&cfg.name) {
            format!("{} (this host votes)", cfg.voters.join(", "))
        } else {
            cfg.voters.join(", ")
        }
    );
    println!("swarm key  {key}");
    println!("api token  {token}");
    for w in warnings {
        println!("warning    {w}");
    }
    Ok(())
}
