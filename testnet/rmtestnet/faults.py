"""Fault injection: partitions, link shaping, disk budget."""

import time

from .util import TestnetError, ApiError, log, run, parse_size, wait_for


def _groups(c, specs):
    groups = []
    seen = set()
    for spec in specs:
        g = []
        for name in spec.split(","):
            name = name.strip()
            if not name:
                continue
            h = c.host(name)
            if h["name"] in seen:
                raise TestnetError(f"{h['name']} is in two groups")
            seen.add(h["name"])
            g.append(h["name"])
        if g:
            groups.append(g)
    if len(groups) < 2:
        raise TestnetError("a partition needs at least two groups, e.g. `partition h01,h02 h03,h04,h05`")
    return groups


def partition(c, specs, method="auto"):
    """Cut traffic between the groups. Hosts named in no group keep talking
    to everyone.

    method "route" (netns mode, default): in each namespace, a blackhole route
    for every address of the other groups, so neither side's packets leave
    (existing TCP connections stall and time out as on a real network cut).
    method "api" (loopback mode, default there): POST /v1/debug/block on every
    agent with the peer ids of the other groups (the agent closes and refuses
    those connections)."""
    if c.s.get("partition"):
        heal(c)
    groups = _groups(c, specs)
    if method == "auto":
        method = "route" if c.mode == "netns" else "api"
    if method == "route" and c.mode != "netns":
        raise TestnetError("route partitions need the netns mode")
    with c.locked():
        c.s["partition"] = {"groups": groups, "method": method, "at_ms": int(time.time() * 1000)}
    member_of = {n: i for i, g in enumerate(groups) for n in g}
    pairs = [(a, b) for a in member_of for b in member_of if member_of[a] != member_of[b]]
    if method == "route":
        by_ns = {}
        for a, b in pairs:
            by_ns.setdefault(c.host(a)["ns"], []).append(f"blackhole {c.host(b)['addr']}/32")
        with c.locked():
            for ns, routes in by_ns.items():
                c.s["resources"] += [{"kind": "route", "ns": ns, "route": r} for r in routes]
        for ns, routes in by_ns.items():   # one `ip -batch` per namespace
            run(["ip", "-n", ns, "-batch", "-"], input="".join(f"route replace {r}\n" for r in routes))
    else:
        _api_block(c, groups, member_of, True)
    c.add_fault("partition", groups=groups, method=method)
    log("partition: " + " | ".join(",".join(g) for g in groups) + f" ({method})")


def _api_block(c, groups, member_of, block):
    missing = [n for n in member_of if not c.host(n).get("peer_id")]
    if missing:
        raise TestnetError(f"peer ids unknown for {missing}: were they ever started?")
    for a in member_of:
        ha = c.host(a)
        others = [c.host(b)["peer_id"] for b in member_of if member_of[b] != member_of[a]]
        if not c.alive(ha):
            log(f"warning: {a} is not running; its block list is not set (it starts unblocked)")
            continue
        if ha.get("paused"):
            # A SIGSTOPped agent cannot answer; the other side's block lists
            # cut it off meanwhile, and `resume` sets (or clears) its own list.
            log(f"warning: {a} is paused; its block list is {'set' if block else 'cleared'} "
                "when it is resumed")
            if not block:
                with c.locked():
                    c.s.setdefault("api_unblock", [])
                    if a not in c.s["api_unblock"]:
                        c.s["api_unblock"].append(a)
            continue
        c.api(ha, "POST", "/v1/debug/block", {"peers": others, "block": block})


def heal(c):
    p = c.s.get("partition")
    if not p:
        log("heal: no partition in place")
        return
    if p["method"] == "route":
        by_ns = {}
        for r in [r for r in c.s["resources"] if r["kind"] == "route"]:
            by_ns.setdefault(r["ns"], []).append(r["route"])
        for ns, routes in by_ns.items():
            run(["ip", "-force", "-n", ns, "-batch", "-"], check=False,
                input="".join(f"route del {r}\n" for r in routes))
        c.forget(lambda r: r["kind"] == "route")
    else:
        groups = p["groups"]
        member_of = {n: i for i, g in enumerate(groups) for n in g}
        _api_block(c, groups, member_of, False)
    with c.locked():
        c.s["partition"] = None
    c.add_fault("heal")
    log("healed")


