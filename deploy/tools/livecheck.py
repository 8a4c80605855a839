#!/usr/bin/env python3
"""Checks of deploy/ against real riftmesh agents on 127.0.0.1 (used by deploy/check.sh).

  livecheck.py metrics --bin BIN --work DIR --rules R.yml --dashboard D.json
                       --prom-config P.yml [--prometheus /usr/bin/prometheus] [--metrics-rs src/metrics.rs]
      Starts five agents on loopback (three voters, two others), drives them
      so that most metric families have samples (events, duplicates, a
      consumer, a lock, job counters, fake GPUs, a blob sync that succeeds
      and one that fails, a voter with a different voter list, a killed
      agent), then
        1. checks that every metric the alert rules and the dashboard use is
           in the agents' /metrics output (with the label names they select),
           that this output (the classic text format) passes `promtool check
           metrics`, and that no riftmesh label is called job or instance;
        2. runs Prometheus on 127.0.0.1 with the deploy scrape config's
           relabelling and the deploy alert rules, scraping the agents, and
           runs every dashboard query and every rule: none may fail.

  livecheck.py configs --bin BIN --work DIR FILE.toml...
      Starts the real agent with each config file (name, voters, tags, wants
      from the file; data_dir, listen, bootstrap, api, metrics, swarm key and
      mDNS overridden to loopback temp values), waits for /v1/health, checks
      that the agent took the file's name, tags, voters and wants, and stops
      it with SIGTERM (it must exit 0).

Only the standard library, plus PyYAML for the rules file.
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

# Label names of families that get samples only after rare events (a full
# queue, a corrupt chunk), from their call sites in src/: used when the live
# output has no sample of them.
RARE_LABELS = {
    "riftmesh_inbound_dropped_total": {"queue"},
    "riftmesh_sync_chunks_rejected_total": {"reason"},
    "riftmesh_events_rejected_total": {"reason"},
}
TARGET_LABELS = {"job", "instance", "host", "role", "provider", "le", "quantile"}
FAILED = []


def fail(msg):
    FAILED.append(msg)
    print("FAIL: " + msg, flush=True)


def info(msg):
    print(msg, flush=True)


def _die_with_parent():
    """In the child: get SIGKILL when this checker dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def http(method, url, body=None, timeout=10, ctype="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, raw
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def jget(url, timeout=10):
    st, raw = http("GET", url, timeout=timeout)
    if st != 200:
        raise RuntimeError(f"GET {url}: {st} {raw[:200]!r}")
    return json.loads(raw)


class Exited(Exception):
    """An agent that has exited: waiting longer will not help."""


def wait_for(what, pred, timeout, step=0.2):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = pred()
            if v:
                return v
        except Exited:
            raise
        except Exception as e:  # noqa: BLE001 - anything means "not yet"
            last = e
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}" + (f" (last: {last})" if last else ""))


class Agent:
    def __init__(self, bin_, work, name, config_text, bootstrap=None, key=None, env=None):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.conf = os.path.join(self.dir, "riftmesh.toml")
        with open(self.conf, "w") as f:
            f.write(config_text)
        self.p2p, self.api_port, self.metrics_port = free_ports(3)
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.metrics = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.listen = f"/ip4/127.0.0.1/tcp/{self.p2p}"
        args = [bin_, "agent", "--config", self.conf, "--name", name,
                "--data-dir", os.path.join(self.dir, "data"), "--listen", self.listen,
                "--api", f"127.0.0.1:{self.api_port}", "--metrics", f"127.0.0.1:{self.metrics_port}",
                "--no-mdns", "--swarm-key", key]
        # The file's bootstrap list names real hosts: always replace it with a
        # loopback address (the first agent's, or an unused port).
        args += ["--bootstrap", bootstrap or f"/ip4/127.0.0.1/tcp/{free_ports(1)[0]}"]
        e = {k: v for k, v in os.environ.items() if not k.startswith("RIFTMESH_")}
        e.setdefault("RUST_LOG", "info")
        e.update(env or {})
        self.log = open(os.path.join(self.dir, "agent.log"), "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=e, preexec_fn=_die_with_parent)

    def healthy(self):
        if self.proc.poll() is not None:
            raise Exited(f"agent {self.name} exited with {self.proc.returncode}: {self.tail()}")
        return jget(self.api + "/v1/health", timeout=2).get("ok") is True

    def tail(self, n=15):
        self.log.flush()
        with open(os.path.join(self.dir, "agent.log"), "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


FAKE_NVIDIA_SMI = """#!/bin/sh
# Stand-in for nvidia-smi: two GPUs, in the format the agent asks for.
echo "0, NVIDIA H100 80GB HBM3, 87, 40960, 81559, 71"
echo "1, NVIDIA H100 80GB HBM3, 12, 1024, 81559, 44"
"""


# --- PromQL scanning -------------------------------------------------------------
KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}
SEL_RE = re.compile(r"\b((?:riftmesh|libp2p)_[A-Za-z0-9_]+|up)\b\s*(\{([^}]*)\})?")
MATCH_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr):
    """(metric, [(label, op, value)]) for every metric selector in expr."""
    out = []
    for m in SEL_RE.finditer(expr):
        name = m.group(1)
        matchers = MATCH_RE.findall(m.group(3) or "")
        out.append((name, matchers))
    return out


