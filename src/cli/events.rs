//! `publish`, `events` (the history, or read as a durable consumer),
//! `trace`, `types`.

use std::io::{IsTerminal, Write};

use anyhow::bail;
use serde_json::{json, Value};

use riftmesh::api::{self, Client, EventView, FetchResp, TraceNode};

use super::exit::usage;
use super::names::Names;
use super::print_json;
use crate::PublishArgs;

/// `riftmesh publish`: one event, retried with its idempotency key while
/// the agent cannot be reached.
pub async fn publish(client: &Client, json_out: bool, args: PublishArgs) -> anyhow::Result<()> {
    let PublishArgs {
        event_type,
        payload,
        correlation_id,
        parent_id,
        source,
        custom,
        idempotency_key,
        by_content,
        retry_for,
        ..
    } = args;
    let payload: Value = serde_json::from_str(&payload)
        .map_err(|e| usage(format!("--payload is not valid JSON: {e}")))?;
    let key = match (by_content, idempotency_key) {
        (true, _) => None,
        (false, Some(k)) => Some(k),
        (false, None) => Some(riftmesh::event::new_event_id(riftmesh::event::now_ms())),
    };
    // The component goes under its older request name `origin`, which
    // agents released before `source` also take (a rolling upgrade has
    // both); the agent stores and answers the same.
    let body = json!({
        "type": event_type, "payload": payload, "correlation_id": correlation_id,
        "parent_id": parent_id, "origin": source, "custom_type": custom,
        "idempotency_key": key,
    });
    let deadline = std::time::Instant::now() + retry_for;
    let mut pause = std::time::Duration::from_millis(100);
    let mut retried = false;
    // With a key, any failure that may have happened after the agent
    // committed (unreachable, 503, an answer cut short) is retried:
    // the key makes the retry the same fact.
    let answer = loop {
        match client.post("/v1/events", &body).await {
            Err(
                e @ (api::ClientError::Unreachable { .. }
                | api::ClientError::Protocol(_)
                | api::ClientError::Refused { status: 503, .. }),
            ) if key.is_some() && std::time::Instant::now() + pause < deadline => {
                eprintln!("riftmesh: {e}; retrying with the same idempotency key");
                retried = true;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            other => break other?,
        }
    };
    let r: api::PublishResp = api::decode(answer)?;
    if let Some(w) = &r.warning {
        eprintln!("riftmesh: warning: {w}");
    }
    // A retry answered "duplicate by this call's key" confirms this
    // call's own publish.
    let confirmed = retried && r.duplicate && r.duplicate_by.as_deref() == Some("idempotency_key");
    if json_out {
        print_json(&r)?;
    } else if confirmed {
        println!(
            "published {} id {} hash {} (confirmed on retry)",
            r.event_type, r.id, r.hash
        );
    } else if r.duplicate {
        let age = r
            .age_ms
            .map(|ms| {
                format!(
                    ", published {} ago",
                    humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
                )
            })
            .unwrap_or_default();
        let by = match r.duplicate_by.as_deref() {
            Some("idempotency_key") => ", same idempotency key",
            Some("content") => ", same type and payload within the repeat window",
            _ => "",
        };
        println!(
            "duplicate of {} ({}{age}{by}), hash {}",
            r.id, r.event_type, r.hash
        );
    } else {
        println!("published {} id {} hash {}", r.event_type, r.id, r.hash);
    }
    Ok(())
}

/// `riftmesh trace ID`: the chain of linked events as a tree.
pub async fn trace(client: &Client, json_out: bool, id: &str) -> anyhow::Result<()> {
    let v = client.get(&format!("/v1/trace/{id}")).await?;
    if json_out {
        return print_json(&v);
    }
    let nodes: Vec<TraceNode> = api::decode(v["events"].clone())?;
    println!(
        "correlation {}",
        v["correlation_id"].as_str().unwrap_or("?")
    );
    for n in nodes {
        let mark = if n.event.id == id { "  <=" } else { "" };
        println!(
            "{}{} {} {} {}{}",
            "  ".repeat(n.depth),
            if n.depth > 0 { "└─" } else { "●" },
            n.event.event_type,
            n.event.id,
            n.event.payload,
            mark
        );
    }
    Ok(())
}

/// `riftmesh types`: the catalog, from the agent or the one compiled in.
pub async fn types(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/types").await.or_else(|_| -> anyhow::Result<Value> {
        // The catalog is compiled in: answer without an agent too.
        Ok(json!({ "types": riftmesh::event::CATALOG.iter().map(|t| json!({"name": t.name, "category": t.category, "aliases": t.aliases, "description": t.description})).collect::<Vec<_>>() }))
    })?;
    if json_out {
        return print_json(&v);
    }
    for t in v["types"].as_array().cloned().unwrap_or_default() {
        let aliases: Vec<&str> = t["aliases"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<28} {:<20} {}{}",
            t["name"].as_str().unwrap_or(""),
            t["category"].as_str().unwrap_or(""),
            t["description"].as_str().unwrap_or(""),
            if aliases.is_empty() {
                String::new()
            } else {
                format!("  (also {})", aliases.join(", "))
            }
        );
    }
    Ok(())
}

