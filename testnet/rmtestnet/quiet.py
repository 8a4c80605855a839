"""`testnet quiet`: log volume under lasting faults, at the agents' default
log level (RUST_LOG unset).

Phases, each on a formed cluster:
  voter-down  one voter that is not the leader stopped (SIGTERM) for
              --duration seconds (default 120): the leader keeps trying it;
  partition   one host cut off from the others for --fault-duration seconds;
  flap        one host killed and restarted every --flap-every seconds for
              --fault-duration seconds.

For every agent that runs through a phase, the lines its log gained in any
60-second span (by the lines' own timestamps) are counted; the check fails
if any span of any agent holds more than --max-per-minute lines (default 10;
--flap-max-per-minute, default 14, in the flap phase: two causes last there,
the flapping peer's own lines, at most 8 and a count, and the leader's Raft
errors towards it, at most 3 and a count).
"""

import datetime
import json
import os
import time

from . import faults
from .cluster import Cluster, teardown
from .util import TestnetError, log, wait_for

PHASES = ("voter-down", "partition", "flap")


def _stamp(line):
    """The time of a text log line, or None (testnet markers, continuations)."""
    head = line.split(" ", 1)[0]
    if len(head) < 20 or not head.endswith("Z"):
        return None
    try:
        return datetime.datetime.strptime(head[:19], "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def _new_lines(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


def max_per_minute(lines):
    """Most lines in any 60-second span, and the lines of that span."""
    times = sorted(t for t in (_stamp(l) for l in lines) if t is not None)
    best, at, j = 0, 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 60:
            j += 1
        if i - j + 1 > best:
            best, at = i - j + 1, t
    span = [l for l in lines if (s := _stamp(l)) is not None and at - 60 <= s <= at]
    return best, span


def _formed(c, names):
    lead = set()
    for n in names:
        h = c.host(n)
        m = c.api(h, "GET", "/v1/members", timeout=5)
        alive = {x["name"] for x in m["members"] if x["state"] == "alive"}
        if not set(names) <= alive:
            return False
        ld = c.api(h, "GET", "/v1/leader", timeout=5)
        if not ld.get("leader"):
            return False
        lead.add(ld["leader"])
    return len(lead) == 1 and lead.pop()


def _measure(c, names, run_fault, label, limit):
    offsets = {n: os.path.getsize(c.host(n)["log"]) for n in names}
    t0 = time.monotonic()
    run_fault()
    took = time.monotonic() - t0
    result = {"phase": label, "seconds": round(took), "agents": {}}
    ok = True
    for n in names:
        lines = _new_lines(c.host(n)["log"], offsets[n])
        lines = [l for l in lines if not l.startswith("==== testnet")]
        peak, span = max_per_minute(lines)
        result["agents"][n] = {"lines": len(lines), "max_per_minute": peak}
        verdict = "ok" if peak <= limit else "FLOOD"
        log(f"quiet: {label}: {n}: {len(lines)} lines in {took:.0f} s, at most {peak} in a minute [{verdict}]")
        if peak > limit:
            ok = False
            for l in span[:15]:
                log(f"    {l[:200]}")
    return ok, result


def run_quiet(args):
    phases = [p for p in args.phases.split(",") if p]
    bad = sorted(set(phases) - set(PHASES))
    if bad:
        raise TestnetError(f"unknown phases {bad}; known: {', '.join(PHASES)}")
    # The agents' own default filter: no RUST_LOG in their environment.
    os.environ.pop("RUST_LOG", None)
    os.environ["TESTNET_DEFAULT_LOG"] = "1"
    from .cli import up
    log(f"quiet: bringing up {args.hosts} agents at the default log level")
    up(args, show=False)
    c = Cluster(args.state).load()
    ok = True
    report = {"limit_per_minute": args.max_per_minute, "phases": []}
    try:
        names = list(c.hosts)
        voters = [n for n in names if c.hosts[n]["voter"]]
        deadline = time.monotonic() + 120
        leader = wait_for(lambda: _formed(c, names), deadline, 0.5, "a formed cluster")
        for phase in phases:
            if phase == "voter-down":
                victim = next(v for v in voters if v != leader)
                others = [n for n in names if n != victim]

                def fault(victim=victim):
                    c.stop(c.host(victim))
                    log(f"quiet: voter {victim} stopped for {args.duration:.0f} s (leader {leader})")
                    time.sleep(args.duration)
                good, res = _measure(c, others, fault, "voter-down", args.max_per_minute)
                c.start(c.host(victim))
            elif phase == "partition":
                victim = next(n for n in names if n != leader)
                rest = [n for n in names if n != victim]

                def fault(victim=victim, rest=rest):
                    faults.partition(c, [victim, ",".join(rest)])
                    time.sleep(args.fault_duration)
                good, res = _measure(c, names, fault, "partition", args.max_per_minute)
                faults.heal(c)
            else:
                victim = next(n for n in reversed(names) if n != leader)
                others = [n for n in names if n != victim]

                def fault(victim=victim):
                    end = time.monotonic() + args.fault_duration
                    n = 0
                    while time.monotonic() < end:
                        c.kill(c.host(victim))
                        time.sleep(args.flap_every / 2)
                        c.start(c.host(victim))
                        time.sleep(args.flap_every / 2)
                        n += 1
                    log(f"quiet: {victim} flapped {n} times")
                good, res = _measure(c, others, fault, "flap", args.flap_max_per_minute)
            ok = ok and good
            report["phases"].append(res)
            leader = wait_for(lambda: _formed(c, names), time.monotonic() + 120, 0.5,
                              f"the cluster to form again after {phase}")
    finally:
        if not args.keep:
            teardown(c.dir)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    log(f"quiet: {'PASS' if ok else 'FAILED'}: at most {args.max_per_minute} log lines a minute per agent")
    return 0 if ok else 1