def substitute(expr):
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
            .replace("$host", ".*").replace("$consumer", ".*"))


def dashboard_exprs(path):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f'panel "{p.get("title")}" {t.get("refId")}', t["expr"]))
            walk(p.get("panels", []))
    walk(d.get("panels", []))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if isinstance(q, str) and q.startswith("label_values("):
            inner = q[len("label_values("):].rsplit(",", 1)[0]
            out.append((f'variable "{v["name"]}"', inner))
    for a in d.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f'annotation "{a.get("name")}"', a["expr"]))
    return out


def rule_exprs(path):
    import yaml
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    out = []
    for g in doc["groups"]:
        for r in g["rules"]:
            out.append((f'rule {r.get("alert") or r.get("record")}', r["expr"]))
    return out


# --- /metrics parsing ------------------------------------------------------------
SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+\S+")
LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text, seen):
    """seen: sample name -> {label: set(values)}; families (TYPE lines) under '#TYPE'."""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split(None, 3)
            seen.setdefault("#TYPE", {})[fam] = typ
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            continue
        labels = seen.setdefault(m.group(1), {})
        for k, v in LABEL_RE.findall(m.group(3) or ""):
            labels.setdefault(k, set()).add(v)


def check_exposition(name, text):
    """The classic text format must pass `promtool check metrics` (when
    promtool is installed), and no riftmesh label may collide with a target
    label Prometheus sets (job, instance)."""
    for line in text.splitlines():
        m = SAMPLE_RE.match(line)
        if m and m.group(1).startswith("riftmesh_"):
            for k, _ in LABEL_RE.findall(m.group(3) or ""):
                if k in ("job", "instance"):
                    fail(f"{name}: {m.group(1)} has a label {k!r}, which Prometheus renames exported_{k}")
    promtool = shutil.which("promtool")
    if not promtool:
        info("  note: promtool not found: `promtool check metrics` skipped")
        return
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
    said = (r.stdout + r.stderr).decode().strip()
    if r.returncode != 0 or said:
        fail(f"{name}: promtool check metrics: {said}")


def family_samples(fam, typ):
    # OpenMetrics names a counter family without _total, the classic text
    # format (what the agent serves without an Accept header) with it.
    if typ == "counter" and fam.endswith("_total"):
        return [fam]
    if typ == "counter":
        return [fam + "_total", fam + "_created"]
    if typ == "histogram":
        return [fam + "_bucket", fam + "_sum", fam + "_count", fam + "_created"]
    if typ == "info":
        return [fam + "_info"]
    return [fam]


def registered_families(metrics_rs):
    """Families riftmesh registers (names in src/metrics.rs), for families
    that only show up in /metrics after a rare event."""
    if not metrics_rs or not os.path.exists(metrics_rs):
        return set()
    with open(metrics_rs, encoding="utf-8") as f:
        src = f.read()
    names = set(re.findall(r'^\s*"([a-z0-9_]+)",\s*$', src, re.M))
    names |= set(re.findall(r'^\s*"([a-z0-9_]+)", "', src, re.M))
    return {"riftmesh_" + n for n in names}


