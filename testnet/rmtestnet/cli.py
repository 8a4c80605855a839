"""testnet command line: one entry point, subcommands."""

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time

from . import util
from .util import TestnetError, Interrupted, log, run, wait_for
from .cluster import Cluster, DEFAULT_ROLES, can_netns, default_bin, teardown
from . import faults
from .check import check

DEFAULT_STATE = os.environ.get("TESTNET_STATE", "/tmp/riftmesh-testnet")

# Default whole-command timeouts (seconds), overridable with --timeout.
TIMEOUTS = {"nat": 600, "quiet": 1200, "up": 300, "down": 120, "check": 120, "scenario": 900, "fanout": 1200, "soak": 2700,
            "restart": 120, "fill-disk": 120}


def load(args):
    c = Cluster(args.state)
    if not c.exists():
        raise TestnetError(f"no testnet in {c.dir}: run `testnet up` first")
    return c.load()


def up(args, tag=None, subnet=None, extra_wants=None, n=None, show=True, formed=True, prepare=None):
    """Bring a testnet up. With args.nat, the NAT layout (nat.py: 8 hosts,
    3 voters). formed=False returns once every API answers, without waiting
    for full membership and a leader (the NAT scenario measures that itself).
    prepare(c), if given, runs after the state is made and before the
    configs are written (per-host settings)."""
    tag = tag or getattr(args, "net_tag", None) or "t"
    subnet = subnet or getattr(args, "subnet", None) or "10.77.0"
    nat = None
    if getattr(args, "nat", False):
        nat = {"a": args.lan_a, "b": args.lan_b, "c": args.lan_c, "d": args.lan_d}
        n, args.voters = 8, 3
    if not (tag.isalnum() and tag.islower() and len(tag) <= 3):
        raise TestnetError("--net-tag: 1-3 lowercase letters or digits")
    for opt, net in [("--subnet", subnet)] + [(f"--lan-{k}", v) for k, v in (nat or {}).items()]:
        parts = net.split(".")
        if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
            raise TestnetError(f"{opt}: the first three octets of a /24, e.g. 10.77.0")
    c = Cluster(args.state)
    if c.exists():
        c.load()
        if any(c.alive(h) for h in c.hosts.values()) or c.s["resources"]:
            raise TestnetError(f"a testnet is already up in {c.dir}; `testnet down` first")
        os.remove(c.path)
    # A fresh testnet: data, logs and key of an earlier one (torn down) go.
    for leftover in ("hosts", "scenario", "fanout", "nat", "swarm.key", "api.token", "state.json.down"):
        p = os.path.join(c.dir, leftover)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    n = n or args.hosts
    if not 1 <= n <= 30:
        raise TestnetError("--hosts must be between 1 and 30")
    binp = args.bin or default_bin()
    if not os.access(binp, os.X_OK):
        raise TestnetError(f"riftmesh binary {binp} not found or not executable "
                           "(set RIFTMESH_BIN or --bin)")
    mode = "netns" if can_netns() and not args.loopback else "loopback"
    if nat and mode != "netns":
        raise TestnetError("the NAT layout needs network namespaces (root, `ip netns`)")
    if mode == "loopback":
        log("network namespaces cannot be made here (not root, or no `ip netns`): "
            "falling back to loopback ports on 127.0.0.1 (no shaping; partitions through "
            "/v1/debug/block)")
    roles = args.roles.split(",") if args.roles else DEFAULT_ROLES
    voters = min(args.voters, n)
    c.init(n, voters, binp, tag, subnet, roles, args.blob_budget, extra_wants or [], mode, nat=nat)
    ok = False
    try:
        if prepare:
            prepare(c)
        run([binp, "keygen", "--out", os.path.join(c.dir, "swarm.key")], timeout=30)
        c.write_token()
        c.write_configs()
        c.make_network()
        log(f"{mode}: {n} hosts, voters {','.join(c.s['voters'])}, state in {c.dir}")
        for h in c.hosts.values():
            c.start(h, wait=False)
        deadline = time.monotonic() + args.ready_timeout
        for h in c.hosts.values():
            c.wait_ready(h, deadline)
        if formed:
            log("every agent's API answers; waiting for full membership and a leader")
            wait_for(lambda: _formed(c), deadline, 0.5,
                     "every agent to see every other alive and agree on a leader")
        ok = True
        if show:
            print_status(c)
        return 0
    finally:
        if not ok:
            log("up failed: tearing down what was made")
            teardown(c.dir)