def reapply_api_partition(c, h):
    """After a restart (or a resume) in api-partition mode, the agent's block
    list is empty (or was never set): set it again. A host that was paused
    when an api partition was healed gets its list cleared on resume."""
    p = c.s.get("partition")
    if p and p["method"] == "api" and any(h["name"] in g for g in p["groups"]):
        member_of = {n: i for i, g in enumerate(p["groups"]) for n in g}
        others = [c.host(b)["peer_id"] for b in member_of if member_of[b] != member_of[h["name"]]]
        c.api(h, "POST", "/v1/debug/block", {"peers": others, "block": True})
    elif h["name"] in c.s.get("api_unblock", []):
        # Paused when an api partition was healed: clear its list now.
        if h.get("paused") or not c.alive(h):
            return
        others = [o["peer_id"] for o in c.hosts.values() if o is not h and o.get("peer_id")]
        c.api(h, "POST", "/v1/debug/block", {"peers": others, "block": False})
        with c.locked():
            c.s["api_unblock"] = [n for n in c.s["api_unblock"] if n != h["name"]]


def _rate_bits(rate):
    r = rate.strip().lower()
    for suf, mul in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if r.endswith(suf):
            return float(r[: -len(suf)]) * mul
    raise TestnetError(f"rate {rate!r}: use e.g. 100mbit, 1gbit, 500kbit")


def netem_available():
    return _qdisc_kind_available("netem", ["delay", "1ms"])


def _qdisc_kind_available(kind, args):
    """Try the qdisc on a throwaway dummy-less veth pair in a scratch netns."""
    ns = "rmt-qprobe"
    run(["ip", "netns", "add", ns], check=False)
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"], check=False)
        p = run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", kind] + args,
                check=False)
        return p.returncode == 0
    finally:
        run(["ip", "netns", "del", ns], check=False)


def shape(c, h, delay=None, loss=None, rate=None, jitter=None):
    """Shape both directions of the host's link: the root-side veth (traffic
    into the host) and eth0 inside its namespace (traffic out of it).
    rate: tc tbf; delay/loss: tc netem (tbf as netem's child when both)."""
    if c.mode != "netns":
        raise TestnetError("shape needs the netns mode (root)")
    if not (delay or loss or rate):
        raise TestnetError("shape: give --delay, --loss and/or --rate")
    if (delay or loss) and not netem_available():
        raise TestnetError(
            "this kernel has no netem qdisc (sch_netem): --delay/--loss cannot be applied here; "
            "--rate (tbf) works")
    unshape(c, h, quiet=True)
    # Behind a NAT router the outer end of the link is in the router's namespace.
    for ns, dev in ((h.get("veth_ns"), h["veth"]), (h["ns"], "eth0")):
        pre = ["ip", "netns", "exec", ns] if ns else []
        c.record(kind="qdisc", ns=ns, dev=dev, host=h["name"])
        if delay or loss:
            args = ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem"]
            if delay:
                args += ["delay", delay] + ([jitter] if jitter else [])
            if loss:
                args += ["loss", loss]
            if rate:
                args += ["rate", rate]   # netem's own rate limiter
            run(pre + args)
        elif rate:
            bits = _rate_bits(rate)
            burst = max(256 * 1024, int(bits / 8 / 100))
            run(pre + ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                       "burst", str(burst), "latency", "100ms"])
    c.add_fault("shape", host=h["name"], delay=delay, loss=loss, rate=rate)
    log(f"shaped {h['name']}: " + ", ".join(f"{k}={v}" for k, v in
                                            (("delay", delay), ("loss", loss), ("rate", rate)) if v))


def unshape(c, h, quiet=False):
    mine = [r for r in c.s["resources"] if r["kind"] == "qdisc" and r.get("host") == h["name"]]
    for r in mine:
        pre = ["ip", "netns", "exec", r["ns"]] if r.get("ns") else []
        run(pre + ["tc", "qdisc", "del", "dev", r["dev"], "root"], check=False)
    c.forget(lambda r: r["kind"] == "qdisc" and r.get("host") == h["name"])
    if not quiet:
        c.add_fault("unshape", host=h["name"])
        log(f"unshaped {h['name']}")


def fill_disk(c, h, slack="64KiB", undo=False, timeout=90):
    """Restart the host with blob_budget = the bytes its blob store holds now
    plus `slack`, so any further blob it wants fails with SYNC_FAILED (budget)
    while what it holds stays. --undo restarts it with its original budget."""
    if undo:
        override = None
    else:
        used = 0
        if c.alive(h):
            used = c.api(h, "GET", "/v1/sync")["store_bytes"]
        override = str(max(used + parse_size(slack), 1))
    with c.locked():
        c.host(h["name"])["budget_override"] = override
        h["budget_override"] = override
    if c.alive(h):
        c.stop(h)
    c.start(h, timeout=timeout)
    c.add_fault("fill-disk" if not undo else "unfill-disk", host=h["name"], budget=override)
    log(f"{h['name']} restarted with blob_budget = "
        f"{override + ' bytes' if override else 'its configured value'}")
