//! The agent's log: the default filter, the format, and a rate limit on
//! repeated lines, so that a fault that lasts (a voter down, a partition, a
//! flapping peer) writes a few lines a minute instead of one per retry.
//!
//! Every line that passes the level filter is counted against a *cause*:
//!
//! - a line with a `peer` or `node` field: that peer (every message about
//!   it together), at most [`PER_PEER`] lines per window;
//! - otherwise a line of riftmesh's own: its call site, at most
//!   [`PER_CAUSE`] lines per window;
//! - otherwise a line of a dependency: its target (a module such as
//!   `openraft::engine::handler::replication_handler`, whose heartbeat and
//!   progress errors are one cause), at most [`PER_CAUSE`] per window.
//!
//! The budget holds for any [`WINDOW`]-long span (a sliding window: a line
//! passes if fewer than the budget passed in the window before it). Lines
//! beyond the budget are dropped and counted; a window after the first
//! dropped line, one line at the same level reports how many were dropped
//! and quotes the first of them (target `riftmesh::log`), so a cause that
//! lasts writes at most its budget and one count a window.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, JsonFields};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset (or empty).
pub const DEFAULT_FILTER: &str = "info,libp2p_gossipsub=warn,libp2p_mdns=warn,libp2p_kad=error,openraft=warn,openraft::core=off,openraft::replication=off";

/// Length of a cause's window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Lines per window of one call site (riftmesh) or one target (dependencies).
/// 2, not 3: with a voter down, the leader's first minute held 3 lines of
/// its own about the peer, 3 + 3 of openraft's at the two ends of a span a
/// little over 60 s and the count: 10, the testnet's bound exactly
/// (`testnet quiet`, voter-down, measured in CI's round).
pub const PER_CAUSE: u32 = 2;
/// Lines per window about one peer, all messages together: a peer that
/// goes away writes about five (disconnected, suspect, dead, and the two
/// membership facts), so a single failure is logged whole.
pub const PER_PEER: u32 = 8;
/// Target of the lines that report dropped repeats.
pub const SUMMARY_TARGET: &str = "riftmesh::log";

/// Set up the global subscriber: `RUST_LOG` or [`DEFAULT_FILTER`], text or
/// JSON on stderr (ANSI colours only when stderr is a terminal and
/// `NO_COLOR` is unset), through the rate limit.
pub fn init(format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => {
            EnvFilter::try_new(&s).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let limit = RateLimit::new(WINDOW, PER_CAUSE, PER_PEER);
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let layer = match format {
        LogFormat::Json => fmt
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_filter(filter.and(limit.clone()))
            .boxed(),
        LogFormat::Text => fmt.with_filter(filter.and(limit.clone())).boxed(),
    };
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        limit.spawn_flusher();
    }
}

/// The JSON log format: one object a line, every field at the top level
/// beside `timestamp`, `level`, `target` and `message` (and the fields of
/// the spans the line is in, with `spans`: their names, outermost first),
/// so `jq .peer` or a log shipper's field extraction finds it without
/// knowing a nesting. A field logged as a list (`listen = ?addrs` with a
/// `Vec<String>`, `chunks = ?bad`) is a JSON array: a `Debug` value that
/// reads as a JSON array is written as one, any other as its text.
///
/// (tracing's `valuable` support would carry lists typed, but it needs
/// `--cfg tracing_unstable` for every build of the crate and of its users;
/// this format needs nothing.)
pub struct FlatJson;

/// Field names the line's own keys take; an event field of the same name
/// is written as `field.<name>`.
const RESERVED: [&str; 5] = ["timestamp", "level", "target", "message", "spans"];

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = JsonVisit::default();
        event.record(&mut fields);
        // The line's own keys first, then the event's fields in the order
        // logged, then its spans' fields.
        let mut line: Vec<(String, serde_json::Value)> = vec![
            (
                "timestamp".into(),
                humantime::format_rfc3339_micros(std::time::SystemTime::now())
                    .to_string()
                    .into(),
            ),
            ("level".into(), meta.level().as_str().into()),
            ("target".into(), meta.target().into()),
            (
                "message".into(),
                fields.message.take().unwrap_or_default().into(),
            ),
        ];
        for (k, v) in fields.fields {
            let k = if RESERVED.contains(&k) {
                format!("field.{k}")
            } else {
                k.to_string()
            };
            line.push((k, v));
        }
        if let Some(scope) = ctx.event_scope() {
            let mut names = Vec::new();
            for span in scope.from_root() {
                names.push(serde_json::Value::from(span.name()));
                let ext = span.extensions();
                let Some(f) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(serde_json::Value::Object(o)) =
                    serde_json::from_str::<serde_json::Value>(f.as_str())
                {
                    for (k, v) in o {
                        if !RESERVED.contains(&k.as_str()) && !line.iter().any(|(l, _)| *l == k) {
                            line.push((k, v));
                        }
                    }
                }
            }
            if !names.is_empty() {
                line.push(("spans".into(), names.into()));
            }
        }
        let mut out = String::from("{");
        for (i, (k, v)) in line.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(k).map_err(|_| std::fmt::Error)?);
            out.push(':');
            out.push_str(&serde_json::to_string(v).map_err(|_| std::fmt::Error)?);
        }
        out.push('}');
        writeln!(writer, "{out}")
    }
}