def _formed(c):
    lead = set()
    for h in c.hosts.values():
        m = c.api(h, "GET", "/v1/members", timeout=5)
        if sum(1 for x in m["members"] if x["state"] == "alive") != len(c.hosts):
            return False
        l = c.api(h, "GET", "/v1/leader", timeout=5)
        if not l.get("leader"):
            return False
        lead.add((l["leader"], l["term"]))
    return len(lead) == 1


def print_status(c, as_json=False):
    rows = []
    for h in c.hosts.values():
        st = "paused" if h.get("paused") and c.alive(h) else ("running" if c.alive(h) else h["status"])
        lead = ""
        if st == "running":
            try:
                l = c.api(h, "GET", "/v1/leader", timeout=3)
                lead = f"{l.get('role')} (leader {l.get('leader')}, term {l.get('term')})"
            except (util.ApiError, OSError) as e:
                lead = f"api error: {e}"
        rows.append(dict(host=h["name"], state=st, pid=h.get("pid"), addr=h["addr"], api=h["api"],
                         metrics=h["metrics"], role=h["role"], voter=h["voter"], leader=lead,
                         shaped=any(r["kind"] == "qdisc" and r.get("host") == h["name"]
                                    for r in c.s["resources"])))
    if as_json:
        print(json.dumps({"mode": c.mode, "state": c.dir, "partition": c.s.get("partition"),
                          "hosts": rows}, indent=1))
        return
    print(f"testnet in {c.dir} ({c.mode}); partition: "
          + (" | ".join(",".join(g) for g in c.s["partition"]["groups"]) if c.s.get("partition") else "none"))
    print(f"{'host':5} {'state':8} {'pid':>7} {'api':18} {'role':9} {'voter':5} {'shaped':6} leader view")
    for r in rows:
        print(f"{r['host']:5} {r['state']:8} {str(r['pid'] or '-'):>7} {r['api']:18} {r['role']:9} "
              f"{'yes' if r['voter'] else 'no':5} {'yes' if r['shaped'] else 'no':6} {r['leader']}")


def cmd_up(args):
    return up(args)


def cmd_down(args):
    ok = teardown(args.state, remove_dir=args.purge)
    if ok:
        log("down: every recorded process, qdisc, route, veth, namespace and bridge removed")
    return 0 if ok else 1


def cmd_status(args):
    print_status(load(args), args.json)
    return 0


def cmd_check(args):
    c = load(args)
    ok, results, waited = check(c, wait=args.wait, quiet=args.json)
    if args.json:
        print(json.dumps({"ok": ok, "waited_s": round(waited, 1),
                          "results": [r.as_dict() for r in results]}, indent=1))
    else:
        for r in results:
            print(r.line())
        print(f"{'ALL PASS' if ok else 'FAILED'} (after {waited:.1f}s)")
    return 0 if ok else 1


def cmd_kill(args):
    c = load(args)
    for name in args.host:
        h = c.host(name)
        if not c.alive(h):
            log(f"{h['name']} is not running")
            continue
        c.kill(h)
        c.add_fault("kill", host=h["name"])
        log(f"killed {h['name']} (kill -9)")
    return 0


def restart(c, h, graceful=False, timeout=90):
    if c.alive(h):
        c.stop(h) if graceful else c.kill(h)
    c.start(h, timeout=timeout)
    faults.reapply_api_partition(c, h)
    c.add_fault("restart", host=h["name"])
    log(f"restarted {h['name']} (pid {h['pid']}, same data dir and address)")


def cmd_restart(args):
    c = load(args)
    for name in args.host:
        restart(c, c.host(name), args.graceful)
    return 0


def cmd_start(args):
    return cmd_restart(args)


def cmd_stop(args):
    c = load(args)
    for name in args.host:
        c.stop(c.host(name))
        c.add_fault("stop", host=name)
    return 0


def cmd_pause(args):
    c = load(args)
    for name in args.host:
        c.pause(c.host(name))
        c.add_fault("pause", host=name)
        log(f"paused {name} (SIGSTOP)")
    return 0


def cmd_resume(args):
    c = load(args)
    for name in args.host:
        c.resume(c.host(name))
        faults.reapply_api_partition(c, c.host(name))
        c.add_fault("resume", host=name)
        log(f"resumed {name} (SIGCONT)")
    return 0


