"""Blob fan-out benchmark on shaped links: 1 source + N receivers (9), every
host's link limited to the same rate in both directions with tc tbf.
First one receiver fetches a blob alone, then all receivers fetch another
blob (same size) at once. Prints both times, their ratio (target: all within
2x the single transfer) and the share of the bytes the origin served."""

import json
import os
import re
import time
import types

from . import faults as F
from .cluster import Cluster, teardown
from .util import ApiError, TestnetError, log, wait_for, write_random_file

METRIC_RE = re.compile(r'^(riftmesh_sync_bytes_total)\{([^}]*)\}\s+([0-9.eE+]+)')


def sync_bytes(c, h):
    """{'in': n, 'out': n} from riftmesh_sync_bytes_total."""
    out = {"in": 0.0, "out": 0.0}
    for line in c.metrics_text(h).splitlines():
        m = METRIC_RE.match(line)
        if m:
            d = re.search(r'direction="([^"]+)"', m.group(2))
            if d:
                out[d.group(1)] = out.get(d.group(1), 0.0) + float(m.group(3))
    return out


def _complete(c, h, name):
    try:
        return c.api(h, "GET", f"/v1/blob?ref={name}", timeout=5).get("state") == "complete"
    except ApiError as e:
        if e.status == 404:
            return False
        raise


def _known(c, h, name):
    try:
        c.api(h, "GET", f"/v1/blob?ref={name}", timeout=5)
        return True
    except ApiError as e:
        if e.status == 404:
            return False
        raise


def _cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v), idle


def _transfer(c, src, receivers, name, path, size, timeout):
    write_random_file(path, size, seed=name + str(time.time()))
    res = c.api(src, "POST", "/v1/blobs", {"path": path, "name": name, "event": "BLOB_PUBLISHED"},
                timeout=300)
    os.remove(path)
    wait_for(lambda: all(_known(c, h, name) for h in receivers), time.monotonic() + 60, 0.2,
             f"every receiver to learn the name {name}")
    before = {h["name"]: sync_bytes(c, h) for h in [src] + receivers}
    cpu0 = _cpu()
    t0 = time.monotonic()
    for h in receivers:
        c.api(h, "POST", "/v1/blob/fetch", {"ref": name})
    done = {}
    deadline = t0 + timeout
    while len(done) < len(receivers):
        for h in receivers:
            if h["name"] not in done and _complete(c, h, name):
                done[h["name"]] = time.monotonic() - t0
        if time.monotonic() > deadline:
            raise TestnetError(f"{name}: only {sorted(done)} complete after {timeout}s")
        time.sleep(0.2)
    total = time.monotonic() - t0
    cpu1 = _cpu()
    busy = 1 - (cpu1[1] - cpu0[1]) / max(1, cpu1[0] - cpu0[0])
    after = {h["name"]: sync_bytes(c, h) for h in [src] + receivers}
    origin_out = after[src["name"]]["out"] - before[src["name"]]["out"]
    recv_in = sum(after[h["name"]]["in"] - before[h["name"]]["in"] for h in receivers)
    return {"name": name, "blob": res["blob"], "seconds": round(total, 2),
            "per_receiver_s": {k: round(v, 2) for k, v in sorted(done.items())},
            "origin_out_bytes": int(origin_out), "receivers_in_bytes": int(recv_in),
            "origin_share": round(origin_out / recv_in, 3) if recv_in else None,
            "machine_cpu_busy": round(busy, 3), "cpus": os.cpu_count()}


def run_fanout(args):
    if args.receivers < 1 or args.receivers > 29:
        raise TestnetError("--receivers must be 1..29")
    state = args.fanout_state or (args.state.rstrip("/") + "-fanout")
    up_args = types.SimpleNamespace(state=state, hosts=args.receivers + 1, voters=3,
                                    roles="source," + ",".join(["receiver"] * args.receivers),
                                    blob_budget="0", bin=args.bin, loopback=False, ready_timeout=240)
    from .cli import up
    c = None
    try:
        up(up_args, tag="f", subnet="10.77.1", n=args.receivers + 1, show=False)
        c = Cluster(state).load()
        if c.mode != "netns":
            raise TestnetError("fanout needs network namespaces (root) to shape links")
        hosts = list(c.hosts.values())
        src, receivers = hosts[0], hosts[1:]
        for h in hosts:
            F.shape(c, h, rate=args.rate)
        size = args.size << 20
        work = os.path.join(c.dir, "fanout")
        os.makedirs(work, exist_ok=True)
        stamp = int(time.time())
        log(f"single transfer: {args.size} MiB {src['name']} -> {receivers[0]['name']} at {args.rate}")
        single = _transfer(c, src, receivers[:1], f"fanout/single-{stamp}",
                           os.path.join(work, "single.bin"), size, args.transfer_timeout)
        log(f"single: {single['seconds']}s; now {len(receivers)} receivers at once")
        many = _transfer(c, src, receivers, f"fanout/all-{stamp}",
                         os.path.join(work, "all.bin"), size, args.transfer_timeout)
        ratio = many["seconds"] / single["seconds"] if single["seconds"] else None
        rep = {"rate": args.rate, "size_mib": args.size, "receivers": len(receivers),
               "single": single, "all": many, "ratio": round(ratio, 2) if ratio else None,
               "target_ratio": 2.0, "target_met": bool(ratio and ratio <= 2.0)}
        print_table(rep)
        if args.json:
            print(json.dumps(rep, indent=1))
        return 0
    finally:
        if not args.keep:
            teardown(state, remove_dir=True)   # the blobs are large: data goes too


def print_table(rep):
    mib = rep["size_mib"]
    s, a = rep["single"], rep["all"]
    print()
    print(f"fan-out of a {mib} MiB blob, every link {rep['rate']} (tc tbf, both directions)")
    print(f"  {'transfer':28} {'seconds':>8} {'MiB/s per recv':>15} {'origin served':>14} {'CPU busy':>9}")
    print(f"  {'1 -> 1 receiver':28} {s['seconds']:8.1f} {mib / s['seconds']:15.1f} "
          f"{_pct(s['origin_share']):>14} {_pct(s['machine_cpu_busy']):>9}")
    print(f"  {'1 -> ' + str(rep['receivers']) + ' receivers at once':28} {a['seconds']:8.1f} "
          f"{mib / a['seconds']:15.1f} {_pct(a['origin_share']):>14} {_pct(a['machine_cpu_busy']):>9}")
    per = sorted(a["per_receiver_s"].values())
    print(f"  receivers finished between {per[0]:.1f}s and {per[-1]:.1f}s")
    print(f"  ratio all/single = {rep['ratio']:.2f} (target <= 2.0: {'met' if rep['target_met'] else 'MISSED'})")
    print(f"  origin sent {a['origin_out_bytes'] / 2**20:.0f} MiB of the {a['receivers_in_bytes'] / 2**20:.0f} MiB "
          f"the receivers got (riftmesh_sync_bytes_total)")
    print(f"  CPU busy: the whole machine ({a['cpus']} CPUs) during each transfer, from /proc/stat; "
          f"near 100 % means the figure is CPU-bound, not link-bound")


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f} %"
