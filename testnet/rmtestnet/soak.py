"""Soak: a testnet under random faults for a long time, with steady clients,
and invariants checked at the end.

The fault schedule is drawn from `--seed` before anything starts, so the same
seed, host count, voter count and duration give the same schedule (its digest
is printed). Faults never disturb more than `--max-disturbed` hosts at once
(a minority) nor more than a minority of the voters, and at most one
partition is in place at a time. Clients run in threads beside the fault
schedule: publishers, durable consumers, lock takers, blob publishers and a
poller of every agent's leader view. At the end every fault is undone, the
cluster must converge within `--converge-timeout`, and the invariants are
asserted (see testnet/README.md, "The soak").
"""

import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import threading
import time

from . import faults as F
from .check import check_once, _all_events
from .cluster import Cluster, tail, teardown
from .util import ApiError, TestnetError, http, log, write_random_file, Interrupted

# Two distinct lock holders' believed intervals may overlap by at most this
# much. The holder believes it holds the lock from the moment the grant
# reached it until it sends the release, and never beyond the time it *sent*
# the acquire + ttl: the leader stamps the lease when it proposes the grant,
# which is later, so on one clock a correct leader's next grant comes after
# the believed end. The agents and this script read the same wall clock (one
# machine, network namespaces), so the slack only covers the leader's
# millisecond stamps (at most 1 ms each way) with room to spare: 10 ms. (It
# was 100 ms, which let a leader hand out a lock 0.1 s before the last
# holder's lease ended.)
LOCK_SLACK_S = 0.01

# Faults applied against faults scheduled: below this share the soak fails
# (a fault that could not start is not a fault the cluster survived).
MIN_APPLIED_SHARE = 0.9
# A netem fault (delay/loss) where this kernel has no sch_netem is replaced
# by link rate shaping (tbf) of the same hosts for the same time; the report
# lists each replacement.
NETEM_REPLACEMENT_RATE = "10mbit"
# What each fault must make the other agents observe, within how many seconds
# of its start. A fault that ends before its bound without the observation is
# too short to judge and is reported as such; one that lasts the bound and
# was not observed fails the soak. With the agents' defaults (suspect after
# 3 s of silence, 1 s probe, 1-5 s suspicion window, 350 ms election timeout)
# the observations come after about 4-9 s; the bounds leave room for 20 agents
# on 2 cores.
OBSERVE_BOUND_S = {
    "kill": 15.0,         # every other running agent declares the host dead (or left)
    "pause": 12.0,        # every other running agent sees the host as not alive
    "partition": 15.0,    # each side sees every host of the other side as not alive
    "leader": 15.0,       # the leader was disturbed: the rest agree on another leader
}

# RSS bound at the end against the warm-up sample (the defaults of
# --rss-factor and --rss-extra-mib): end <= start * 1.5 + 32 MiB. The sample is
# taken after half the run (at most 300 s), once the cluster has formed, been
# through faults and caught up, the clients' steady load runs and blobs have
# moved. What may still grow after that is bounded: the sled cache (32 MiB),
# the blob chunk pool (16 MiB), sled's I/O buffers, the gossip seen-cache,
# peer tables, the decoded-manifest cache (8). The bound catches gross leaks
# and unbounded buffers (more than ~130 KiB per event in a 3-minute run), not
# slow ones (testnet/README.md, the paragraphs on the RSS bound). A third of a
# 3-minute run (60 s) was too early: the pool and sled's buffers were still
# filling, and one CI run ended an agent at 100 MiB against a bound of 92 with
# a live heap of about 40 MiB.

FAULT_KINDS = ("kill", "pause", "partition-route", "partition-api", "shape", "netem")
EVENT_TYPES = ("SOAK_WORK_DONE", "SOAK_WORK_FAILED", "SOAK_EVAL_RESULT", "SOAK_NOTE")
# Consumer patterns, given in turn to the consumer hosts.
CONSUMER_PATTERNS = (["SOAK_WORK_*"], ["SOAK_EVAL_*", "LEADER_ELECTED"], ["SOAK_*"], [])
LOCK_NAMES = ("soak-a", "soak-b")


def make_schedule(seed, names, voters, duration, kinds, max_hosts, max_voters,
                  gap=(3.0, 8.0), warmup=10.0):
    """The fault schedule: a list of {at, until, kind, hosts, ...} drawn from
    `seed` alone. A host is in at most one fault at a time and rests 5 s
    after one ends; at most `max_hosts` hosts (`max_voters` voters) are
    disturbed at once; one partition at a time."""
    rng = random.Random(seed)
    if not kinds:
        return []
    busy = {}                # host -> time it may be disturbed again
    part_until = 0.0
    out = []
    t = warmup
    end = duration - 5.0
    while True:
        t += rng.uniform(*gap)
        if t >= end:
            break
        kind = rng.choice(kinds)
        length = {"kill": (4, 20), "pause": (3, 14)}.get(kind, (6, 25))
        until = min(t + rng.uniform(*length), duration)
        disturbed = [h for h in names if busy.get(h, 0) > t]
        room = max_hosts - len(disturbed)
        vroom = max_voters - sum(1 for h in disturbed if h in voters)
        free = [h for h in names if busy.get(h, 0) <= t]
        rng.shuffle(free)
        if room <= 0 or not free:
            continue
        if kind.startswith("partition"):
            if part_until > t:
                continue
            want = rng.randint(1, min(room, 3))
        else:
            want = 1
        picked = []
        for h in free:
            if len(picked) == want:
                break
            if h in voters:
                if vroom <= 0:
                    continue
                vroom -= 1
            picked.append(h)
        if not picked:
            continue
        f = {"at": round(t, 2), "until": round(until, 2), "kind": kind, "hosts": sorted(picked)}
        if kind == "shape":
            f["rate"] = rng.choice(["2mbit", "10mbit", "50mbit"])
        if kind == "netem":
            f["delay"] = rng.choice(["20ms", "80ms"])
            f["loss"] = rng.choice(["1%", "5%"])
        if kind.startswith("partition"):
            part_until = until + 5.0
        for h in picked:
            busy[h] = until + 5.0
        out.append(f)
    return out