def cmd_partition(args):
    faults.partition(load(args), args.groups, args.method)
    return 0


def cmd_heal(args):
    faults.heal(load(args))
    return 0


def cmd_shape(args):
    c = load(args)
    for name in args.host:
        faults.shape(c, c.host(name), args.delay, args.loss, args.rate, args.jitter)
    return 0


def cmd_unshape(args):
    c = load(args)
    names = args.host or list(c.hosts)
    for name in names:
        faults.unshape(c, c.host(name))
    return 0


def cmd_fill_disk(args):
    c = load(args)
    faults.fill_disk(c, c.host(args.host), args.slack, args.undo)
    return 0


def cmd_scenario(args):
    from .scenario import run_scenario
    return run_scenario(args)


def cmd_soak(args):
    from .soak import run_soak
    return run_soak(args)


def cmd_quiet(args):
    from .quiet import run_quiet
    return run_quiet(args)


def cmd_nat(args):
    from .natscenario import run_nat
    return run_nat(args)


def cmd_fanout(args):
    from .fanout import run_fanout
    return run_fanout(args)


def cmd_logs(args):
    c = load(args)
    from .cluster import tail
    print(tail(c.host(args.host)["log"], args.lines))
    return 0


def add_up_args(p):
    p.add_argument("--hosts", "-n", type=int, default=5, help="number of agents (1-30, default 5)")
    p.add_argument("--voters", type=int, default=3, help="voters: the first N hosts (default 3)")
    p.add_argument("--roles", help="comma-separated role tags assigned in turn "
                                   f"(default {','.join(DEFAULT_ROLES)})")
    p.add_argument("--blob-budget", default="0", help="blob_budget of every host (default 0: no limit)")
    p.add_argument("--bin", help="riftmesh binary (default $RIFTMESH_BIN, else <repo>/target/release/riftmesh)")
    p.add_argument("--loopback", action="store_true", help="use loopback ports even as root")
    p.add_argument("--net-tag", default="t",
                   help="names: namespaces rmt-<tag>NN, bridge rmt-<tag>br (default t); "
                        "two testnets side by side need different tags, subnets and --state")
    p.add_argument("--subnet", default="10.77.0", help="the /24 of the bridge (default 10.77.0)")
    p.add_argument("--ready-timeout", type=float, default=150,
                   help="seconds for every agent to answer, see all others and agree on a leader")


def add_lan_args(p):
    p.add_argument("--lan-a", default="10.78.1", help="the /24 behind router a (NAT layout; default 10.78.1)")
    p.add_argument("--lan-b", default="10.78.2", help="the /24 behind router b (NAT layout; default 10.78.2)")
    p.add_argument("--lan-c", default="10.78.3", help="the /24 behind router c (NAT layout; default 10.78.3)")
    p.add_argument("--lan-d", default="10.78.4", help="the /24 behind router d (NAT layout; default 10.78.4)")