/// The columns of an `events` line, for the header.
fn header() -> String {
    format!(
        "{:>8}  {:<24}  {:<24} {:<36}  {:<22}  SOURCE / PAYLOAD",
        "SEQ", "TIME", "TYPE", "ID", "NODE"
    )
}

fn event_line(e: &EventView, names: &Names) -> String {
    format!(
        "{:>8}  {}  {:<24} {}  {:<22}  {}{}",
        e.seq,
        e.time,
        e.event_type,
        e.id,
        names.label(&e.node),
        if e.source.is_empty() {
            String::new()
        } else {
            format!("source={}  ", e.source)
        },
        e.payload
    )
}

/// How `events` prints: JSON lines, or text lines with the nodes' names
/// and, on a terminal only, a header line first (a header on a pipe would
/// be counted by `| wc -l` and read as an event by `| while read`).
struct Printer {
    json_out: bool,
    header: bool,
    names: Names,
    names_at: Option<std::time::Instant>,
}

impl Printer {
    fn new(json_out: bool) -> Self {
        Printer {
            json_out,
            header: !json_out && std::io::stdout().is_terminal(),
            names: Names::default(),
            names_at: None,
        }
    }

    /// Write the header (once, on a terminal) before any event.
    fn start(&mut self) -> anyhow::Result<()> {
        if std::mem::take(&mut self.header) {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", header())?;
            out.flush()?;
        }
        Ok(())
    }

    /// Write `events`; in text, with the names of their nodes (asked of
    /// the agent at the first line and again, at most every 10 s, when a
    /// node it did not name shows up).
    async fn emit(&mut self, client: &Client, events: &[EventView]) -> anyhow::Result<()> {
        self.start()?;
        if !self.json_out
            && events.iter().any(|e| self.names.name(&e.node).is_none())
            && self
                .names_at
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10))
        {
            self.names = Names::fetch(client).await;
            self.names_at = Some(std::time::Instant::now());
        }
        let mut out = std::io::stdout().lock();
        for e in events {
            if self.json_out {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                writeln!(out, "{}", event_line(e, &self.names))?;
            }
        }
        out.flush()?;
        Ok(())
    }
}