def schedule_digest(schedule):
    return hashlib.sha256(json.dumps(schedule, sort_keys=True).encode()).hexdigest()[:16]


class Soak:
    def __init__(self, c, args):
        self.c = c
        self.args = args
        self.run_id = f"soak-{args.seed}-{int(time.time())}"
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.stop_clients = threading.Event()
        self.stop_watch = threading.Event()
        self.state = {n: "running" for n in c.hosts}   # running|paused|killed|starting|crashed
        self.api_addr = {n: h["api"] for n, h in c.hosts.items()}
        self.published = []        # {id, hash, host, t, type}
        self.publish_errors = {}
        self.publish_dups = []
        self.consumers = []        # ConsumerClient
        self.grants = []           # {name, token, holder, host, start, end, released}
        self.lock_stats = {"granted": 0, "denied": 0, "unavailable": 0, "errors": 0}
        self.blobs = []            # {name, blob, host, t, via}
        self.blob_errors = []
        self.leader_views = {}     # (host, term, leader, is_self) -> first seen (s)
        self.leader_polls = 0
        self.rss_track = []        # [t_s, min, mean, max] MiB
        self.unexpected_exits = []
        self.faults_done = []      # executed faults with times
        self.fault_counts = {}
        self.fault_errors = []     # fault steps that failed to start (not applied)
        self.undo_errors = []      # fault steps that failed to end or undo
        self.observations = []     # {fault, kind, hosts, expect, bound_s, seen_s, result}
        self.notes = []
        self.rng = random.Random(f"{args.seed}-clients")

    def rel(self):
        return round(time.monotonic() - self.t0, 2)

    def live_names(self):
        with self.lock:
            return [n for n, s in self.state.items() if s == "running"]

    def call(self, host, method, path, body=None, timeout=10):
        return http(method, f"http://{self.api_addr[host]}{path}", body, timeout=timeout, token=self.c.token)

    def count(self, kind):
        self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1


# ---- clients -------------------------------------------------------------------

def publisher(s, idx, interval):
    rng = random.Random(f"{s.args.seed}-pub-{idx}")
    n = 0
    nxt = time.monotonic()
    while not s.stop_clients.is_set():
        nxt += interval
        live = s.live_names()
        if live:
            host = rng.choice(live)
            n += 1
            typ = rng.choice(EVENT_TYPES)
            body = {"type": typ, "source": "soak", "correlation_id": s.run_id,
                    "payload": {"soak": s.run_id, "pub": idx, "n": n, "host": host}}
            t = time.time()
            try:
                r = s.call(host, "POST", "/v1/events", body, timeout=10)
                rec = {"id": r["id"], "hash": r["hash"], "host": host, "t": t, "type": r["type"]}
                with s.lock:
                    (s.publish_dups if r.get("duplicate") else s.published).append(rec)
            except (ApiError, OSError, ValueError) as e:
                k = f"{e.status}" if isinstance(e, ApiError) else type(e).__name__
                with s.lock:
                    s.publish_errors[k] = s.publish_errors.get(k, 0) + 1
        time.sleep(max(0.0, nxt - time.monotonic()))
        if time.monotonic() - nxt > 5:
            nxt = time.monotonic()   # fell far behind (a stalled call): do not burst


class ConsumerClient:
    """A durable consumer on one host: long-poll, ack the batch, record what
    was acked. An ack whose answer was lost is resolved by reading the
    consumer's cursor before the next fetch (acked if the cursor moved past
    the batch, otherwise the batch comes again)."""

    def __init__(self, s, host, name, patterns):
        self.s, self.host, self.name, self.patterns = s, host, name, patterns
        self.start_cursor = None
        self.cursor = None          # highest seq known acked
        self.acked = {}             # seq -> {hash, count}
        self.redelivered_after_ack = []
        self.fetches = 0
        self.acks = 0
        self.errors = 0
        self.pending = None         # batch whose ack answer was lost
        self.drained_head = None
        self.drained = threading.Event()
        self.drain = threading.Event()
        self.thread = None

    def create(self):
        v = self.s.call(self.host, "PUT", f"/v1/consumers/{self.name}",
                        {"types": self.patterns, "from_now": True})
        self.start_cursor = self.cursor = v["cursor"]

    def _record(self, batch):
        for e in batch:
            a = self.acked.setdefault(e["seq"], {"hash": e["hash"], "count": 0, "type": e["type"]})
            a["count"] += 1
        self.cursor = max(self.cursor, batch[-1]["seq"])
        self.acks += 1

    def _resolve_pending(self):
        views = self.s.call(self.host, "GET", "/v1/consumers", timeout=5)
        v = next((x for x in views if x["name"] == self.name), None)
        if v is None:
            raise TestnetError(f"consumer {self.name} vanished from {self.host}")
        if v["cursor"] >= self.pending[-1]["seq"]:
            self._record(self.pending)
        self.pending = None

    def run(self):
        s = self.s
        while True:
            if s.stop_watch.is_set():
                return
            try:
                if self.pending:
                    self._resolve_pending()
                wait = 0 if self.drain.is_set() else 2000
                b = s.call(self.host, "GET", f"/v1/consumers/{self.name}/events?max=200&wait_ms={wait}",
                           timeout=15)
                self.fetches += 1
                evs = b["events"]
                if not evs:
                    if self.drain.is_set() and not self.pending:
                        # Nothing matching in (cursor, head]: the expected set
                        # is the matching events up to this head; stop here so
                        # nothing later is acked.
                        self.drained_head = b["head"]
                        self.drained.set()
                        return
                    continue
                self.drained.clear()
                for e in evs:
                    if e["seq"] <= self.cursor:
                        self.redelivered_after_ack.append(e["seq"])
                try:
                    s.call(self.host, "POST", f"/v1/consumers/{self.name}/ack", {"seq": evs[-1]["seq"]},
                           timeout=10)
                    self._record(evs)
                except (ApiError, OSError, ValueError):
                    self.errors += 1
                    self.pending = evs
            except (ApiError, OSError, ValueError, TestnetError):
                self.errors += 1
                time.sleep(0.5)


