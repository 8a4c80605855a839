//! The classic Prometheus text format (0.0.4) for scrapers that do not ask
//! for OpenMetrics (`promtool check metrics`, curl, older tools), derived from
//! prometheus-client's OpenMetrics output rather than encoded a second time:
//!
//! - counters: the family is named after its samples (`foo_total`), and the
//!   OpenMetrics-only `foo_created` samples become a gauge family of their own;
//! - info `foo` becomes gauge `foo_info`, stateset a gauge, unknown untyped,
//!   gaugehistogram a histogram whose `_gsum` / `_gcount` become gauges
//!   (the mapping the Python client uses);
//! - `# UNIT` and `# EOF` lines and exemplars are dropped, HELP text is
//!   re-escaped (0.0.4 knows only `\\` and `\n`), timestamps go from
//!   seconds to milliseconds.

use std::fmt::Write as _;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header prefers OpenMetrics to the classic text
/// format. Absent, `*/*` or `text/plain`: classic. OpenMetrics must be named
/// (`application/openmetrics-text` or `application/*`) with a q-value at
/// least that of the best text type.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let (mut om, mut text) = (0.0f32, 0.0f32);
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f32;
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("q") {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "application/*" => om = om.max(q * 0.999),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

#[derive(Default)]
struct Fam<'a> {
    name: &'a str,
    help: Option<String>,
    typ: Option<&'a str>,
    samples: Vec<(&'a str, String)>,
}

/// Convert an OpenMetrics exposition to the 0.0.4 text format.
pub fn from_openmetrics(om: &str) -> String {
    let mut fams: Vec<Fam> = Vec::new();
    for line in om.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            if rest == "EOF" {
                break;
            }
            let mut it = rest.splitn(3, ' ');
            let (Some(kw), Some(name)) = (it.next(), it.next()) else {
                continue;
            };
            let arg = it.next().unwrap_or("");
            if !matches!(kw, "HELP" | "TYPE" | "UNIT") {
                continue;
            }
            let same = fams
                .last()
                .is_some_and(|f| f.name == name && f.samples.is_empty());
            if !same {
                fams.push(Fam {
                    name,
                    ..Default::default()
                });
            }
            let f = fams.last_mut().expect("pushed");
            match kw {
                "HELP" => f.help = Some(unescape_om(arg)),
                "TYPE" => f.typ = Some(arg.trim()),
                _ => {} // UNIT: the name carries the unit already
            }
            continue;
        }
        let Some((name, sample)) = convert_sample(line) else {
            continue;
        };
        let belongs = fams.last().is_some_and(|f| {
            name.strip_prefix(f.name)
                .is_some_and(|s| s.is_empty() || s.starts_with('_'))
        });
        if !belongs {
            fams.push(Fam {
                name,
                ..Default::default()
            });
        }
        fams.last_mut()
            .expect("pushed")
            .samples
            .push((name, sample));
    }

    let mut out = String::with_capacity(om.len() + om.len() / 8);
    for f in &fams {
        let typ = f.typ.unwrap_or("unknown");
        let (name, typ) = match typ {
            "counter" => (format!("{}_total", f.name), "counter"),
            "info" => (format!("{}_info", f.name), "gauge"),
            "stateset" => (f.name.to_string(), "gauge"),
            "gaugehistogram" => (f.name.to_string(), "histogram"),
            "unknown" => (f.name.to_string(), "untyped"),
            t => (f.name.to_string(), t),
        };
        let extras: &[&str] = match f.typ {
            Some("counter" | "histogram" | "summary") => &["_created"],
            Some("gaugehistogram") => &["_gcount", "_gsum"],
            _ => &[],
        };
        if f.typ.is_some() || f.help.is_some() {
            meta(&mut out, &name, f.help.as_deref(), typ);
        }
        let is_extra = |s: &str| extras.iter().any(|x| s.strip_prefix(f.name) == Some(*x));
        for (n, s) in &f.samples {
            if !is_extra(n) {
                out.push_str(s);
                out.push('\n');
            }
        }
        for x in extras {
            let full = format!("{}{x}", f.name);
            let mut lines = f.samples.iter().filter(|(n, _)| *n == full).peekable();
            if lines.peek().is_none() {
                continue;
            }
            meta(&mut out, &full, f.help.as_deref(), "gauge");
            for (_, s) in lines {
                out.push_str(s);
                out.push('\n');
            }
        }
    }
    out
}

fn meta(out: &mut String, name: &str, help: Option<&str>, typ: &str) {
    if let Some(h) = help {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(h));
    }
    let _ = writeln!(out, "# TYPE {name} {typ}");
}