/// An event's fields as JSON values, in the order logged.
#[derive(Default)]
struct JsonVisit {
    message: Option<String>,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl JsonVisit {
    fn put(&mut self, field: &Field, v: serde_json::Value) {
        if field.name() == "message" {
            self.message = Some(match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.push((field.name(), v));
        }
    }
}

impl Visit for JsonVisit {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.put(field, list_or_text(text));
    }
}

/// A `Debug` rendering that is a JSON array (a `Vec<String>`, a list of
/// numbers) as that array; anything else as its text.
fn list_or_text(text: String) -> serde_json::Value {
    if text.starts_with('[') {
        if let Ok(v @ serde_json::Value::Array(_)) = serde_json::from_str(&text) {
            return v;
        }
    }
    text.into()
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Peer(String),
    Callsite(tracing::callsite::Identifier),
    Target(&'static str),
}

struct Entry {
    /// When the lines that passed in the last window passed.
    passed: VecDeque<Instant>,
    /// Lines dropped since `since`, not yet reported.
    suppressed: u64,
    since: Option<Instant>,
    level: Level,
    target: &'static str,
    /// The first dropped line since `since`.
    example: String,
}

/// A report of dropped lines, ready to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub level: Level,
    pub target: &'static str,
    pub count: u64,
    pub example: String,
}

#[derive(Default)]
struct State {
    causes: HashMap<Key, Entry>,
}

/// The rate limit, as a per-layer filter (combined after the level filter,
/// so only lines that would be written count).
#[derive(Clone)]
pub struct RateLimit {
    state: Arc<Mutex<State>>,
    window: Duration,
    per_cause: u32,
    per_peer: u32,
}

#[derive(Default)]
struct Fields {
    peer: Option<String>,
    message: Option<String>,
    want_message: bool,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "peer" | "node" if self.peer.is_none() => self.peer = Some(value.to_string()),
            "message" if self.want_message => self.message = Some(value.to_string()),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "peer" | "node" if self.peer.is_none() => self.peer = Some(format!("{value:?}")),
            "message" if self.want_message => {
                let mut s = String::new();
                let _ = write!(s, "{value:?}");
                self.message = Some(s);
            }
            _ => {}
        }
    }
}

impl RateLimit {
    pub fn new(window: Duration, per_cause: u32, per_peer: u32) -> Self {
        RateLimit {
            state: Arc::new(Mutex::new(State::default())),
            window,
            per_cause,
            per_peer,
        }
    }

    /// Whether a line passes; counts it either way.
    pub fn admit(&self, event: &Event<'_>, now: Instant) -> bool {
        let meta = event.metadata();
        if meta.target() == SUMMARY_TARGET {
            return true;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let (key, budget) = match f.peer {
            Some(p) => (Key::Peer(p), self.per_peer),
            None if meta.target().starts_with("riftmesh") => {
                (Key::Callsite(meta.callsite()), self.per_cause)
            }
            None => (Key::Target(meta.target()), self.per_cause),
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let e = st.causes.entry(key).or_insert_with(|| Entry {
            passed: VecDeque::new(),
            suppressed: 0,
            since: None,
            level: *meta.level(),
            target: meta.target(),
            example: String::new(),
        });
        while e
            .passed
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            e.passed.pop_front();
        }
        if e.passed.len() < budget as usize {
            e.passed.push_back(now);
            return true;
        }
        if e.suppressed == 0 {
            e.since = Some(now);
            let mut m = Fields {
                want_message: true,
                ..Default::default()
            };
            event.record(&mut m);
            e.example = m.message.unwrap_or_default();
            e.level = *meta.level();
            e.target = meta.target();
        }
        e.suppressed += 1;
        false
    }

    /// Reports of the causes whose first unreported dropped line is a
    /// window old; forgets causes quiet for a whole window.
    pub fn take_ended(&self, now: Instant) -> Vec<Dropped> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let window = self.window;
        st.causes.retain(|_, e| {
            if e.since
                .is_some_and(|since| now.duration_since(since) >= window)
            {
                out.push(Dropped {
                    level: e.level,
                    target: e.target,
                    count: e.suppressed,
                    example: std::mem::take(&mut e.example),
                });
                e.suppressed = 0;
                e.since = None;
            }
            e.since.is_some()
                || e.passed
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < window)
        });
        out
    }

    /// Log the reports of dropped lines, once a second.
    fn spawn_flusher(&self) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("log-rate-limit".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                for d in me.take_ended(Instant::now()) {
                    report(&d, me.window);
                }
            });
    }
}