def lock_taker(s, idx, ttl):
    rng = random.Random(f"{s.args.seed}-lock-{idx}")
    while not s.stop_clients.is_set():
        live = s.live_names()
        if not live:
            time.sleep(0.5)
            continue
        host = rng.choice(live)
        name = rng.choice(LOCK_NAMES)
        holder = f"taker{idx}@{host}"
        t_send = time.time()
        try:
            r = s.call(host, "POST", f"/v1/locks/{name}/acquire", {"ttl_secs": ttl, "holder": holder},
                       timeout=8)
        except ApiError as e:
            with s.lock:
                s.lock_stats["denied" if e.status == 409 else
                             "unavailable" if e.status == 503 else "errors"] += 1
            time.sleep(rng.uniform(0.1, 0.5))
            continue
        except (OSError, ValueError):
            with s.lock:
                s.lock_stats["errors"] += 1
            time.sleep(0.5)
            continue
        t_recv = time.time()
        if not r.get("granted"):
            with s.lock:
                s.lock_stats["denied"] += 1
            continue
        limit = t_send + ttl
        hold = rng.uniform(0.2, 1.0)
        time.sleep(max(0.0, min(hold, limit - time.time())))
        t_rel = time.time()
        released = False
        try:
            released = bool(s.call(host, "POST", f"/v1/locks/{name}/release", {"token": r["token"]},
                                   timeout=5).get("released"))
        except (ApiError, OSError, ValueError):
            pass
        g = {"name": name, "token": r["token"], "holder": holder, "host": host,
             "start": t_recv, "end": min(t_rel, limit), "released": released}
        with s.lock:
            s.grants.append(g)
            s.lock_stats["granted"] += 1
        time.sleep(rng.uniform(0.1, 0.6))


