#!/usr/bin/env python3
"""Writes riftmesh.json, the Grafana dashboard of a riftmesh cluster.

    python3 deploy/grafana/build.py            # rewrite riftmesh.json
    python3 deploy/grafana/build.py --check    # exit 1 if riftmesh.json is stale

Edit the panels here, not in the JSON. Every expression selects job="riftmesh"
(deploy/prometheus/prometheus.yml) and the dashboard variables $host (the
`instance` label, which the scrape config sets to the host name) and $consumer.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "riftmesh.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="riftmesh", instance=~"$host"'

_id = 0
_y = 0


def nid():
    global _id
    _id += 1
    return _id


def target(expr, legend="", instant=False, fmt=None, ref="A"):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t["instant"] = True
        t["range"] = False
    if fmt:
        t["format"] = fmt
    return t


def targets(*pairs):
    return [target(e, l, ref=chr(ord("A") + i)) for i, (e, l) in enumerate(pairs)]


def panel(kind, title, tgts, x, w, h, unit=None, desc="", **extra):
    # Every panel says its unit (bytes, s, percentunit, ops, short for a
    # plain count...): without one Grafana guesses, and a count of peers
    # reads like a size. check.sh fails on a panel without one.
    if not unit:
        sys.exit(f"panel {title!r} has no unit")
    p = {
        "id": nid(),
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": _y, "w": w, "h": h},
        "targets": tgts,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
    }
    p["fieldConfig"]["defaults"]["unit"] = unit
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "none", "textMode": "auto"}
    for k, v in extra.items():
        if k == "thresholds":
            p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": v}
        elif k == "defaults":
            p["fieldConfig"]["defaults"].update(v)
        elif k == "options":
            p["options"].update(v)
        else:
            p[k] = v
    return p


def row(title, panels):
    global _y
    r = {"id": nid(), "type": "row", "title": title, "collapsed": False,
         "gridPos": {"x": 0, "y": _y, "w": 24, "h": 1}, "panels": []}
    _y += 1
    out = [r]
    for line in panels:
        height = max(p["gridPos"]["h"] for p in line(_y))
        out.extend(line(_y))
        _y += height
    return out


def line(*makers):
    """A horizontal line of panels; each maker is (kind, title, targets, w, h, kwargs)."""
    def build(y):
        x = 0
        ps = []
        for kind, title, tgts, w, h, kw in makers:
            p = panel(kind, title, tgts, x, w, h, **kw)
            p["gridPos"]["y"] = y
            ps.append(p)
            x += w
        return ps
    cache = {}

    def memo(y):
        if y not in cache:
            cache[y] = build(y)
        return cache[y]
    return memo


def P(kind, title, tgts, w, h=7, **kw):
    return (kind, title, tgts, w, h, kw)


RED_GREEN = [{"color": "red", "value": None}, {"color": "green", "value": 1}]
GREEN_RED = [{"color": "green", "value": None}, {"color": "red", "value": 1}]

panels = []
panels += row("Cluster", [
    line(
        P("stat", "Agents up", [target(f'sum(up{{{SEL}}})', instant=True)], 3, 4,
          desc="Targets answering /metrics, of those Prometheus knows.",
          thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}], unit="short"),
        P("stat", "Agents down", [target(f'count(up{{{SEL}}} == 0) or vector(0)', instant=True)], 3, 4,
          thresholds=GREEN_RED, unit="short"),
        P("stat", "Members by state (max over agents)",
          [target(f'max by (state) (riftmesh_members{{{SEL}}})', "{{state}}", instant=True)], 6, 4,
          desc="alive / suspect / dead / left, as the agents' failure detectors see them (this agent counts as alive).", unit="short"),
        P("stat", "Leader", [target(f'max by (instance) (riftmesh_is_leader{{{SEL}}}) == 1', "{{instance}}", instant=True)], 4, 4,
          desc="The voter that claims leadership (only voters export riftmesh_is_leader).",
          options={"textMode": "name"}, unit="short"),
        P("stat", "Term", [target(f'max(riftmesh_leader_term{{{SEL}}})', instant=True)], 3, 4,
          desc="Term of the newest elected leader (LEADER_ELECTED, known to every agent): the fencing token. It rises at every election.", unit="short"),
        P("stat", "Voter list mismatches", [target(f'max(riftmesh_voter_list_mismatch{{{SEL}}})', instant=True)], 5, 4,
          desc="Members whose `voters` list differs; must be 0.", thresholds=GREEN_RED, unit="short"),
    ),
    line(
        P("timeseries", "Members by state", [target(f'max by (state) (riftmesh_members{{{SEL}}})', "{{state}}")], 8, unit="short"),
        P("timeseries", "Leader term and leader", targets(
            (f'max(riftmesh_leader_term{{{SEL}}})', "term"),
            (f'riftmesh_is_leader{{{SEL}}} == 1', "leader: {{instance}}")), 8, unit="short"),
        P("timeseries", "Election duration (p50, p99)", targets(
            (f'histogram_quantile(0.5, sum by (le) (rate(riftmesh_election_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p50"),
            (f'histogram_quantile(0.99, sum by (le) (rate(riftmesh_election_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99")),
          8, unit="s", desc="From losing a leader to knowing the next one, on the voters."),
    ),
    line(
        P("timeseries", "Failure-detector transitions", [target(
            f'sum by (from, to) (increase(riftmesh_member_transitions_total{{{SEL}}}[$__rate_interval]))', "{{from}} → {{to}}")], 8, unit="short"),
        P("timeseries", "Connected peers", [target(f'riftmesh_connected_peers{{{SEL}}}', "{{instance}}")], 8, unit="short"),
        P("timeseries", "Last heard from each member (max over observers)", [target(
            f'max by (name) (riftmesh_member_last_heard_seconds{{{SEL}}})', "{{name}}")], 8, unit="s",
          desc="Seconds since some agent last heard directly from the member; health goes every health_interval (5s). Left and dead members keep growing until forgotten."),
    ),
    line(
        P("timeseries", "Round-trip time to members (p. observer, max)", [target(
            f'max by (name) (riftmesh_member_rtt_seconds{{{SEL}}})', "{{name}}")], 8, unit="s"),
        P("timeseries", "Lock operations (on the leader)", [target(
            f'sum by (op) (rate(riftmesh_lock_ops_total{{{SEL}}}[$__rate_interval]))', "{{op}}")], 8, unit="ops"),
        P("table", "Members not alive (by name, observers counted)", [target(
            f'count by (name, peer, state) (riftmesh_member_state{{{SEL}, state!="alive"}} == 1)', "", instant=True, fmt="table")], 8,
          desc="Members some agent sees suspect, dead or left, and how many agents see them so.", unit="short"),
    ),
])
panels += row("Hosts", [
    line(
        P("timeseries", "CPU use", [target(f'riftmesh_host_cpu_use_ratio{{{SEL}}}', "{{instance}}")], 8, unit="percentunit"),
        P("timeseries", "Load (1 min)", [target(f'riftmesh_host_load1{{{SEL}}}', "{{instance}}")], 8, unit="short"),
        P("timeseries", "Memory used", [target(
            f'riftmesh_host_memory_used_bytes{{{SEL}}} / riftmesh_host_memory_total_bytes{{{SEL}}}', "{{instance}}")], 8, unit="percentunit"),
    ),
    line(
        P("timeseries", "Data disk free", [target(f'riftmesh_host_disk_free_bytes{{{SEL}}}', "{{instance}}")], 8, unit="bytes",
          desc="Free space on the filesystem of the data directory."),
        P("timeseries", "GPU utilization (mean over the host's GPUs)", [target(
            f'avg by (instance) (riftmesh_host_gpu_utilization_ratio{{{SEL}}})', "{{instance}}")], 8, unit="percentunit"),
        P("timeseries", "GPU temperature (hottest GPU)", [target(
            f'max by (instance) (riftmesh_host_gpu_temperature_celsius{{{SEL}}})', "{{instance}}")], 8, unit="celsius"),
    ),
    line(
        P("timeseries", "GPU memory used", [target(
            f'sum by (instance) (riftmesh_host_gpu_memory_used_bytes{{{SEL}}})', "{{instance}}")], 8, unit="bytes"),
        P("timeseries", "Job counters (riftmesh report)", [target(
            f'sum by (kind) (riftmesh_host_jobs{{{SEL}}})', "{{kind}}")], 8,
          desc="Counters local processes report (`riftmesh report selfplay_jobs=6`), summed over hosts, by kind (the counter's name).", unit="short"),
        P("table", "GPUs per host", [target(
            f'count by (instance) (riftmesh_host_gpu_utilization_ratio{{{SEL}}})', "", instant=True, fmt="table")], 8, unit="short"),
    ),
])
panels += row("Events", [
    line(
        P("timeseries", "Published here", [target(
            f'sum by (instance) (rate(riftmesh_events_published_total{{{SEL}}}[$__rate_interval]))', "{{instance}}")], 8, unit="ops"),
        P("timeseries", "Received from peers", [target(
            f'sum by (instance) (rate(riftmesh_events_received_total{{{SEL}}}[$__rate_interval]))', "{{instance}}")], 8, unit="ops"),
        P("timeseries", "Publish → receive latency (p50, p99)", targets(
            (f'histogram_quantile(0.5, sum by (le) (rate(riftmesh_remote_event_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p50"),
            (f'histogram_quantile(0.99, sum by (le) (rate(riftmesh_remote_event_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99")),
          8, unit="s"),
    ),
    line(
        P("timeseries", "Duplicates dropped", [target(
            f'sum by (via) (rate(riftmesh_events_duplicate_total{{{SEL}}}[$__rate_interval]))', "{{via}}")], 8, unit="ops"),
        P("timeseries", "Rejected, by reason", [target(
            f'sum by (reason) (rate(riftmesh_events_rejected_total{{{SEL}}}[$__rate_interval]))', "{{reason}}")], 8, unit="ops",
          desc="Should be 0: see the RiftmeshEventsRejected alert."),
        P("timeseries", "Inbound dropped (queue full)", [target(
            f'sum by (instance, queue) (rate(riftmesh_inbound_dropped_total{{{SEL}}}[$__rate_interval]))', "{{instance}} {{queue}}")], 8, unit="ops"),
    ),
    line(
        P("timeseries", "Catch-up: events fetched", [target(
            f'sum by (instance) (rate(riftmesh_catchup_events_total{{{SEL}}}[$__rate_interval]))', "{{instance}}")], 8, unit="ops"),
        P("timeseries", "Anti-entropy traffic", [target(
            f'sum by (instance) (rate(riftmesh_antientropy_bytes_total{{{SEL}}}[$__rate_interval]))', "{{instance}}")], 8, unit="Bps"),
        P("timeseries", "Order gaps open", [target(f'riftmesh_order_gaps_open{{{SEL}}}', "{{instance}}")], 8,
          desc="Sources whose later events wait for a missing earlier one (order_hold).", unit="short"),
    ),
    line(
        P("timeseries", "Events retained", [target(f'riftmesh_store_events{{{SEL}}}', "{{instance}}")], 8, unit="short"),
        P("timeseries", "Event store on disk", [target(f'riftmesh_store_size_bytes{{{SEL}}}', "{{instance}}")], 8, unit="bytes"),
        P("timeseries", "API errors", [target(
            f'sum by (instance, code) (rate(riftmesh_api_errors_total{{{SEL}}}[$__rate_interval]))', "{{instance}} {{code}}")], 8, unit="ops"),
    ),
])
panels += row("Consumers", [
    line(
        P("timeseries", "Consumer lag", [target(
            f'riftmesh_consumer_lag{{{SEL}, consumer=~"$consumer"}}', "{{instance}} {{consumer}}")], 16,
          desc="Log entries after the consumer's acknowledged cursor (every type, also those it does not match).", unit="short"),
        P("table", "Lag now", [target(
            f'sort_desc(riftmesh_consumer_lag{{{SEL}, consumer=~"$consumer"}})', "", instant=True, fmt="table")], 8, unit="short"),
    ),
])
panels += row("Blob sync", [
    line(
        P("timeseries", "Sync throughput", targets(
            (f'sum by (instance) (rate(riftmesh_sync_bytes_total{{{SEL}, direction="in"}}[$__rate_interval]))', "in {{instance}}"),
            (f'-sum by (instance) (rate(riftmesh_sync_bytes_total{{{SEL}, direction="out"}}[$__rate_interval]))', "out {{instance}}")),
          12, unit="Bps", desc="Chunk bytes received (up) and served (down)."),
        P("timeseries", "Fetches finished, placements failed", targets(
            (f'sum by (result) (increase(riftmesh_sync_transfers_total{{{SEL}}}[$__rate_interval]))', "{{result}}"),
            (f'sum by (instance) (increase(riftmesh_sync_place_failed_total{{{SEL}}}[$__rate_interval]))', "place failed {{instance}}")), 6, unit="short"),
        P("timeseries", "Fetches in progress", [target(f'riftmesh_sync_active{{{SEL}}}', "{{instance}}")], 6, unit="short"),
    ),
    line(
        P("timeseries", "Fetch duration (p50, p95)", targets(
            (f'histogram_quantile(0.5, sum by (le) (rate(riftmesh_sync_transfer_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p50"),
            (f'histogram_quantile(0.95, sum by (le) (rate(riftmesh_sync_transfer_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p95")),
          8, unit="s"),
        P("timeseries", "Blob store", [target(f'riftmesh_blob_store_bytes{{{SEL}}}', "{{instance}}")], 8, unit="bytes"),
        P("timeseries", "Chunks rejected / requests served", targets(
            (f'sum by (reason) (rate(riftmesh_sync_chunks_rejected_total{{{SEL}}}[$__rate_interval]))', "rejected {{reason}}"),
            (f'sum by (kind, result) (rate(riftmesh_sync_requests_served_total{{{SEL}}}[$__rate_interval]))', "served {{kind}} {{result}}")),
          8, unit="ops"),
    ),
])
panels += row("libp2p", [
    line(
        P("timeseries", "Network bytes (libp2p)", [target(
            f'sum by (instance, direction) (rate(libp2p_bandwidth_bytes_total{{{SEL}}}[$__rate_interval]))', "{{instance}} {{direction}}")],
          12, unit="Bps"),
        P("timeseries", "Connections established", [target(
            f'sum by (instance) (increase(libp2p_swarm_connections_established_total{{{SEL}}}[$__rate_interval]))', "{{instance}}")], 6, unit="short"),
        P("timeseries", "Ping RTT (p99)", [target(
            f'histogram_quantile(0.99, sum by (instance, le) (rate(libp2p_ping_rtt_seconds_bucket{{{SEL}}}[$__rate_interval])))', "{{instance}}")],
          6, unit="s"),
    ),
])


def variable(name, label, query, multi=True):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query,
        "refresh": 2, "includeAll": True, "multi": multi, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0,
    }


dashboard = {
    "__inputs": [],
    "uid": "riftmesh-cluster",
    "title": "riftmesh cluster",
    "description": "Members, health, leader, events, consumers and blob sync of a riftmesh cluster (deploy/grafana/build.py).",
    "tags": ["riftmesh"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        variable("host", "Host", 'label_values(up{job="riftmesh"}, instance)'),
        variable("consumer", "Consumer", 'label_values(riftmesh_consumer_lag{job="riftmesh"}, consumer)'),
    ]},
    "annotations": {"list": [
        {"name": "Leader changes", "datasource": DS, "enable": True, "iconColor": "orange",
         "expr": 'changes(max(riftmesh_leader_term{job="riftmesh"})[2m:15s]) > 0',
         "titleFormat": "new term", "step": "60s"},
    ]},
    "panels": panels,
}


def render():
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        with open(OUT, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{OUT} is stale: run python3 {sys.argv[0]}", file=sys.stderr)
                sys.exit(1)
        sys.exit(0)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUT} ({len(panels)} panels)")