def check_names(exprs, seen, registered):
    types = seen.get("#TYPE", {})
    sample_names = {k for k in seen if k != "#TYPE"}
    known_from_type = {}
    for fam, typ in types.items():
        for s in family_samples(fam, typ):
            known_from_type[s] = fam
    used = {}
    for where, expr in exprs:
        # Labels in by (...) / on (...) must exist on some metric of the expression.
        avail = set(TARGET_LABELS)
        for name, _ in selectors(expr):
            for lab in list(seen.get(name, {})) + sorted(RARE_LABELS.get(name, ())):
                # a metric label that collides with a target label is renamed exported_<label>
                avail.add("exported_" + lab if lab in ("job", "instance") else lab)
        native = {lab for name, _ in selectors(expr) for lab in seen.get(name, {})}
        for grp in re.findall(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)", expr):
            for lab in (x.strip() for x in grp.split(",")):
                if lab and lab not in avail:
                    fail(f"{where}: groups by {lab!r}, which no metric of the expression has")
                elif lab in ("job", "instance") and lab in native:
                    fail(f"{where}: groups by {lab!r}: the agent's own {lab!r} label is stored "
                         f"as exported_{lab}, {lab!r} is the scrape target's")
        for name, matchers in selectors(expr):
            used.setdefault(name, set()).add(where)
            if name == "up":
                continue
            if name in sample_names:
                labels = seen[name]
                for lab, op, val in matchers:
                    if lab in TARGET_LABELS:
                        continue
                    if lab not in labels:
                        fail(f"{where}: {name} has no label {lab!r} (labels seen: {sorted(labels)})")
                    elif op == "=" and val not in labels[lab]:
                        info(f"  note: {where}: {name}{{{lab}=\"{val}\"}} not observed "
                             f"(values seen: {sorted(labels[lab])})")
                continue
            if name in known_from_type:
                info(f"  note: {where}: {name} is a declared family with no sample yet")
                continue
            base = re.sub(r"_(total|bucket|sum|count|created)$", "", name)
            if base in registered:
                info(f"  note: {where}: {name} not in the live output (no sample yet); "
                     f"registered as {base} in src/metrics.rs")
                continue
            fail(f"{where}: metric {name} is not exported by the agent")
    return used