def blob_publisher(s, interval, work):
    rng = random.Random(f"{s.args.seed}-blobs")
    n = 0
    while not s.stop_clients.wait(interval):
        live = s.live_names()
        if not live:
            continue
        host = rng.choice(live)
        n += 1
        if n % 2:
            name, event = f"models/soak-{(n // 2) % 3}", "BLOB_PUBLISHED"
        else:
            name, event = f"games/soak/{s.run_id}-{n:04d}", "GAME_BATCH_READY"
        size = rng.randint(256 << 10, 1 << 20)
        path = os.path.join(work, f"blob-{n:04d}.bin")
        write_random_file(path, size, seed=f"{s.run_id}-{n}")
        via = "cli" if n % 3 == 0 else "api"
        t = time.time()
        try:
            if via == "api":
                r = s.call(host, "POST", "/v1/blobs", {"path": path, "name": name, "event": event},
                           timeout=30)
                blob = r["blob"]
            else:
                p = subprocess.run([s.c.s["bin"], "blob", "add", path, "--name", name, "--event", event,
                                    "--api", s.api_addr[host], "--api-token-file", s.c.token_path,
                                    "--json"],
                                   capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
                if p.returncode != 0:
                    raise TestnetError(f"riftmesh blob add exit {p.returncode}: {p.stderr.strip()[:200]}")
                blob = json.loads(p.stdout)["blob"]
            with s.lock:
                s.blobs.append({"name": name, "blob": blob, "host": host, "t": t, "via": via, "size": size})
        except (ApiError, OSError, ValueError, KeyError, TestnetError, subprocess.TimeoutExpired) as e:
            with s.lock:
                s.blob_errors.append({"name": name, "host": host, "t": t, "via": via, "error": str(e)[:200]})


def watcher(s, interval=1.0, rss_every=15.0):
    """Poll every running agent's leader view; notice agents that exited
    without being killed; sample the agents' RSS every `rss_every` s."""
    next_rss = time.monotonic()
    while not s.stop_watch.is_set():
        t_round = time.monotonic()
        if t_round >= next_rss:
            next_rss += rss_every
            v = [x["rss"] >> 20 for x in sample_rss(s).values()]
            if v:
                s.rss_track.append([s.rel(), min(v), round(statistics.mean(v)), max(v)])
        for n in list(s.c.hosts):
            with s.lock:
                st = s.state[n]
                pid = s.c.hosts[n].get("pid")
            if st in ("running", "paused") and not _pid_runs(s.c.hosts[n], pid):
                with s.lock:
                    if s.state[n] == st and s.c.hosts[n].get("pid") == pid:
                        s.state[n] = "crashed"
                        s.unexpected_exits.append({"host": n, "pid": pid, "at_s": s.rel(),
                                                   "log_tail": tail(s.c.hosts[n]["log"], 20)})
                        log(f"soak: {n} (pid {pid}) exited on its own")
                continue
            if st != "running":
                continue
            try:
                v = s.call(n, "GET", "/v1/leader", timeout=2)
            except (ApiError, OSError, ValueError):
                continue
            key = (n, v.get("term"), v.get("leader"), bool(v.get("is_self")))
            with s.lock:
                s.leader_polls += 1
                s.leader_views.setdefault(key, s.rel())
        time.sleep(max(0.0, interval - (time.monotonic() - t_round)))


def _pid_runs(h, pid):
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return h["config"].encode() in f.read().split(b"\0")
    except OSError:
        return False


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sample_rss(s):
    out = {}
    for n, h in s.c.hosts.items():
        pid = h.get("pid")
        if pid and _pid_runs(h, pid):
            r = rss_bytes(pid)
            if r:
                out[n] = {"pid": pid, "rss": r}
    return out


# ---- faults --------------------------------------------------------------------

class FaultRunner:
    def __init__(self, s, schedule, netem):
        self.s, self.c = s, s.c
        self.netem = netem
        self.events = sorted([(f["at"], 0, i, "start") for i, f in enumerate(schedule)] +
                             [(f["until"], 1, i, "end") for i, f in enumerate(schedule)])
        self.schedule = schedule
        self.active = {}          # index -> fault

    def _set(self, n, st):
        with self.s.lock:
            self.s.state[n] = st

    def start(self, f):
        s, c, kind = self.s, self.c, f["kind"]
        hs = [c.host(n) for n in f["hosts"]]
        self.replaced = None      # set when the fault is replaced by another
        if any(s.state[n] != "running" for n in f["hosts"]):
            return False   # a crashed host: nothing to disturb
        if kind == "kill":
            for h in hs:
                self._set(h["name"], "killed")
                c.kill(h)
        elif kind == "pause":
            for h in hs:
                self._set(h["name"], "paused")
                c.pause(h)
        elif kind.startswith("partition"):
            rest = [n for n in c.hosts if n not in f["hosts"]]
            F.partition(c, [",".join(f["hosts"]), ",".join(rest)], kind.split("-")[1])
        elif kind == "shape":
            for h in hs:
                F.shape(c, h, rate=f["rate"])
        elif kind == "netem":
            if not self.netem:
                for h in hs:
                    F.shape(c, h, rate=NETEM_REPLACEMENT_RATE)
                # (Not written into the schedule: its digest stays as printed.)
                self.replaced = (f"no sch_netem: delay {f['delay']} / loss {f['loss']} replaced by "
                                 f"rate {NETEM_REPLACEMENT_RATE} (tbf)")
                return True
            for h in hs:
                F.shape(c, h, delay=f["delay"], loss=f["loss"])
        return True

    def end(self, f):
        c, kind = self.c, f["kind"]
        hs = [c.host(n) for n in f["hosts"]]
        if kind == "kill":
            for h in hs:
                self._set(h["name"], "starting")
                try:
                    c.start(h, timeout=90)
                    F.reapply_api_partition(c, h)
                finally:
                    up = c.alive(h)
                    self._set(h["name"], "running" if up else "crashed")
                    if not up:
                        self.s.unexpected_exits.append({"host": h["name"], "pid": h.get("pid"),
                                                        "at_s": self.s.rel(), "at": "restart",
                                                        "log_tail": tail(h["log"], 20)})
        elif kind == "pause":
            for h in hs:
                c.resume(h)
                F.reapply_api_partition(c, h)
                self._set(h["name"], "running")
        elif kind.startswith("partition"):
            F.heal(c)
        elif kind in ("shape", "netem"):
            for h in hs:
                F.unshape(c, h)

    def run(self, duration):
        s = self.s
        for at, _, i, what in self.events:
            if at > duration:
                break
            while True:
                left = at - (time.monotonic() - s.t0)
                if left <= 0:
                    break
                time.sleep(min(left, 0.5))
            f = self.schedule[i]
            try:
                if what == "start":
                    leader = current_leader(s, exclude=f["hosts"]) if f["kind"] in (
                        "kill", "pause", "partition-route", "partition-api") else None
                    if self.start(f):
                        self.active[i] = f
                        rep = self.replaced
                        s.count(f["kind"] + (" (replaced)" if rep else ""))
                        s.faults_done.append(dict(f, started_s=s.rel(), **({"replaced": rep} if rep else {})))
                        log(f"soak @{s.rel():.0f}s: {f['kind']} {','.join(f['hosts'])}"
                            + (f" rate {f['rate']}" if "rate" in f else "")
                            + (f" ({rep})" if rep else ""))
                        start_observers(s, i, f, leader)
                    else:
                        s.count(f"{f['kind']} not applied")
                        s.fault_errors.append(f"@{s.rel():.0f}s {f['kind']} {f['hosts']}: not applied "
                                              f"(a host was not running)")
                elif i in self.active:
                    self.end(self.active.pop(i))
                    log(f"soak @{s.rel():.0f}s: end of {f['kind']} {','.join(f['hosts'])}")
            except (TestnetError, ApiError, OSError) as e:
                (s.fault_errors if what == "start" else s.undo_errors).append(
                    f"@{s.rel():.0f}s {what} of {f['kind']} {f['hosts']}: {e}")
                log(f"soak: fault step failed: {e}")
                self.active.pop(i, None) if what == "end" else None

    def undo_all(self):
        for i in sorted(self.active, key=lambda i: self.active[i]["kind"] != "pause"):
            f = self.active[i]
            try:
                self.end(f)
            except (TestnetError, ApiError, OSError) as e:
                self.s.undo_errors.append(f"undo {f['kind']} {f['hosts']}: {e}")
        self.active.clear()
        c = self.c
        # Whatever is left from an interrupted step.
        if c.s.get("partition"):
            F.heal(c)
        for h in c.hosts.values():
            F.unshape(c, h, quiet=True)
            if h.get("paused") and c.alive(h):
                c.resume(h)
                self._set(h["name"], "running")


# ---- what each fault must make the cluster observe --------------------------------

def current_leader(s, exclude=()):
    """The leader the running agents outside `exclude` agree on, or None."""
    views = set()
    for n in s.live_names():
        if n in exclude:
            continue
        try:
            v = s.call(n, "GET", "/v1/leader", timeout=2)
        except (ApiError, OSError, ValueError):
            continue
        views.add(v.get("leader"))
    return next(iter(views)) if len(views) == 1 else None


def _states(s, observer, names):
    """observer's view of the members `names`: name -> state (None if unknown)."""
    v = s.call(observer, "GET", "/v1/members", timeout=3)
    st = {m.get("name"): m.get("state") for m in v.get("members", [])}
    return {n: st.get(n) for n in names}


def start_observers(s, idx, f, leader):
    """Start a thread per observation the fault must produce; each records
    when it was seen, or that the fault ended too early to judge, or that its
    bound passed without it."""
    kind, hosts = f["kind"], list(f["hosts"])
    plans = []
    if kind == "kill":
        plans.append(("kill", f"{','.join(hosts)} declared dead by every other running agent",
                      lambda o: all(x in ("dead", "left") for x in _states(s, o, hosts).values()),
                      None))
    elif kind == "pause":
        plans.append(("pause", f"{','.join(hosts)} seen as not alive by every other running agent",
                      lambda o: all(x not in ("alive", None) for x in _states(s, o, hosts).values()),
                      None))
    elif kind.startswith("partition"):
        inside = set(hosts)
        rest = [n for n in s.c.hosts if n not in inside]

        def seen_across(o):
            other = rest if o in inside else hosts
            return all(x not in ("alive", None) for x in _states(s, o, other).values())
        plans.append(("partition", f"{kind} {','.join(hosts)} | rest: each side sees the other as not alive",
                      seen_across, "both"))
    if leader and leader in hosts:
        plans.append(("leader", f"leader {leader} disturbed ({kind}): the rest agree on another leader",
                      None, "leader"))
    for okind, expect, cond, mode in plans:
        rec = {"fault": idx, "kind": kind, "observe": okind, "hosts": hosts, "expect": expect,
               "bound_s": OBSERVE_BOUND_S[okind], "started_s": s.rel(), "seen_s": None, "result": None}
        with s.lock:
            s.observations.append(rec)
        t = threading.Thread(target=_observe, args=(s, f, rec, cond, mode, leader), daemon=True)
        t.start()


def _observe(s, f, rec, cond, mode, leader):
    t_start = time.monotonic()
    bound_at = t_start + rec["bound_s"]
    end_at = s.t0 + f["until"]          # the scheduled end of the fault
    inside = set(f["hosts"])
    while True:
        now = time.monotonic()
        try:
            if mode == "leader":
                l = current_leader(s, exclude=inside)
                ok = l is not None and l not in inside and l != leader
            else:
                observers = [n for n in s.live_names() if n not in inside] if mode is None else \
                    [n for n in s.live_names()]
                ok = bool(observers) and all(cond(o) for o in observers)
        except (ApiError, OSError, ValueError):
            ok = False
        if ok:
            rec["seen_s"] = round(time.monotonic() - t_start, 1)
            rec["result"] = "seen"
            return
        t = time.monotonic()
        if t >= bound_at and bound_at <= end_at:
            rec["result"] = "missed"
            log(f"soak @{s.rel():.0f}s: NOT observed within {rec['bound_s']:.0f} s: {rec['expect']}")
            return
        if t >= end_at or s.stop_clients.is_set():
            rec["result"] = "too short"      # the fault ended before its bound, unseen
            return
        time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))