/// Run `call` again while the agent is unreachable (restarting), saying so
/// once; used by `--follow`, which rides out a restart.
async fn riding<T, F, Fut>(follow: bool, mut call: F) -> Result<T, api::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, api::ClientError>>,
{
    let mut said = false;
    loop {
        match call().await {
            Err(e @ api::ClientError::Unreachable { .. }) if follow => {
                if !said {
                    eprintln!("riftmesh: {e}; waiting for the agent to come back");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Ok(v) => {
                if said {
                    eprintln!("riftmesh: the agent answers again; following on");
                }
                return Ok(v);
            }
            Err(e) => return Err(e),
        }
    }
}

pub async fn history(
    client: &Client,
    json_out: bool,
    types: Vec<String>,
    follow: bool,
    from_start: bool,
    since: Option<String>,
    max: usize,
) -> anyhow::Result<()> {
    let mut printer = Printer::new(json_out);
    printer.start()?;
    let mut q: Vec<(&str, String)> = vec![("limit", max.to_string())];
    if !types.is_empty() {
        q.push(("types", types.join(",")));
    }
    let mut after: Option<u64> = None;
    if let Some(s) = since {
        q.push(("since", s));
    } else if !from_start {
        // Without a start: the newest `max` matching events, oldest first,
        // paging back through at most a few scans of the log.
        let mut newest: Vec<EventView> = Vec::new();
        let mut before: Option<u64> = None;
        let head = loop {
            let mut query = q.clone();
            query.push(("order", "desc".into()));
            if let Some(b) = before {
                query.push(("before", b.to_string()));
            }
            let v = riding(follow, || client.get_query("/v1/events", &query)).await?;
            let page: Vec<EventView> = api::decode(v["events"].clone())?;
            newest.extend(page);
            let head = v["head"].as_u64().unwrap_or(0);
            before = v["next_before"].as_u64();
            if newest.len() >= max || v["done"].as_bool() != Some(false) {
                break head;
            }
        };
        newest.truncate(max);
        newest.reverse();
        printer.emit(client, &newest).await?;
        if !follow {
            return Ok(());
        }
        after = Some(head);
    }
    loop {
        let mut query = q.clone();
        if let Some(a) = after {
            query.retain(|(k, _)| *k != "since");
            query.push(("after", a.to_string()));
        }
        let v = riding(follow, || client.get_query("/v1/events", &query)).await?;
        let events: Vec<EventView> = api::decode(v["events"].clone())?;
        printer.emit(client, &events).await?;
        let next = v["next_after"].as_u64().unwrap_or(0);
        let head = v["head"].as_u64().unwrap_or(0);
        after = Some(next.max(after.unwrap_or(0)));
        if next >= head {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// Where a consumer created by `events --consumer` starts.
pub struct Start {
    pub from_start: bool,
    pub since: Option<String>,
}

/// Read as a durable consumer. An existing consumer is looked at, never
/// changed, unless `update` (then its type filter becomes `types`).
#[allow(clippy::too_many_arguments)]
pub async fn consume(
    client: &Client,
    json_out: bool,
    name: &str,
    types: Vec<String>,
    update: bool,
    follow: bool,
    start: Start,
    max: usize,
) -> anyhow::Result<()> {
    let path = format!("/v1/consumers/{name}");
    let existing = match client.get(&path).await {
        Ok(v) => Some(api::decode::<api::ConsumerView>(v)?),
        Err(api::ClientError::Refused { status: 404, .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let mut body = json!({});
    if start.from_start {
        body["from_start"] = json!(true);
    }
    if let Some(s) = &start.since {
        body["since"] = json!(s);
    }
    match &existing {
        None => {
            if !types.is_empty() {
                body["types"] = json!(types);
            }
            client.put(&path, &body).await?;
        }
        Some(c) => {
            if update {
                body["types"] = json!(types);
                client.put(&path, &body).await?;
            } else {
                if !types.is_empty() {
                    let want: Vec<String> = types
                        .iter()
                        .map(|t| {
                            riftmesh::event::TypePattern::parse(t)
                                .map(|p| p.as_str().to_string())
                                .unwrap_or_else(|_| t.clone())
                        })
                        .collect();
                    let (mut a, mut b) = (want.clone(), c.types.clone());
                    a.sort();
                    b.sort();
                    if a != b {
                        bail!(
                            "consumer {name} reads types [{}], not [{}]; pass --update to change its filter",
                            c.types.join(", "),
                            want.join(", ")
                        );
                    }
                }
                if start.from_start || start.since.is_some() {
                    // Moving an existing consumer's cursor is a change too.
                    client.put(&path, &body).await?;
                }
            }
        }
    }
    let wait = if follow { 25_000 } else { 0 };
    let mut printer = Printer::new(json_out);
    printer.start()?;
    let (events_path, ack_path) = (
        format!("/v1/consumers/{name}/events"),
        format!("/v1/consumers/{name}/ack"),
    );
    loop {
        let query = [("max", max.to_string()), ("wait_ms", wait.to_string())];
        let v = riding(follow, || client.get_query(&events_path, &query)).await?;
        let r: FetchResp = api::decode(v)?;
        if r.missed > 0 {
            eprintln!("riftmesh: consumer {name} missed {} event(s) removed by retention before they were acknowledged", r.missed);
        }
        printer.emit(client, &r.events).await?;
        // Acknowledge only after the batch is written out.
        if let Some(last) = r.events.last() {
            let ack = json!({ "seq": last.seq });
            riding(follow, || client.post(&ack_path, &ack)).await?;
        }
        if r.events.is_empty() && !follow {
            return Ok(());
        }
    }
}