def parser():
    ap = argparse.ArgumentParser(prog="testnet", description="A many-host riftmesh cluster on one machine.")
    ap.add_argument("--state", default=DEFAULT_STATE, help=f"state directory (default {DEFAULT_STATE}, or $TESTNET_STATE)")
    ap.add_argument("--timeout", type=float, help="whole-command timeout in seconds (each command has a default)")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("up", help="bring up N agents")
    add_up_args(p)
    p.add_argument("--nat", action="store_true",
                   help="the NAT layout (8 hosts, 3 voters): h01-h02 public, h03-h04 behind a "
                        "cone-like NAT, h05-h06 behind a symmetric NAT, h07 and h08 each behind "
                        "a cone-like NAT of its own (README: NAT)")
    add_lan_args(p)
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("down", help="stop everything and remove every namespace, link, qdisc, route, process")
    p.add_argument("--purge", action="store_true", help="also delete the state directory (data, logs)")
    p.set_defaults(fn=cmd_down)

    p = sub.add_parser("status", help="hosts, processes, leader views")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("check", help="assert the cluster invariants")
    p.add_argument("--wait", type=util.parse_duration, default=0,
                   help="poll until every invariant holds or this many seconds pass (e.g. 60, 2m)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_check)

    for name, fn, hlp in (("kill", cmd_kill, "kill -9"), ("restart", cmd_restart, "restart (kill -9 first if running)"),
                          ("start", cmd_start, "start a stopped or killed host"),
                          ("stop", cmd_stop, "SIGTERM (the agent leaves)"),
                          ("pause", cmd_pause, "SIGSTOP"), ("resume", cmd_resume, "SIGCONT")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("host", nargs="+")
        if name == "restart":
            p.add_argument("--graceful", action="store_true", help="SIGTERM instead of kill -9 before starting")
        else:
            p.set_defaults(graceful=False)
        p.set_defaults(fn=fn)

    p = sub.add_parser("partition", help="split into groups: partition h01,h02 h03,h04,h05")
    p.add_argument("groups", nargs="+")
    p.add_argument("--method", choices=["auto", "route", "api"], default="auto",
                   help="route: blackhole routes in the namespaces (netns default); api: POST /v1/debug/block")
    p.set_defaults(fn=cmd_partition)

    p = sub.add_parser("heal", help="remove the partition")
    p.set_defaults(fn=cmd_heal)

    p = sub.add_parser("shape", help="shape a host's link (both directions)")
    p.add_argument("host", nargs="+")
    p.add_argument("--delay", help="e.g. 50ms (netem)")
    p.add_argument("--jitter", help="e.g. 10ms (netem, with --delay)")
    p.add_argument("--loss", help="e.g. 1%% (netem)")
    p.add_argument("--rate", help="e.g. 100mbit (tbf)")
    p.set_defaults(fn=cmd_shape)

    p = sub.add_parser("unshape", help="remove shaping (every host if none named)")
    p.add_argument("host", nargs="*")
    p.set_defaults(fn=cmd_unshape)

    p = sub.add_parser("fill-disk", help="restart HOST with blob_budget = what it holds now (+ slack)")
    p.add_argument("host")
    p.add_argument("--slack", default="64KiB")
    p.add_argument("--undo", action="store_true", help="restart with the original budget")
    p.set_defaults(fn=cmd_fill_disk)

    p = sub.add_parser("logs", help="tail a host's agent log")
    p.add_argument("host")
    p.add_argument("-n", "--lines", type=int, default=40)
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("scenario", help="play a pipeline round with faults")
    add_up_args(p)
    p.add_argument("--deadline", type=util.parse_duration, default=600, help="whole scenario bound (s)")
    p.add_argument("--batches", type=int, default=3, help="game batches per selfplay host")
    p.add_argument("--batch-size", default="4MiB")
    p.add_argument("--model-size", default="16MiB")
    p.add_argument("--config-name", default="hex8_2p")
    p.add_argument("--faults", default="kill,partition",
                   help="comma list of kill, partition, pause, shape (default kill,partition)")
    p.add_argument("--partition-method", choices=["auto", "route", "api"], default="auto",
                   help="how the partition is made (see `partition --method`)")
    p.add_argument("--shape-delay", default="50ms")
    p.add_argument("--shape-loss", default="1%")
    p.add_argument("--shape-rate", default="100mbit")
    p.add_argument("--keep", action="store_true", help="leave a testnet the scenario brought up running")
    p.add_argument("--json", action="store_true", help="also write the report as JSON to stdout's end")
    p.add_argument("--report", help="write the JSON report to this file")
    p.set_defaults(fn=cmd_scenario)

    p = sub.add_parser("nat", help="the NAT layout (its own testnet): joins, reachability, events, "
                                   "blobs and leadership across NATs, hole punching, a kill; then a report")
    p.add_argument("--bin", help="riftmesh binary (default $RIFTMESH_BIN, else <repo>/target/release/riftmesh)")
    p.add_argument("--net-tag", default="n", help="names: namespaces rmt-<tag>NN, rmt-<tag>ra..rd (default n)")
    p.add_argument("--subnet", default="10.77.5", help="the /24 of the public segment (default 10.77.5)")
    add_lan_args(p)
    p.add_argument("--ready-timeout", type=float, default=60, help="seconds for every agent's API to answer")
    p.add_argument("--deadline", type=util.parse_duration, default=300, help="whole scenario bound (s)")
    p.add_argument("--keep", action="store_true", help="leave the testnet up at the end (`down` removes it)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON at the end")
    p.add_argument("--report", help="write the JSON report to this file (default <state>/nat-report.json)")
    p.set_defaults(fn=cmd_nat, nat=True, loopback=False, roles=None, blob_budget="0", voters=3, hosts=8)

    p = sub.add_parser("soak", help="random faults for a long time with steady clients, then invariants")
    add_up_args(p)
    p.set_defaults(hosts=20, voters=5)
    p.add_argument("--duration", type=util.parse_duration, default=1800,
                   help="seconds of faults and clients (default 1800; CI uses 180)")
    p.add_argument("--seed", type=int, help="seed of the fault schedule (default: random, printed)")
    p.add_argument("--faults", help="comma list of kill, pause, partition-route, partition-api, shape, "
                                    "netem (default all; \"\" for none)")
    p.add_argument("--max-disturbed", type=int,
                   help="hosts disturbed at once (default hosts/5, at least 1, at most a minority)")
    p.add_argument("--publish-rate", type=float, default=5.0, help="events per second, all publishers")
    p.add_argument("--consumers", type=int, default=4, help="hosts with a durable consumer (default 4)")
    p.add_argument("--lock-takers", type=int, default=3)
    p.add_argument("--lock-ttl", type=int, default=5, help="lock ttl in seconds (default 5)")
    p.add_argument("--blob-interval", type=float, default=10.0, help="seconds between blob publishes")
    p.add_argument("--warmup", type=float,
                   help="seconds before the start RSS sample (default half the duration, "
                        "at most 300)")
    p.add_argument("--rss-factor", type=float, default=1.5,
                   help="RSS bound at the end: start x this + --rss-extra-mib (default 1.5)")
    p.add_argument("--rss-extra-mib", type=float, default=32.0, help="see --rss-factor (default 32)")
    p.add_argument("--converge-timeout", type=float, default=180.0,
                   help="seconds for the cluster to converge after the faults")
    p.add_argument("--keep", action="store_true", help="leave a testnet the soak brought up running")
    p.add_argument("--report", help="JSON report path (default <state>/soak-report-<seed>.json)")
    p.set_defaults(fn=cmd_soak)

    p = sub.add_parser("quiet", help="log lines a minute under a voter down, a partition, a flapping peer "
                                     "(default log level; fails above --max-per-minute)")
    add_up_args(p)
    p.set_defaults(hosts=3, voters=3)
    p.add_argument("--duration", type=util.parse_duration, default=120,
                   help="seconds the voter stays down (default 120)")
    p.add_argument("--fault-duration", type=util.parse_duration, default=60,
                   help="seconds of the partition and of the flapping (default 60)")
    p.add_argument("--flap-every", type=util.parse_duration, default=10,
                   help="seconds per kill-and-restart cycle of the flapping host (default 10)")
    p.add_argument("--phases", default="voter-down,partition,flap",
                   help="comma list of voter-down, partition, flap (default all)")
    p.add_argument("--max-per-minute", type=int, default=10, help="most lines in any minute (default 10)")
    p.add_argument("--flap-max-per-minute", type=int, default=14,
                   help="most lines in any minute in the flap phase (default 14: two causes)")
    p.add_argument("--keep", action="store_true", help="leave its testnet up")
    p.add_argument("--report", help="write the per-agent counts as JSON here")
    p.set_defaults(fn=cmd_quiet)

    p = sub.add_parser("fanout", help="blob fan-out benchmark: 1 source, 9 receivers, shaped links")
    p.add_argument("--rate", default="200mbit", help="every host's link rate (tc tbf), both directions")
    p.add_argument("--size", type=int, default=256, help="blob size in MiB (default 256)")
    p.add_argument("--receivers", type=int, default=9)
    p.add_argument("--bin")
    p.add_argument("--fanout-state", help="state directory of the benchmark's own testnet "
                                          "(default <state>-fanout)")
    p.add_argument("--transfer-timeout", type=float, default=600)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="leave its testnet up")
    p.set_defaults(fn=cmd_fanout)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    util.VERBOSE = args.verbose
    util.install_signal_handlers()
    timeout = args.timeout or TIMEOUTS.get(args.cmd, 60)
    if args.cmd in ("scenario", "nat") and not args.timeout:
        timeout = max(timeout, args.deadline + 300)
    if args.cmd == "soak":
        if args.seed is None:
            args.seed = random.SystemRandom().randrange(1, 10**6)
        if not args.timeout:
            timeout = args.duration + args.converge_timeout + 600
    signal.alarm(int(timeout))
    try:
        return args.fn(args)
    except TestnetError as e:
        log(f"error: {e}")
        return 2
    except Interrupted as e:
        log(f"stopped: {e}")
        return 130
    finally:
        signal.alarm(0)
