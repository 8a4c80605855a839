//! The API token a client command sends (proto-notes/security.md): the
//! file named by `--api-token-file` / `RIFTMESH_API_TOKEN_FILE`, else the
//! local agent's own `<data-dir>/api.token`, but only to that agent.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use riftmesh::config::DEFAULT_DATA_DIR;
use riftmesh::keys::{parse_api_token, API_TOKEN_FILE};

use super::exit::usage;

/// The token to send to the agent at `api`, if any. A named file must be
/// readable and hold a token (exit 2 otherwise); the data directory's
/// `api.token` is used only when its `agent.json` shows that agent
/// listening where `api` points, so the token never goes to another host.
pub fn client_token(
    api: &str,
    file: Option<&Path>,
    data_dir: Option<&Path>,
) -> anyhow::Result<Option<String>> {
    if let Some(p) = file {
        let text = std::fs::read_to_string(p).map_err(|e| {
            usage(format!(
                "cannot read the API token file {}: {e} (from --api-token-file or \
                 RIFTMESH_API_TOKEN_FILE)",
                p.display()
            ))
        })?;
        let t = parse_api_token(&text)
            .map_err(|e| usage(format!("the API token file {}: {e}", p.display())))?;
        return Ok(Some(t.to_string()));
    }
    let dir = data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR));
    Ok(local_agent_token(dir, api))
}

/// `<dir>/api.token` if the agent whose `agent.json` is in `dir` listens
/// at `api`, and the file is readable and holds a token.
fn local_agent_token(dir: &Path, api: &str) -> Option<String> {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("agent.json")).ok()?).ok()?;
    let bound: SocketAddr = info["api"].as_str()?.parse().ok()?;
    if !reaches(api, bound) {
        return None;
    }
    let text = std::fs::read_to_string(dir.join(API_TOKEN_FILE)).ok()?;
    parse_api_token(&text).ok().map(String::from)
}

/// Whether `api` (`host:port` or an `http://` URL, as given) names the
/// listener bound at `bound`: the same port, and the same address, or a
/// loopback name when the listener is bound to every address.
fn reaches(api: &str, bound: SocketAddr) -> bool {
    let rest = api
        .strip_prefix("http://")
        .or_else(|| api.strip_prefix("https://"))
        .unwrap_or(api);
    let hostport = rest.split('/').next().unwrap_or("");
    let (host, port) = match hostport.strip_prefix('[') {
        Some(r) => match r.split_once("]:") {
            Some(hp) => hp,
            None => return false,
        },
        None => match hostport.rsplit_once(':') {
            Some(hp) => hp,
            None => return false,
        },
    };
    if port.parse::<u16>().ok() != Some(bound.port()) {
        return false;
    }
    let any = bound.ip().is_unspecified();
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == bound.ip() || (any && ip.is_loopback()),
        Err(_) => host.eq_ignore_ascii_case("localhost") && (any || bound.ip().is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::reaches;

    #[test]
    fn the_data_dir_token_goes_only_to_its_own_agent() {
        let lo: std::net::SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:7411".parse().unwrap();
        let at: std::net::SocketAddr = "10.0.0.5:7411".parse().unwrap();
        let any6: std::net::SocketAddr = "[::]:7411".parse().unwrap();
        for (api, bound) in [
            ("127.0.0.1:7411", lo),
            ("http://localhost:7411/", lo),
            ("127.0.0.1:7411", any),
            ("localhost:7411", any),
            ("10.0.0.5:7411", at),
            ("http://10.0.0.5:7411", at),
            ("[::1]:7411", any6),
        ] {
            assert!(reaches(api, bound), "{api} {bound}");
        }
        for (api, bound) in [
            ("127.0.0.1:7412", lo),
            ("10.0.0.6:7411", at),
            ("10.0.0.6:7411", any),
            ("127.0.0.1:7411", at),
            ("localhost:7411", at),
            ("gpu-07:7411", any),
            ("127.0.0.1", lo),
            ("[::1", any6),
        ] {
            assert!(!reaches(api, bound), "{api} {bound}");
        }
    }
}