# ---- the run ---------------------------------------------------------------------

def run_soak(args):
    c = Cluster(args.state)
    started = False
    if not (c.exists() and c.load() and c.live_hosts()):
        from .cli import up
        log(f"soak: bringing up {args.hosts} agents")
        up(args, show=False)
        c = Cluster(args.state).load()
        started = True
    ok = False
    try:
        ok = soak(c, args)
    finally:
        if started and not args.keep:
            teardown(c.dir)
    return 0 if ok else 1


def soak(c, args):
    names = list(c.hosts)
    voters = [n for n in names if c.hosts[n]["voter"]]
    kinds = [k for k in (args.faults.split(",") if args.faults is not None else FAULT_KINDS) if k]
    bad = sorted(set(kinds) - set(FAULT_KINDS))
    if bad:
        raise TestnetError(f"unknown fault kinds {bad}; known: {', '.join(FAULT_KINDS)}")
    if c.mode != "netns":
        kinds = [k for k in kinds if k not in ("partition-route", "shape", "netem")]
        log("soak: loopback mode: no route partitions and no shaping")
    max_hosts = args.max_disturbed if args.max_disturbed is not None else max(1, len(names) // 5)
    max_hosts = min(max_hosts, (len(names) - 1) // 2)
    max_voters = (len(voters) - 1) // 2
    schedule = make_schedule(args.seed, names, set(voters), args.duration, kinds, max_hosts, max_voters)
    netem = c.mode == "netns" and F.netem_available()
    print(f"soak: seed {args.seed}, {len(names)} hosts ({len(voters)} voters), {args.duration:.0f} s, "
          f"{len(schedule)} faults scheduled (schedule digest {schedule_digest(schedule)}), "
          f"at most {max_hosts} hosts / {max_voters} voters disturbed at once", flush=True)
    if "netem" in kinds and not netem:
        print(f"note: this kernel has no sch_netem: each scheduled delay/loss fault is replaced by "
              f"rate shaping ({NETEM_REPLACEMENT_RATE}, tbf) of the same hosts, listed in the report", flush=True)
    s = Soak(c, args)
    work = os.path.join(c.dir, "soak", s.run_id)
    os.makedirs(work, exist_ok=True)

    # Consumers first (from now), so they see every event the clients publish.
    rng = random.Random(f"{args.seed}-consumers")
    chosen = sorted(rng.sample(names, min(args.consumers, len(names))))
    for k, n in enumerate(chosen):
        cc = ConsumerClient(s, n, f"soak-{k}", CONSUMER_PATTERNS[k % len(CONSUMER_PATTERNS)])
        cc.create()
        s.consumers.append(cc)
    threads = []

    def spawn(fn, *a):
        t = threading.Thread(target=fn, args=a, daemon=True)
        t.start()
        threads.append(t)
        return t

    watch = spawn(watcher, s)
    for cc in s.consumers:
        cc.thread = spawn(cc.run)
    npub = max(1, min(8, int(args.publish_rate // 2) or 1))
    clients = [spawn(publisher, s, i, npub / args.publish_rate) for i in range(npub)]
    clients += [spawn(lock_taker, s, i, args.lock_ttl) for i in range(args.lock_takers)]
    clients.append(spawn(blob_publisher, s, args.blob_interval, work))

    runner = FaultRunner(s, schedule, netem)
    rss_start = {}
    warmup = args.warmup if args.warmup is not None else min(300.0, args.duration / 2)
    warm = threading.Timer(min(warmup, args.duration), lambda: rss_start.update(sample_rss(s)))
    warm.daemon = True
    warm.start()
    report = None
    ok = False
    try:
        runner.run(args.duration)
        while time.monotonic() - s.t0 < args.duration:
            time.sleep(0.5)
        log(f"soak @{s.rel():.0f}s: duration reached; stopping clients and faults")
        s.stop_clients.set()
        for t in clients:
            t.join(timeout=60)
        runner.undo_all()
        for h in c.hosts.values():
            if s.state[h["name"]] in ("killed", "starting") and not c.alive(h):
                c.start(h, timeout=90)
                F.reapply_api_partition(c, h)
                with s.lock:
                    s.state[h["name"]] = "running"
        t_conv = time.monotonic()
        conv_ok, conv_results, conv_s = converge(s, args.converge_timeout)
        log(f"soak: {'converged' if conv_ok else 'did NOT converge'} in {conv_s:.1f}s")
        drain_consumers(s)
        s.stop_watch.set()
        watch.join(timeout=10)
        report = final_report(s, schedule, netem, rss_start, conv_ok, conv_results, conv_s, t_conv)
        ok = report["ok"]
    finally:
        s.stop_clients.set()
        s.stop_watch.set()
        warm.cancel()
        if report is None:
            try:
                runner.undo_all()
            except (TestnetError, Interrupted, OSError) as e:
                log(f"soak: undo after an error failed: {e}")
    print_report(report)
    path = args.report or os.path.join(c.dir, f"soak-report-{args.seed}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"JSON report: {path}")
    return ok


def converge(s, timeout):
    """Poll until `check` passes and every successful publish is on every
    agent, or the timeout passes."""
    t0 = time.monotonic()
    want = {p["hash"] for p in s.published}
    results = []
    while True:
        results = check_once(s.c)
        ok = all(r.ok for r in results)
        if ok:
            ok = all(want <= {e["hash"] for e in _all_events(s.c, h)} for h in s.c.live_hosts())
        if ok or time.monotonic() - t0 > timeout:
            return ok, results, time.monotonic() - t0
        time.sleep(2)


def drain_consumers(s, timeout=60):
    for cc in s.consumers:
        cc.drain.set()
    deadline = time.monotonic() + timeout
    for cc in s.consumers:
        while not cc.drained.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)


def _events_matching(s, host, patterns, after):
    out, a = [], after
    q = ("&types=" + ",".join(patterns)) if patterns else ""
    for _ in range(1000):
        r = s.call(host, "GET", f"/v1/events?after={a}&limit=1000{q}", timeout=20)
        out += r["events"]
        if r["next_after"] >= r["head"] or r["next_after"] <= a:
            break
        a = r["next_after"]
    return out


def final_report(s, schedule, netem, rss_start, conv_ok, conv_results, conv_s, t_conv):
    c = s.c
    inv = []

    def res(name, ok, detail):
        inv.append({"invariant": name, "ok": bool(ok), "detail": detail})

    res("converged", conv_ok, f"after {conv_s:.1f}s" + ("" if conv_ok else ": " + "; ".join(
        r.line() for r in conv_results if not r.ok)[:1500]))

    # 0. The faults happened: at least MIN_APPLIED_SHARE of the scheduled
    #    ones were applied (a replaced netem fault counts, and is listed), and
    #    every applied one was undone.
    scheduled = len(schedule)
    applied = len(s.faults_done)
    replaced = [f for f in s.faults_done if f.get("replaced")]
    need = -(-scheduled * int(MIN_APPLIED_SHARE * 100) // 100)      # ceil
    bad = []
    if applied < need:
        bad.append(f"{applied} of {scheduled} scheduled faults applied, at least {need} needed"
                   + (f" (e.g. {'; '.join(s.fault_errors[:3])})" if s.fault_errors else ""))
    bad += [f"undo failed: {e}" for e in s.undo_errors[:3]]
    res("faults applied", not bad,
        f"{applied} of {scheduled} scheduled faults applied (>= {MIN_APPLIED_SHARE:.0%} needed)"
        + (f", {len(replaced)} netem faults replaced by rate shaping (no sch_netem)" if replaced else "")
        + (f"; not applied: {'; '.join(s.fault_errors[:3])}" if s.fault_errors else "")
        if not bad else "; ".join(bad))

    # 0b. Each fault's expected observation within its bound.
    obs = list(s.observations)
    for kind in ("kill", "pause", "partition", "leader"):
        mine = [o for o in obs if o["observe"] == kind]
        seen = [o for o in mine if o["result"] == "seen"]
        missed = [o for o in mine if o["result"] in ("missed", None)]
        short = [o for o in mine if o["result"] == "too short"]
        bound = OBSERVE_BOUND_S[kind]
        what = {"kill": "killed host declared dead by every other running agent",
                "pause": "paused host seen as not alive by every other running agent",
                "partition": "partition seen by both sides",
                "leader": "a disturbed leader replaced by the rest"}[kind]
        worst = max((o["seen_s"] for o in seen), default=None)
        res(f"{what} within {bound:.0f} s", not missed,
            f"{len(seen)} of {len(mine)} seen" + (f" (slowest after {worst} s)" if seen else "")
            + (f", {len(short)} ended before {bound:.0f} s unseen (too short to judge)" if short else "")
            if not missed else
            "; ".join(f"fault {o['fault']} {o['kind']} {','.join(o['hosts'])} at {o['started_s']:.0f}s: "
                      f"{o['expect']}: {'not seen' if o['result'] == 'missed' else 'not judged'}"
                      for o in missed[:4]))

    live = c.live_hosts()
    logs = {}
    for h in live:
        try:
            logs[h["name"]] = _all_events(c, h, timeout=30)
        except (ApiError, OSError, ValueError) as e:
            s.notes.append(f"reading {h['name']}'s log: {e}")

    # 1. Every successful publish in every live agent's log exactly once.
    bad = []
    for n, evs in sorted(logs.items()):
        cnt, ids = {}, {}
        for e in evs:
            cnt[e["hash"]] = cnt.get(e["hash"], 0) + 1
            ids[e["hash"]] = e["id"]
        miss = [p for p in s.published if cnt.get(p["hash"], 0) == 0]
        twice = [p for p in s.published if cnt.get(p["hash"], 0) > 1]
        wrong = [p for p in s.published if p["hash"] in ids and ids[p["hash"]] != p["id"]]
        if miss or twice or wrong:
            ex = (miss or twice or wrong)[0]
            bad.append(f"{n}: {len(miss)} missing, {len(twice)} more than once, {len(wrong)} under another id "
                       f"(e.g. {ex['type']} {ex['id']} published on {ex['host']} at "
                       f"{time.strftime('%H:%M:%S', time.gmtime(ex['t']))})")
    if len(logs) < len(c.hosts):
        bad.append(f"only {len(logs)} of {len(c.hosts)} agents readable")
    res("publishes everywhere once", not bad and s.published,
        f"{len(s.published)} successful publishes, each once in all {len(logs)} logs" if not bad else
        "; ".join(bad[:6]) + (" (no publish succeeded)" if not s.published else ""))

    # 2. Consumers: every matching event acked exactly once.
    bad, cons = [], []
    for cc in s.consumers:
        try:
            exp = _events_matching(s, cc.host, cc.patterns, cc.start_cursor)
        except (ApiError, OSError, ValueError) as e:
            bad.append(f"{cc.name}@{cc.host}: cannot read the log: {e}")
            continue
        if cc.drained_head is None:
            bad.append(f"{cc.name}@{cc.host}: did not drain (an empty fetch) before the end")
            continue
        exp = [e for e in exp if e["seq"] <= cc.drained_head]
        exp_seqs = {e["seq"] for e in exp}
        got = cc.acked
        missing = sorted(exp_seqs - set(got))
        extra = sorted(set(got) - exp_seqs)
        twice = sorted(q for q, a in got.items() if a["count"] > 1)
        hash_wrong = [e["seq"] for e in exp if e["seq"] in got and got[e["seq"]]["hash"] != e["hash"]]
        cons.append({"name": cc.name, "host": cc.host, "patterns": cc.patterns, "expected": len(exp_seqs),
                     "acked": len(got), "acks": cc.acks, "fetches": cc.fetches, "errors": cc.errors})
        if missing or extra or twice or hash_wrong or cc.redelivered_after_ack:
            bad.append(f"{cc.name}@{cc.host} {cc.patterns}: {len(missing)} not acked (e.g. seq {missing[:3]}), "
                       f"{len(extra)} acked but not matching, {len(twice)} acked twice, "
                       f"{len(hash_wrong)} with another hash, {len(cc.redelivered_after_ack)} delivered "
                       f"again after their ack (e.g. {cc.redelivered_after_ack[:3]})")
    res("consumers acked once", not bad and s.consumers,
        f"{len(s.consumers)} consumers acked {sum(x['acked'] for x in cons)} events, each exactly once"
        if not bad else "; ".join(bad))

    # 3. No two leaders in one term: from the polled views and the logs.
    by_term, claims = {}, {}
    for (n, term, leader, is_self) in s.leader_views:
        if term is None:
            continue
        if leader:
            by_term.setdefault(term, set()).add(leader)
        if is_self:
            claims.setdefault(term, set()).add(n)
    elected = {}
    for evs in logs.values():
        for e in evs:
            if e["type"] == "LEADER_ELECTED":
                p = e["payload"]
                elected.setdefault(p.get("term"), set()).add(p.get("leader"))
    bad = [f"term {t}: leaders named {sorted(v)}" for t, v in sorted(by_term.items()) if len(v) > 1]
    bad += [f"term {t}: claimed by {sorted(v)}" for t, v in sorted(claims.items()) if len(v) > 1]
    bad += [f"term {t}: LEADER_ELECTED for {sorted(v)}" for t, v in sorted(elected.items(), key=str)
            if len(v) > 1]
    terms = sorted(set(by_term) | set(elected), key=lambda x: (x is None, x))
    res("one leader per term", not bad and s.leader_polls,
        f"{s.leader_polls} views polled, {len(terms)} terms ({', '.join(str(t) for t in terms[:12])}"
        f"{' …' if len(terms) > 12 else ''}), one leader each" if not bad else "; ".join(bad[:6]))

    # 4. Locks: no overlapping holders, tokens increase per grant.
    bad = []
    for name in LOCK_NAMES:
        gs = sorted((g for g in s.grants if g["name"] == name), key=lambda g: g["start"])
        for a, b in zip(gs, gs[1:]):
            if b["start"] < a["end"] - LOCK_SLACK_S:
                bad.append(f"{name}: {b['holder']} (token {b['token']}) from "
                           f"{b['start'] - s_epoch(s):.3f}s while {a['holder']} (token {a['token']}) held it "
                           f"until {a['end'] - s_epoch(s):.3f}s")
            if b["token"] <= a["token"]:
                bad.append(f"{name}: token {b['token']} granted after token {a['token']}")
    res("locks exclusive", not bad,
        f"{len(s.grants)} grants on {len(LOCK_NAMES)} locks, no overlap beyond {LOCK_SLACK_S * 1000:.0f} ms, "
        f"tokens strictly increasing" if not bad else "; ".join(bad[:6]))

    # 5. Wanted blobs present and verified (check's invariant), and every name
    #    published points at the last successful publish (or a later attempt
    #    whose answer was lost).
    blob_res = next((r for r in conv_results if r.name == "wanted blobs present"), None)
    if blob_res is None or conv_results is None:
        blob_res = next((r for r in check_once(c) if r.name == "wanted blobs present"), None)
    bad = [] if blob_res and blob_res.ok else [blob_res.detail if blob_res else "not checked"]
    names = {}
    for b in s.blobs:
        names[b["name"]] = b
    some = next(iter(logs), None)
    if some and names:
        known = {r["name"]: r for r in c.api(c.host(some), "GET", "/v1/blobs")["names"]}
        for name, b in sorted(names.items()):
            later = {e["name"] for e in s.blob_errors if e["name"] == name and e["t"] > b["t"]}
            k = known.get(name)
            if k is None:
                bad.append(f"{name} (published on {b['host']}) unknown to {some}")
            elif k["blob"] != b["blob"] and not later:
                bad.append(f"{name} points at {k['blob'][:12]} on {some}, last published {b['blob'][:12]}")
    res("wanted blobs present", not bad and s.blobs,
        (blob_res.detail if blob_res else "") + f"; {len(s.blobs)} blobs published ({len(names)} names)"
        if not bad else "; ".join(bad[:6]))

    # 6. No crash, no leak.
    rss_end = sample_rss(s)
    panics = {}
    for n, h in c.hosts.items():
        try:
            with open(h["log"], "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        hits = [ln for ln in text.splitlines() if re.search(r"panicked at|\bpanic\b", ln)]
        if hits:
            panics[n] = hits[:3]
    not_running = [n for n in c.hosts if n not in rss_end]
    fleet_start = max((v["rss"] for v in rss_start.values()), default=0)
    factor, extra = s.args.rss_factor, int(s.args.rss_extra_mib * (1 << 20))
    leaks = []
    for n, e in sorted(rss_end.items()):
        st = rss_start.get(n)
        base = st["rss"] if st and st["pid"] == e["pid"] else fleet_start
        if base and e["rss"] > base * factor + extra:
            leaks.append(f"{n}: {e['rss'] >> 20} MiB at the end, bound {int(base * factor + extra) >> 20} "
                         f"MiB ({'same process' if st and st['pid'] == e['pid'] else 'restarted: fleet max'})")
    bad = [f"{x['host']} exited on its own at {x['at_s']:.0f}s" for x in s.unexpected_exits]
    bad += [f"{n} not running at the end" for n in not_running]
    bad += [f"{n}: {hits[0][:200]}" for n, hits in panics.items()]
    bad += leaks
    if not rss_start:
        bad.append("no RSS sample after warm-up")
    res("no crash, no leak", not bad,
        f"every agent running, no panic in the logs, RSS within start x {factor} + {extra >> 20} MiB"
        if not bad else "; ".join(bad[:8]))

    def mmm(d):
        v = [x["rss"] / (1 << 20) for x in d.values()]
        return {"min": round(min(v), 1), "mean": round(statistics.mean(v), 1), "max": round(max(v), 1)} if v else {}

    acked_events = sum(len(cc.acked) for cc in s.consumers)
    delivered = {}
    for n, evs in logs.items():
        hs = {e["hash"] for e in evs}
        delivered[n] = sum(1 for p in s.published if p["hash"] in hs)
    return {
        "ok": all(i["ok"] for i in inv), "seed": s.args.seed, "run": s.run_id, "hosts": len(c.hosts),
        "voters": [n for n in c.hosts if c.hosts[n]["voter"]], "duration_s": s.args.duration,
        "schedule_digest": schedule_digest(schedule), "netem": netem,
        "invariants": inv,
        "events": {"published": len(s.published), "publish_errors": s.publish_errors,
                   "duplicates_answered": len(s.publish_dups),
                   "delivered_min": min(delivered.values(), default=0),
                   "delivered_total": sum(delivered.values())},
        "consumers": cons, "consumer_acked_events": acked_events,
        "locks": dict(s.lock_stats, grants=len(s.grants)),
        "blobs": {"published": len(s.blobs), "errors": len(s.blob_errors),
                  "by_via": {v: sum(1 for b in s.blobs if b["via"] == v) for v in ("api", "cli")},
                  "error_examples": s.blob_errors[:5]},
        "faults": s.fault_counts, "faults_scheduled": len(schedule), "fault_log": s.faults_done,
        "faults_applied": len(s.faults_done),
        "faults_replaced": [{k: f[k] for k in ("at", "kind", "hosts", "replaced")}
                            for f in s.faults_done if f.get("replaced")],
        "faults_not_applied": s.fault_errors, "fault_undo_errors": s.undo_errors,
        "observations": s.observations,
        "convergence_s": round(conv_s, 1),
        "rss_mib": {"start": mmm(rss_start), "end": mmm(rss_end),
                    "per_host": {n: {"start": (rss_start.get(n) or {}).get("rss", 0) >> 20,
                                     "end": (rss_end.get(n) or {}).get("rss", 0) >> 20,
                                     "same_process": bool(rss_start.get(n) and rss_end.get(n) and
                                                          rss_start[n]["pid"] == rss_end[n]["pid"])}
                                 for n in c.hosts}},
        "rss_track_mib": s.rss_track,
        "leader_terms": len(terms), "unexpected_exits": s.unexpected_exits, "panics": panics,
        "notes": s.notes,
    }


def s_epoch(s):
    return time.time() - (time.monotonic() - s.t0)


def print_report(rep):
    if not rep:
        print("soak: no report (the run stopped early)")
        return
    print()
    print(f"== soak seed {rep['seed']} ({rep['hosts']} hosts, {rep['duration_s']:.0f} s, schedule "
          f"{rep['schedule_digest']}): {'PASS' if rep['ok'] else 'FAIL'} ==")
    for i in rep["invariants"]:
        print(f"  {'PASS' if i['ok'] else 'FAIL'}  {i['invariant']}: {i['detail']}")
    e = rep["events"]
    print(f"events: {e['published']} published (errors {e['publish_errors'] or 'none'}), "
          f"{e['delivered_total']} deliveries into logs (min {e['delivered_min']} per agent)")
    print("consumers: " + "; ".join(f"{x['name']}@{x['host']} {x['patterns'] or ['*']}: {x['acked']} acked "
                                    f"in {x['acks']} acks ({x['errors']} errors)" for x in rep["consumers"]))
    lk = rep["locks"]
    print(f"locks: {lk['grants']} granted, {lk['denied']} denied (held), {lk['unavailable']} unavailable "
          f"(503), {lk['errors']} errors")
    b = rep["blobs"]
    print(f"blobs: {b['published']} published ({b['by_via']['api']} API, {b['by_via']['cli']} CLI), "
          f"{b['errors']} failed")
    print("faults: " + (", ".join(f"{k} {v}" for k, v in sorted(rep["faults"].items())) or "none")
          + f" ({rep['faults_applied']} of {rep['faults_scheduled']} scheduled applied)")
    for f in rep.get("faults_replaced", []):
        print(f"  REPLACED @{f['at']:.0f}s {f['kind']} {','.join(f['hosts'])}: {f['replaced']}")
    for e in rep.get("faults_not_applied", []):
        print(f"  NOT APPLIED {e}")
    print(f"convergence: {rep['convergence_s']} s; leader terms seen: {rep['leader_terms']}")
    r = rep["rss_mib"]
    print(f"RSS MiB start min/mean/max {r['start'].get('min')}/{r['start'].get('mean')}/{r['start'].get('max')}, "
          f"end {r['end'].get('min')}/{r['end'].get('mean')}/{r['end'].get('max')}")
    tr = rep.get("rss_track_mib") or []
    if tr:
        step = max(1, len(tr) // 8)
        print("RSS MiB over time (s: min/mean/max): "
              + ", ".join(f"{x[0]:.0f}: {x[1]}/{x[2]}/{x[3]}" for x in tr[::step] + ([tr[-1]] if (len(tr) - 1) % step else [])))
    for n in rep["notes"]:
        print(f"note: {n}")