# --- Prometheus --------------------------------------------------------------------
def run_prometheus(prom_bin, work, prom_config, rules, agents, dead_targets, exprs):
    import yaml
    with open(prom_config, encoding="utf-8") as f:
        deploy = yaml.safe_load(f)
    job = next(j for j in deploy["scrape_configs"] if j["job_name"] == "riftmesh")
    sd_dir = os.path.join(work, "targets")
    os.makedirs(sd_dir, exist_ok=True)
    sd = [{"targets": [a.metrics[len("http://"):-len("/metrics")]], "labels": {"host": a.name, "role": "test"}}
          for a in agents]
    sd += [{"targets": [t]} for t in dead_targets]  # no host label: exercises the address fallback
    with open(os.path.join(sd_dir, "riftmesh.yml"), "w") as f:
        yaml.safe_dump(sd, f)
    port = free_ports(1)[0]
    cfg = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [os.path.abspath(rules)],
        "scrape_configs": [{
            "job_name": "riftmesh",
            "metrics_path": job.get("metrics_path", "/metrics"),
            "file_sd_configs": [{"files": [os.path.join(sd_dir, "*.yml")], "refresh_interval": "1s"}],
            "relabel_configs": job.get("relabel_configs", []),
        }],
    }
    cfg_path = os.path.join(work, "prometheus.yml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, "prometheus.log"), "wb")
    proc = subprocess.Popen([prom_bin, f"--config.file={cfg_path}", f"--storage.tsdb.path={work}/tsdb",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                             "--web.enable-lifecycle"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    try:
        wait_for("prometheus ready", lambda: http("GET", base + "/-/ready", timeout=2)[0] == 200, 30)

        def targets_up():
            t = jget(base + "/api/v1/targets")["data"]["activeTargets"]
            ups = [x for x in t if x["health"] == "up"]
            return len(ups) >= len(agents) and ups
        wait_for("all agents scraped", targets_up, 30)
        t = jget(base + "/api/v1/targets")["data"]["activeTargets"]
        instances = sorted(x["labels"].get("instance") for x in t)
        info(f"  prometheus targets: {instances}")
        want = sorted([a.name for a in agents] + [d.split(":")[0] for d in dead_targets])
        if instances != want:
            fail(f"relabelling: instances {instances}, expected {want}")
        time.sleep(8)  # a few scrapes and rule evaluations: rates need two samples
        empty = []
        for where, expr in exprs:
            q = substitute(expr)
            st, raw = http("GET", base + "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
            r = json.loads(raw)
            if st != 200 or r.get("status") != "success":
                fail(f"{where}: query failed: {r.get('error', raw[:200])}\n    {q}")
                continue
            if not r["data"]["result"] and " rule " not in f" {where}":
                empty.append(where)
        if empty:
            info(f"  {len(empty)} dashboard queries returned nothing on this test cluster (no such event here): "
                 + "; ".join(empty))
        groups = jget(base + "/api/v1/rules")["data"]["groups"]
        n = 0
        for g in groups:
            for r in g["rules"]:
                n += 1
                if r.get("health") != "ok":
                    fail(f"rule {r['name']}: health {r.get('health')}: {r.get('lastError')}")
        firing = sorted({a["labels"]["alertname"] for a in jget(base + "/api/v1/alerts")["data"]["alerts"]})
        info(f"  prometheus evaluated {n} rules without error; pending/firing now: {firing}")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def parse_size(v):
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(v))
    if not m:
        raise ValueError(f"size {v!r}")
    mult = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2)]
    base = 1024 if m.group(3) or not m.group(2) else 1000
    return int(float(m.group(1)) * base ** mult) if m.group(2) else int(float(m.group(1)))


# --- commands ----------------------------------------------------------------------
def keygen(bin_, work):
    key = os.path.join(work, "swarm.key")
    subprocess.run([bin_, "keygen", "--out", key], check=True, stdout=subprocess.DEVNULL)
    return key


def cmd_metrics(a):
    work = a.work
    os.makedirs(work, exist_ok=True)
    key = keygen(a.bin, work)
    smi = os.path.join(work, "nvidia-smi")
    with open(smi, "w") as f:
        f.write(FAKE_NVIDIA_SMI)
    os.chmod(smi, 0o755)
    # blob_roots: the check names its model file by path, under `work`.
    common = (f'mdns = false\nnvidia_smi = "{smi}"\nhealth_interval = "1s"\n'
              f'blob_roots = [{json.dumps(os.path.abspath(work))}]\n')
    voters = 'voters = ["v1", "v2", "v3"]\n'
    place = os.path.join(work, "placed")
    agents = []
    try:
        v1 = Agent(a.bin, work, "v1", common + voters + 'tags = { role = "training" }\n', key=key)
        agents.append(v1)
        boot = v1.listen
        for n in ("v2", "v3"):
            agents.append(Agent(a.bin, work, n, common + voters, bootstrap=boot, key=key))
        agents.append(Agent(a.bin, work, "w4", common + voters + 'tags = { role = "selfplay" }\n'
                            f'[[want]]\nnames = "models/*"\nplace = "{place}/{{name}}.pth"\n',
                            bootstrap=boot, key=key))
        # A host with another voter list (refused: voter_list) and a blob
        # budget too small for what it wants (a failed fetch).
        agents.append(Agent(a.bin, work, "w5", common + 'voters = ["v1", "v2", "w5"]\nblob_budget = "64KiB"\n'
                            '[[want]]\nnames = "models/*"\n', bootstrap=boot, key=key))
        for ag in agents:
            wait_for(f"{ag.name} healthy", ag.healthy, 30)
        wait_for("a leader", lambda: jget(v1.api + "/v1/leader").get("leader"), 30)
        wait_for("five members alive on v1", lambda: sum(
            m["state"] == "alive" for m in jget(v1.api + "/v1/members")["members"]) == 5, 30)
        info("  5 agents up, leader " + jget(v1.api + "/v1/leader")["leader"])

        # Events, a duplicate, a consumer that lags, API errors.
        v2 = agents[1]
        st, _ = http("PUT", v2.api + "/v1/consumers/trainer", {"types": ["TRAINING_*"]})
        assert st == 200, st
        for i in range(3):
            st, _ = http("POST", v1.api + "/v1/events", {"type": "training.completed", "payload": {"run": i}})
            assert st == 200, st
        http("POST", v1.api + "/v1/events", {"type": "training.completed", "payload": {"run": 0}})  # duplicate
        http("POST", v1.api + "/v1/events", b"not json")  # 400
        http("POST", v1.api + "/v1/events", {"type": "x"}, ctype="text/plain")  # 415
        # Job counters, a lock on the leader.
        http("POST", v1.api + "/v1/jobs", {"jobs": {"selfplay_jobs": 6, "training_jobs": 1}, "ttl_secs": 600})
        st, raw = http("POST", v1.api + "/v1/locks/promote/acquire", {"ttl_secs": 30})
        if st != 200:
            info(f"  note: lock acquire: {st} {raw[:200]!r}")
        # A blob: w4 fetches and places it, w5 fails (budget).
        blob = os.path.join(work, "model.bin")
        with open(blob, "wb") as f:
            f.write(os.urandom(3 << 20))
        st, raw = http("POST", v1.api + "/v1/blobs", {"path": blob, "name": "models/test", "event": "MODEL_PROMOTED"},
                       timeout=60)
        assert st == 200, (st, raw)
        wait_for("w4 placed the blob", lambda: os.path.exists(os.path.join(place, "test.pth")), 60)
        w5 = agents[4]
        wait_for("w5's fetch failed", lambda: 'result="failed"' in http("GET", w5.metrics)[1].decode(), 60)
        # v1 refuses w5's Raft messages (another voter list).
        wait_for("voter_list rejections", lambda: 'reason="voter_list"' in http("GET", v1.metrics)[1].decode(), 30,
                 step=0.5)
        # consumer_lag is refreshed every 5 s by the housekeeping task.
        wait_for("consumer_lag on v2", lambda: "riftmesh_consumer_lag{" in http("GET", v2.metrics)[1].decode(), 15)
        time.sleep(1.5)  # one more health round for the gauges

        seen = {}
        for ag in agents:
            st, raw = http("GET", ag.metrics)
            assert st == 200, st
            with open(os.path.join(ag.dir, "metrics.txt"), "wb") as f:
                f.write(raw)
            parse_metrics(raw.decode(), seen)
            check_exposition(ag.name, raw.decode())
        # Kill w5 without a leave: the others declare it dead.
        w5.stop(signal.SIGKILL)
        wait_for("w5 dead on v1", lambda: any(
            m["name"] == "w5" and m["state"] == "dead" for m in jget(v1.api + "/v1/members")["members"]), 30)
        time.sleep(1.5)
        for ag in agents[:4]:
            parse_metrics(http("GET", ag.metrics)[1].decode(), seen)
        fams = [k for k in seen if k != "#TYPE"]
        info(f"  {len(seen.get('#TYPE', {}))} metric families, {len(fams)} sample names seen on the agents")

        exprs = [(f"{os.path.basename(a.rules)}: {w}", e) for w, e in rule_exprs(a.rules)]
        exprs += [(f"{os.path.basename(a.dashboard)}: {w}", e) for w, e in dashboard_exprs(a.dashboard)]
        used = check_names(exprs, seen, registered_families(a.metrics_rs))
        info(f"  {len(exprs)} expressions use {len(used)} metric names: "
             + ", ".join(sorted(used)))
        if a.prometheus:
            run_prometheus(a.prometheus, work, a.prom_config, a.rules, agents[:4],
                           [w5.metrics[len("http://"):-len("/metrics")]], exprs)
    finally:
        for ag in agents:
            ag.stop()
    for ag in agents[:4]:
        if ag.proc.returncode != 0:
            fail(f"agent {ag.name} exited with {ag.proc.returncode} after SIGTERM")


def cmd_configs(a):
    if tomllib is None:
        sys.exit("configs needs Python 3.11 (tomllib)")
    os.makedirs(a.work, exist_ok=True)
    key = keygen(a.bin, a.work)
    pending = list(enumerate(a.files))
    while pending:
        batch, pending = pending[:a.parallel], pending[a.parallel:]
        running = []
        for i, path in batch:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                conf = tomllib.loads(raw.decode())
            except Exception as e:  # noqa: BLE001
                fail(f"{path}: not TOML: {e}")
                continue
            name = conf.get("name") or "unnamed"
            text = raw.decode()
            d = os.path.join(a.work, f"{i:02d}-" + os.path.basename(path).replace(".toml", ""))
            ag = Agent(a.bin, d, name, text, key=key)
            ag.path, ag.conf_data = path, conf
            running.append(ag)
        for ag in running:
            conf = ag.conf_data
            try:
                wait_for(f"{ag.path} healthy", ag.healthy, 30)
                st = jget(ag.api + "/v1/status")
                if "name" in conf and st["name"] != conf["name"]:
                    fail(f"{ag.path}: agent runs as {st['name']}, config says {conf['name']}")
                me = jget(ag.api + "/v1/members")["members"][0]
                tags = conf.get("tags", {})
                if me.get("tags", {}) != tags:
                    fail(f"{ag.path}: tags {me.get('tags')} instead of {tags}")
                ld = jget(ag.api + "/v1/leader")
                if ld.get("voters", []) != conf.get("voters", []):
                    fail(f"{ag.path}: voters {ld.get('voters')} instead of {conf.get('voters')}")
                sy = jget(ag.api + "/v1/sync")
                wants = sy.get("wants", [])
                if [w["names"] for w in wants] != [w["names"] for w in conf.get("want", [])]:
                    fail(f"{ag.path}: wants {[w['names'] for w in wants]}, config has "
                         f"{[w['names'] for w in conf.get('want', [])]}")
                for w in wants:  # if_tags: active exactly where every tag matches
                    expect = all(tags.get(k) == v for k, v in w.get("if_tags", {}).items())
                    if w.get("active") != expect:
                        fail(f"{ag.path}: want {w['names']} active={w.get('active')}, expected {expect}")
                for ckey, field in (("blob_budget", "budget_bytes"), ("sync_upload_rate", "upload_rate"),
                                    ("sync_download_rate", "download_rate")):
                    if ckey in conf and parse_size(conf[ckey]) != (sy.get(field) or 0):
                        fail(f"{ag.path}: {ckey} = {conf[ckey]!r} but the agent has {field} = {sy.get(field)}")
                active = sum(bool(w.get("active")) for w in wants)
                info(f"  {ag.path}: ok (name {st['name']}, voter {ld.get('is_voter')}, "
                     f"tags {tags}, {len(wants)} want tables, {active} active here)")
            except Exited as e:
                fail(f"{ag.path}: {e}")
            except Exception as e:  # noqa: BLE001
                fail(f"{ag.path}: {e}\n{ag.tail()}")
            finally:
                rc = ag.stop()
                if rc not in (0, None) and not FAILED:
                    fail(f"{ag.path}: agent exited with {rc} after SIGTERM\n{ag.tail()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("metrics")
    m.add_argument("--bin", required=True)
    m.add_argument("--work", required=True)
    m.add_argument("--rules", required=True)
    m.add_argument("--dashboard", required=True)
    m.add_argument("--prom-config", required=True)
    m.add_argument("--prometheus")
    m.add_argument("--metrics-rs")
    ap.add_argument("--time-limit", type=int, default=240, help="give up after this many seconds")
    c = sub.add_parser("configs")
    c.add_argument("--bin", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--parallel", type=int, default=6)
    c.add_argument("files", nargs="+")
    a = ap.parse_args()

    def stop(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")

    def too_long(_signum, _frame):
        raise TimeoutError(f"took more than {a.time_limit}s")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(a.time_limit)
    try:
        {"metrics": cmd_metrics, "configs": cmd_configs}[a.cmd](a)
    except Exception as e:  # noqa: BLE001
        fail(f"{a.cmd}: {type(e).__name__}: {e}")
    if FAILED:
        print(f"{len(FAILED)} failure(s)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