/// One line for a report of dropped lines, at the level of the lines dropped.
pub fn report(d: &Dropped, window: Duration) {
    let secs = window.as_secs();
    macro_rules! at {
        ($lvl:expr) => {
            tracing::event!(
                target: SUMMARY_TARGET,
                $lvl,
                repeated = d.count,
                from = d.target,
                first = %d.example,
                "{} more lines like this in {secs}s not written (rate limit)",
                d.count
            )
        };
    }
    match d.level {
        Level::ERROR => at!(Level::ERROR),
        Level::WARN => at!(Level::WARN),
        Level::INFO => at!(Level::INFO),
        Level::DEBUG => at!(Level::DEBUG),
        _ => at!(Level::TRACE),
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }
    /// No level is filtered here. Without a hint the layer's combined hint
    /// (`filter.and(limit)`) is none, the global maximum level becomes TRACE,
    /// and every `log::trace!` of a dependency (sled writes several per
    /// commit) is built and dispatched only to be refused by the filter:
    /// 1 % of an API publish's CPU in a profile.
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        self.admit(event, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A filter that records what `admit` said, at a time the test sets.
    struct Probe {
        limit: RateLimit,
        now: Arc<Mutex<Instant>>,
        passed: Arc<AtomicUsize>,
        dropped: Arc<AtomicUsize>,
    }

    impl<S: tracing::Subscriber> Layer<S> for Probe {
        fn on_event(&self, event: &Event<'_>, _cx: Context<'_, S>) {
            let now = *self.now.lock().unwrap();
            if self.limit.admit(event, now) {
                self.passed.fetch_add(1, Ordering::SeqCst);
            } else {
                self.dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn a_repeated_line_is_written_a_few_times_per_window_and_the_rest_counted() {
        let limit = RateLimit::new(Duration::from_secs(60), 3, 8);
        let t0 = Instant::now();
        let now = Arc::new(Mutex::new(t0));
        let passed = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let sub = tracing_subscriber::registry().with(Probe {
            limit: limit.clone(),
            now: now.clone(),
            passed: passed.clone(),
            dropped: dropped.clone(),
        });
        tracing::subscriber::with_default(sub, || {
            // A dependency's flood from two call sites of one module: one cause.
            for i in 0..1100 {
                tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error: timeout {i}");
                tracing::warn!(target: "openraft::engine::handler::replication_handler", "update progress error {i}");
            }
            assert_eq!(passed.load(Ordering::SeqCst), 3);
            assert_eq!(dropped.load(Ordering::SeqCst), 2197);
            // Lines about one peer share its budget; another peer has its own.
            for _ in 0..20 {
                tracing::info!(peer = "p1", "peer connected");
                tracing::info!(peer = "p1", "peer disconnected");
                tracing::info!(peer = "p2", "peer connected");
            }
            assert_eq!(passed.load(Ordering::SeqCst), 3 + 8 + 8);
            // riftmesh's own call sites are separate causes.
            tracing::warn!(target: "riftmesh::x", "one");
            tracing::warn!(target: "riftmesh::x", "two");
            assert_eq!(passed.load(Ordering::SeqCst), 3 + 8 + 8 + 2);
            // Nothing is reported before the window ends...
            assert!(limit.take_ended(t0 + Duration::from_secs(59)).is_empty());
            // ... then one report per cause that dropped lines, quoting the first dropped.
            let mut ended = limit.take_ended(t0 + Duration::from_secs(60));
            ended.sort_by_key(|d| d.count);
            assert_eq!(ended.len(), 3, "{ended:?}");
            assert_eq!(ended[2].count, 2197);
            assert_eq!(ended[2].level, Level::WARN);
            assert_eq!(ended[2].example, "update progress error 1");
            assert_eq!(ended[0].count, 20 - 8); // p2
            assert_eq!(ended[1].count, 40 - 8); // p1
                                                // A new window: the cause writes again.
            *now.lock().unwrap() = t0 + Duration::from_secs(61);
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error");
            assert_eq!(passed.load(Ordering::SeqCst), 3 + 8 + 8 + 2 + 1);
        });
    }

    #[test]
    fn no_sixty_second_span_holds_more_than_the_budget() {
        // Fixed windows let twice the budget through around a window's
        // end; the sliding window does not.
        let limit = RateLimit::new(Duration::from_secs(60), 3, 8);
        let t0 = Instant::now();
        let now = Arc::new(Mutex::new(t0));
        let passed_at = Arc::new(Mutex::new(Vec::new()));
        struct Times {
            limit: RateLimit,
            now: Arc<Mutex<Instant>>,
            passed_at: Arc<Mutex<Vec<Instant>>>,
        }
        impl<S: tracing::Subscriber> Layer<S> for Times {
            fn on_event(&self, event: &Event<'_>, _cx: Context<'_, S>) {
                let now = *self.now.lock().unwrap();
                if self.limit.admit(event, now) {
                    self.passed_at.lock().unwrap().push(now);
                }
            }
        }
        let sub = tracing_subscriber::registry().with(Times {
            limit: limit.clone(),
            now: now.clone(),
            passed_at: passed_at.clone(),
        });
        let mut reports = 0;
        tracing::subscriber::with_default(sub, || {
            // A line every 7 s for 10 minutes, one every 0.5 s in bursts;
            // the flusher looks every 0.5 s.
            for i in 0..1200u64 {
                let t = t0 + Duration::from_millis(i * 500);
                *now.lock().unwrap() = t;
                if i % 14 == 0 || (i / 100) % 2 == 0 {
                    tracing::warn!(target: "dep", "again");
                }
                reports += limit.take_ended(t).len();
            }
        });
        let times = passed_at.lock().unwrap().clone();
        assert!(times.len() >= 25, "{}", times.len());
        for (i, t) in times.iter().enumerate() {
            let within = times[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_secs(60))
                .count();
            assert!(within <= 3, "{within} lines in the minute from {t:?}");
        }
        // At most one report per window while the cause lasts.
        assert!((5..=10).contains(&reports), "{reports} reports");
    }

    #[test]
    fn json_lines_carry_fields_flat_and_lists_as_arrays() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || w.clone())
                .with_ansi(false)
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("transfer", blob = "ab12");
            let _in = span.enter();
            let listen = vec![
                "/ip4/10.0.0.7/tcp/4001".to_string(),
                "/ip6/::1/tcp/4001".into(),
            ];
            let odd = "[not json".to_string();
            tracing::info!(
                peer = "p1",
                n = 3u64,
                ok = true,
                listen = ?listen,
                chunks = ?vec![1u32, 5],
                text = ?odd,
                target = "x",
                "hello {}",
                "world"
            );
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(line["message"], "hello world", "{out}");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["peer"], "p1");
        assert_eq!(line["n"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(
            line["listen"],
            serde_json::json!(["/ip4/10.0.0.7/tcp/4001", "/ip6/::1/tcp/4001"])
        );
        assert_eq!(line["chunks"], serde_json::json!([1, 5]));
        assert_eq!(line["text"], "\"[not json\"");
        assert_eq!(line["field.target"], "x");
        assert_eq!(line["blob"], "ab12", "a span's field, flat too");
        assert_eq!(line["spans"], serde_json::json!(["transfer"]));
        assert!(line.get("fields").is_none() && line.get("span").is_none());
        // The line's own keys come first.
        assert!(out.starts_with("{\"timestamp\":"), "{out}");
    }

    #[test]
    fn a_window_ended_by_a_new_line_is_still_reported() {
        let limit = RateLimit::new(Duration::from_secs(10), 1, 1);
        let t0 = Instant::now();
        let now = Arc::new(Mutex::new(t0));
        let sub = tracing_subscriber::registry().with(Probe {
            limit: limit.clone(),
            now: now.clone(),
            passed: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
        });
        tracing::subscriber::with_default(sub, || {
            for _ in 0..5 {
                tracing::error!(target: "dep", "x");
            }
            *now.lock().unwrap() = t0 + Duration::from_secs(11);
            tracing::error!(target: "dep", "x");
        });
        let ended = limit.take_ended(t0 + Duration::from_secs(12));
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!((ended[0].count, ended[0].level), (4, Level::ERROR));
    }
}
