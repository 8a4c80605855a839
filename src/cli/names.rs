//! Host names beside peer ids: the CLI reads the members view once and
//! prints `gpu-07 (…3kq9xw2a)` where it would print a bare peer id.

use std::collections::HashMap;

use riftmesh::api::Client;

/// The last eight characters of a peer id after an ellipsis: enough to
/// tell hosts apart on screen, short enough for a column.
pub fn short_id(id: &str) -> String {
    let n = id.chars().count();
    if n <= 8 {
        return id.to_string();
    }
    let tail: String = id.chars().skip(n - 8).collect();
    format!("…{tail}")
}

/// Peer id -> host name, as the local agent's members view has them.
#[derive(Default)]
pub struct Names {
    by_id: HashMap<String, String>,
}

impl Names {
    /// The names the agent knows now; none if it cannot say (the caller
    /// then prints ids alone rather than failing).
    pub async fn fetch(client: &Client) -> Names {
        let Ok(v) = client.get("/v1/members").await else {
            return Names::default();
        };
        Names::from_members(&v)
    }

    pub fn from_members(v: &serde_json::Value) -> Names {
        let by_id = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                Some((
                    m["peer_id"].as_str()?.to_string(),
                    m["name"].as_str()?.to_string(),
                ))
            })
            .collect();
        Names { by_id }
    }

    pub fn name(&self, peer_id: &str) -> Option<&str> {
        self.by_id.get(peer_id).map(String::as_str)
    }

    /// The peer id of the member called `name`, if exactly one has it.
    pub fn id_of(&self, name: &str) -> Option<&str> {
        let mut ids = self
            .by_id
            .iter()
            .filter(|(_, n)| n.as_str() == name)
            .map(|(id, _)| id.as_str());
        match (ids.next(), ids.next()) {
            (Some(id), None) => Some(id),
            _ => None,
        }
    }

    /// `gpu-07 (…3kq9xw2a)`, or `…3kq9xw2a` for a peer whose name is unknown.
    pub fn label(&self, peer_id: &str) -> String {
        match self.name(peer_id) {
            Some(n) => format!("{n} ({})", short_id(peer_id)),
            None => short_id(peer_id),
        }
    }

    /// The name, or the short id for a peer whose name is unknown.
    pub fn name_or_short(&self, peer_id: &str) -> String {
        self.name(peer_id)
            .map(String::from)
            .unwrap_or_else(|| short_id(peer_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_put_the_name_beside_the_tail_of_the_id() {
        let v = serde_json::json!({ "members": [
            { "peer_id": "12D3KooWAbcdefghijklmnop", "name": "gpu-07" },
            { "peer_id": "12D3KooWZyxwvutsrqpo", "name": null },
        ]});
        let n = Names::from_members(&v);
        assert_eq!(n.label("12D3KooWAbcdefghijklmnop"), "gpu-07 (…ijklmnop)");
        assert_eq!(n.label("12D3KooWZyxwvutsrqpo"), "…vutsrqpo");
        assert_eq!(n.label("short"), "short");
        assert_eq!(n.id_of("gpu-07"), Some("12D3KooWAbcdefghijklmnop"));
        assert_eq!(n.id_of("gpu-08"), None);
    }
}