/// OpenMetrics escapes `\\`, `\n` and `\"` in HELP; anything else after a
/// backslash is kept as it is.
fn unescape_om(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.peek() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('"') => out.push('"'),
                _ => {
                    out.push('\\');
                    continue;
                }
            }
            it.next();
        } else {
            out.push(c);
        }
    }
    out
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// One sample line: its metric name and the line in 0.0.4 form (labels kept
/// as they are, the same escaping in both formats; exemplar dropped;
/// timestamp in ms).
fn convert_sample(line: &str) -> Option<(&str, String)> {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
        i += 1;
    }
    if i == 0 {
        return None;
    }
    let name = &line[..i];
    let mut j = i;
    if b.get(j) == Some(&b'{') {
        let (mut quoted, mut escaped) = (false, false);
        j += 1;
        loop {
            let c = *b.get(j)?;
            j += 1;
            if escaped {
                escaped = false;
            } else if quoted {
                match c {
                    b'\\' => escaped = true,
                    b'"' => quoted = false,
                    _ => {}
                }
            } else {
                match c {
                    b'"' => quoted = true,
                    b'}' => break,
                    _ => {}
                }
            }
        }
    }
    let series = &line[..j];
    let mut rest = line[j..].split_whitespace();
    let value = rest.next()?;
    let mut s = format!("{series} {value}");
    if let Some(ts) = rest.next().filter(|t| !t.starts_with('#')) {
        let ms = ts.parse::<f64>().ok()? * 1000.0;
        let _ = write!(s, " {}", ms.round() as i64);
    }
    Some((name, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_accept_header() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(wants_openmetrics(Some("application/openmetrics-text")));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        )));
        // Prometheus 2.x
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        // Prometheus 3.x
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        )));
        // Prometheus with scrape_protocols = [PrometheusText0.0.4] first
        assert!(!wants_openmetrics(Some(
            "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(Some("application/json")));
        assert!(!wants_openmetrics(Some("application/*, text/plain")));
    }

    #[test]
    fn counters_info_units_eof_and_exemplars() {
        let om = "\
# HELP riftmesh_events_published Events published.
# TYPE riftmesh_events_published counter
riftmesh_events_published_total 3
# HELP libp2p_ping_rtt_seconds Round-trip time sending a 'ping'.
# TYPE libp2p_ping_rtt_seconds histogram
# UNIT libp2p_ping_rtt_seconds seconds
libp2p_ping_rtt_seconds_sum 0.5
libp2p_ping_rtt_seconds_count 2
libp2p_ping_rtt_seconds_bucket{le=\"0.1\"} 1 # {trace_id=\"ab\"} 0.05 1700000000.5
libp2p_ping_rtt_seconds_bucket{le=\"+Inf\"} 2
# HELP riftmesh_agent Identity of this agent.
# TYPE riftmesh_agent info
riftmesh_agent_info{name=\"gpu-01\",version=\"0.1.0\"} 1
# HELP riftmesh_lag Lag \\\"quoted\\\" and a \\\\ backslash.
# TYPE riftmesh_lag gauge
riftmesh_lag{consumer=\"a } # b\\\"c\"} 7
# HELP riftmesh_empty Nothing yet.
# TYPE riftmesh_empty counter
# EOF
";
        let want = "\
# HELP riftmesh_events_published_total Events published.
# TYPE riftmesh_events_published_total counter
riftmesh_events_published_total 3
# HELP libp2p_ping_rtt_seconds Round-trip time sending a 'ping'.
# TYPE libp2p_ping_rtt_seconds histogram
libp2p_ping_rtt_seconds_sum 0.5
libp2p_ping_rtt_seconds_count 2
libp2p_ping_rtt_seconds_bucket{le=\"0.1\"} 1
libp2p_ping_rtt_seconds_bucket{le=\"+Inf\"} 2
# HELP riftmesh_agent_info Identity of this agent.
# TYPE riftmesh_agent_info gauge
riftmesh_agent_info{name=\"gpu-01\",version=\"0.1.0\"} 1
# HELP riftmesh_lag Lag \"quoted\" and a \\\\ backslash.
# TYPE riftmesh_lag gauge
riftmesh_lag{consumer=\"a } # b\\\"c\"} 7
# HELP riftmesh_empty_total Nothing yet.
# TYPE riftmesh_empty_total counter
";
        assert_eq!(from_openmetrics(om), want);
    }

    #[test]
    fn created_timestamps_statesets_and_gauge_histograms() {
        let om = "\
# HELP jobs Jobs done.
# TYPE jobs counter
jobs_total{kind=\"a\"} 1 1700000000.25
jobs_created{kind=\"a\"} 1699999999.5
jobs_total{kind=\"b\"} 2
# HELP mode Mode.
# TYPE mode stateset
mode{mode=\"on\"} 1
mode{mode=\"off\"} 0
# HELP queue Queue depth.
# TYPE queue gaugehistogram
queue_bucket{le=\"1.0\"} 3
queue_bucket{le=\"+Inf\"} 4
queue_gcount 4
queue_gsum 6.0
# TYPE odd unknown
odd 1
orphan{a=\"b\"} 2
# EOF
ignored 1
";
        let want = "\
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total{kind=\"a\"} 1 1700000000250
jobs_total{kind=\"b\"} 2
# HELP jobs_created Jobs done.
# TYPE jobs_created gauge
jobs_created{kind=\"a\"} 1699999999.5
# HELP mode Mode.
# TYPE mode gauge
mode{mode=\"on\"} 1
mode{mode=\"off\"} 0
# HELP queue Queue depth.
# TYPE queue histogram
queue_bucket{le=\"1.0\"} 3
queue_bucket{le=\"+Inf\"} 4
# HELP queue_gcount Queue depth.
# TYPE queue_gcount gauge
queue_gcount 4
# HELP queue_gsum Queue depth.
# TYPE queue_gsum gauge
queue_gsum 6.0
# TYPE odd untyped
odd 1
orphan{a=\"b\"} 2
";
        assert_eq!(from_openmetrics(om), want);
    }

    #[test]
    fn real_registry_converts() {
        use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
        let mut reg = prometheus_client::registry::Registry::default();
        let c: Family<Vec<(&'static str, String)>, Counter> = Family::default();
        c.get_or_create(&vec![("result", "ok".to_string())]).inc();
        reg.register("things", "Things done", c);
        let g: Gauge = Gauge::default();
        g.set(-4);
        reg.register_with_unit(
            "age",
            "How old",
            prometheus_client::registry::Unit::Seconds,
            g,
        );
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &reg).unwrap();
        assert_eq!(
            from_openmetrics(&om),
            "# HELP things_total Things done.\n# TYPE things_total counter\nthings_total{result=\"ok\"} 1\n\
             # HELP age_seconds How old.\n# TYPE age_seconds gauge\nage_seconds -4\n"
        );
    }
}
