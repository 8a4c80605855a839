"""`testnet nat`: the cluster across four NATs (the layout of nat.py).

One command: brings the NAT layout up (its own testnet), plays, checks,
reports, tears down (unless --keep). Every check waits on its condition
with a deadline (no fixed sleeps) and a miss is a failed check, not an
abort: the later checks still run, so one report says everything that does
and does not work behind NAT.

  join      every host alive in every host's members view within 10 s of
            its process start (the time is reported per host);
  reach     /v1/status `reach.state` "public" on h01-h02, "private" on
            h03-h08, and a relay reservation (`reach.relays`) on each host
            behind NAT, within 30 s;
  via       every /v1/peers entry says how it is reached (`via`); pairs that
            can reach each other without help (a public host in the pair,
            or the same LAN) are "direct"; the table of all pairs is reported;
  events    an event published on h03 (NAT a) reaches a durable consumer on
            h05 (NAT b) and the other way round, and both are in every log;
  blob      a blob added on h04 (NAT a) that only h06 (NAT b) wants is
            placed on h06 and its SHA-256 verified (h04 is the only source:
            the transfer must cross both NATs);
  symmetric h05 and h06 (both behind the symmetric NAT) are connected;
  punch     h07 (NAT c) and h08 (NAT d), both cone-like and alone behind
            their NATs, end up connected "hole-punched" on both sides
            (DCUtR) within 90 s; h05 (behind
            the symmetric NAT) and h03 are connected "relayed" on both sides
            (no hole can be punched through a symmetric NAT: a "direct" or
            "hole-punched" there would be a wrong label);
  leader    one leader agreed by all; kill -9 it; a new one among the
            remaining voters (h03, behind NAT, is one of the three) agreed by
            every live host within 30 s; the old one restarted and back;
  fault     kill -9 h04 (behind NAT): every other host lists it dead within
            30 s; restarted, it is alive everywhere within 10 s of its start.

The contract checked (`via`, `reach`) is the NAT-traversal agent's (relay
v2, DCUtR, AutoNAT v2); an agent without it fails those checks with a
message naming the missing field.
"""

import json
import os
import time

from .cluster import Cluster, teardown
from .scenario import Round, add_blob, undo_faults, make_report, print_report, _state_of
from .util import ApiError, TestnetError, log, sha256_file, wait_for, write_random_file

JOIN_S = 10        # start -> alive in every members view
REACH_S = 30       # reach.state and a relay reservation
EVENT_S = 30
BLOB_S = 60
PAIR_S = 30
PUNCH_S = 90
LEAD_S = 30
DEAD_S = 30
BLOB_SIZE = 1 << 20
EVENT_TYPE = "NAT_PROBE"
VIAS = ("direct", "hole-punched", "relayed")


def where(h):
    return f"NAT {h['router']}" if h.get("router") else "public"


def alive_views(c, observers):
    """{observer: set of names it lists alive}; an observer that does not
    answer is left out."""
    out = {}
    for o in observers:
        try:
            m = c.api(o, "GET", "/v1/members", timeout=3)["members"]
        except (ApiError, OSError, ValueError):
            continue
        out[o["name"]] = {x.get("name") for x in m if x["state"] == "alive"}
    return out


def wait_joined(r, hosts, observers, bound=JOIN_S):
    """Poll until every observer lists each of `hosts` alive. For each host:
    the seconds from its process start (started_ms) to the first poll in
    which every other observer lists it (None if not by `bound` s after the
    last start, plus a second), and the observers that listed it last (or
    lack it still), with their times."""
    c = r.c
    seen = {h["name"]: {} for h in hosts}      # host -> {observer: seconds since its start}
    joined = {}
    end_wall = max(h["started_ms"] for h in hosts) / 1000 + bound
    end = r.left(max(0.5, end_wall - time.time() + 1))
    while True:
        views = alive_views(c, observers)
        now = time.time()
        for h in hosts:
            if h["name"] in joined:
                continue
            since = round(now - h["started_ms"] / 1000, 2)
            for o in observers:
                if o["name"] != h["name"] and h["name"] in views.get(o["name"], set()):
                    seen[h["name"]].setdefault(o["name"], since)
            if all(o["name"] in seen[h["name"]] for o in observers if o["name"] != h["name"]):
                joined[h["name"]] = since
        if len(joined) == len(hosts) or time.monotonic() >= end:
            break
        time.sleep(0.2)
    late = {}
    for h in hosts:
        others = [o["name"] for o in observers if o["name"] != h["name"]]
        lack = [o for o in others if o not in seen[h["name"]]]
        if lack:
            late[h["name"]] = lack
        else:
            t = max(seen[h["name"]].values(), default=0)
            late[h["name"]] = [f"{o} at {seen[h['name']][o]:.1f} s" for o in others
                               if seen[h["name"]][o] == t]
    return {h["name"]: joined.get(h["name"]) for h in hosts}, late


def joined_ok(t, bound=JOIN_S):
    return t is not None and t <= bound


def joined_detail(t, late, bound=JOIN_S):
    if t is None:
        return f"not listed alive by {', '.join(late)} within {bound} s"
    return (f"after {t:.1f} s" + ("" if t <= bound else f" (over {bound} s)")
            + f"; last to list it: {', '.join(late)}")


def peer_names(c):
    return {h["peer_id"]: h["name"] for h in c.hosts.values() if h.get("peer_id")}


def run_nat(args):
    args.config_name = "nat"
    t_start = time.monotonic()
    c = Cluster(args.state)
    r = Round(c, args)
    r.t0, r.deadline = t_start, t_start + args.deadline
    r.nat = {"join_s": {}, "rejoin_s": {}, "reach": {}, "via": {}}
    report_path = args.report or os.path.join(c.dir, "nat-report.json")
    ok = False
    brought_up = False
    try:
        from .cli import up

        def prepare(c):
            # h06 alone wants nat/*: the blob check's transfer has one
            # source (h04, NAT a) and one sink (h06, NAT b).
            h = c.s["hosts"]["h06"]
            h["extra_wants"] = list(h["extra_wants"]) + [
                {"names": "nat/*", "place": os.path.join(h["dir"], "nat", "{name}.bin")}]
            os.makedirs(os.path.join(h["dir"], "nat"), exist_ok=True)
            c.save()
        with r.stage("up") as st:
            # up() tears down what it made if it fails; it refuses (and
            # touches nothing) if a testnet is already up in --state.
            up(args, show=False, formed=False, prepare=prepare)
            brought_up = True
            r.c = c = Cluster(args.state).load()
            st["detail"] = (f"{len(c.hosts)} agents, every API answers after {r.rel():.1f}s; routers "
                            + ", ".join(f"{x['name']} {x['nat']} ({' '.join(x['masquerade'])})"
                                        for x in c.s["routers"].values()))
        for name, fn in (("join", check_join), ("reach", check_reach), ("via", check_via),
                         ("events", check_events), ("blob", check_blob),
                         ("symmetric pair", check_pair), ("punch", check_punch),
                         ("leader", check_leader),
                         ("kill NATed host", check_kill)):
            n_obs = len(r.observations)
            try:
                with r.stage(name) as st:
                    fn(r, st)
                # A stage that ran but whose checks missed is not ok either.
                missed = [o for o in r.observations[n_obs:] if not o["ok"]]
                if missed:
                    st["ok"] = False
                    st["detail"] = f"{len(missed)} check(s) FAILED; " + st.get("detail", "")
            except TestnetError as e:
                # The stage broke (not just a check missed): say so, go on.
                r.notes.append(f"stage {name}: {e}")
                if time.monotonic() >= r.deadline:
                    break
            finally:
                undo_faults(r)
        ok = all(s["ok"] for s in r.stages) and all(o["ok"] for o in r.observations)
    except TestnetError as e:
        log(f"nat scenario failed: {e}")
        r.notes.append(str(e))
    finally:
        if r.c.s is None:      # up failed before making a state: an empty report
            r.c.s = {"hosts": {}}
        rep = make_report(r, ok, [])
        rep["nat"] = r.nat
        if getattr(r.c, "s", None) and r.c.s.get("routers"):
            rep["nat"]["layout"] = {
                "routers": r.c.s["routers"],
                "hosts": {n: {"addr": h["addr"], "behind": h.get("router"), "voter": h["voter"]}
                          for n, h in r.c.hosts.items()}}
        print_report(rep)
        if rep["nat"].get("layout"):
            print_nat(rep["nat"])
        if os.path.isdir(os.path.dirname(os.path.abspath(report_path))):
            with open(report_path, "w") as f:
                json.dump(rep, f, indent=1)
            print(f"report: {report_path}")
        if args.json:
            print(json.dumps(rep, indent=1))
        if brought_up and not args.keep:
            teardown(args.state)
        elif args.keep:
            log(f"--keep: the NAT testnet stays up; `testnet --state {args.state} down` removes it")
    return 0 if rep["ok"] else 1


# ---- the checks --------------------------------------------------------------

def check_join(r, st):
    hosts = list(r.c.hosts.values())
    joined, late = wait_joined(r, hosts, hosts)
    r.nat["join_s"] = joined
    for h in hosts:
        t = joined[h["name"]]
        name = f"{h['name']} ({where(h)}) alive in every host's members view within {JOIN_S} s of its start"
        r.observe(name, joined_ok(t), joined_detail(t, late[h["name"]]))
    st["detail"] = ", ".join(f"{n} {t:.1f}s" if t is not None else f"{n} -" for n, t in joined.items())


def check_reach(r, st):
    c = r.c
    want = {h["name"]: ("private" if h.get("router") else "public") for h in c.hosts.values()}
    state_at, relay_at, last = {}, {}, {}
    t0 = time.monotonic()
    end = r.left(REACH_S)
    while True:
        for h in c.hosts.values():
            n = h["name"]
            try:
                s = c.api(h, "GET", "/v1/status", timeout=5)
            except (ApiError, OSError, ValueError) as e:
                last[n] = f"/v1/status: {e}"
                continue
            reach = s.get("reach")
            if not isinstance(reach, dict):
                last[n] = "no `reach` object in /v1/status (an agent without NAT support?)"
                continue
            last[n] = reach
            if n not in state_at and reach.get("state") == want[n]:
                state_at[n] = round(time.monotonic() - t0, 1)
            if n not in relay_at and h.get("router") and reach.get("relays"):
                relay_at[n] = round(time.monotonic() - t0, 1)
        nat_hosts = [h["name"] for h in c.hosts.values() if h.get("router")]
        if (len(state_at) == len(want) and set(relay_at) >= set(nat_hosts)) or time.monotonic() >= end:
            break
        time.sleep(0.5)
    r.nat["reach"] = {n: last.get(n) for n in want}

    def why(n):
        v = last.get(n)
        if isinstance(v, dict):
            return f"{n}: state {v.get('state', 'missing')!r}, relays {v.get('relays', 'missing')}"
        return f"{n}: {v}"
    bad = [n for n in want if n not in state_at]
    r.observe(f"reach.state \"public\" on the public hosts, \"private\" behind NAT, within {REACH_S} s",
              not bad, "; ".join(f"{n} {want[n]} after {state_at[n]}s" for n in want if n in state_at)
              if not bad else "; ".join(why(n) for n in bad))
    bad = [n for n in nat_hosts if n not in relay_at]
    r.observe(f"every host behind NAT holds a relay reservation (reach.relays) within {REACH_S} s",
              not bad, "; ".join(f"{n} after {relay_at[n]}s" for n in nat_hosts) if not bad
              else "; ".join(why(n) for n in bad))
    st["detail"] = (f"state ok on {len(state_at)}/{len(want)}, "
                    f"relays on {len(relay_at)}/{len(nat_hosts)}")


def via_table(c):
    """{host: {peer host: via or None (field missing)}} from every live host's /v1/peers."""
    names = peer_names(c)
    table = {}
    for h in c.live_hosts():
        ps = c.api(h, "GET", "/v1/peers", timeout=5)["peers"]
        table[h["name"]] = {names.get(p["peer_id"], p["peer_id"][-8:]): p.get("via") for p in ps}
    return table


def direct_pair(c, a, b):
    """Can a and b reach each other without relay or hole punch?"""
    ra, rb = c.host(a).get("router"), c.host(b).get("router")
    return not ra or not rb or ra == rb


def check_via(r, st):
    c = r.c
    table = via_table(c)
    r.nat["via"] = table
    entries = [(a, b, v) for a, row in table.items() for b, v in row.items()]
    missing = [(a, b) for a, b, v in entries if v not in VIAS]
    r.observe("every /v1/peers entry says how the peer is reached (via: direct|hole-punched|relayed)",
              not missing, f"{len(entries)} entries" if not missing else
              f"{len(missing)} of {len(entries)} entries without a valid `via` (e.g. "
              + ", ".join(f"{a}->{b}: {table[a][b]!r}" for a, b in missing[:4]) + ")")
    wrong = [(a, b, v) for a, b, v in entries if b in c.hosts and direct_pair(c, a, b) and v != "direct"]
    unknown = [x for x in wrong if x[2] is None]
    r.observe("pairs with a public host or on the same LAN are connected \"direct\"", not wrong,
              "all direct" if not wrong else
              f"no `via` on {len(unknown)} of them" if len(unknown) == len(wrong) else
              ", ".join(f"{a}->{b}: {v!r}" for a, b, v in wrong if v is not None)
              + (f"; no `via` on {len(unknown)} more" if unknown else ""))
    cross = sorted({tuple(sorted((a, b))) for a, b, _ in entries
                    if b in c.hosts and not direct_pair(c, a, b)})
    st["detail"] = (f"{len(entries)} connections; across NATs: "
                    + (", ".join(f"{a}-{b} {table.get(a, {}).get(b)!r}" for a, b in cross) or "none"))


def consume(r, h, cons, until, deadline):
    """Fetch (long-poll) and ack from consumer `cons` on h until until(events)
    is true or the deadline passes; returns every event fetched."""
    got = []
    while True:
        b = r.api(h, "GET", f"/v1/consumers/{cons}/events?max=100&wait_ms=1000", timeout=10)
        got += b["events"]
        if b["events"]:
            r.api(h, "POST", f"/v1/consumers/{cons}/ack", {"seq": b["events"][-1]["seq"]})
        if until(got) or time.monotonic() >= deadline:
            return got


def check_events(r, st):
    c = r.c
    pairs = [(c.host("h03"), c.host("h05")), (c.host("h05"), c.host("h03"))]
    ids = {}
    for _, to in pairs:
        r.api(to, "PUT", f"/v1/consumers/nat-{r.round}", {"types": [EVENT_TYPE], "from_start": True})
    for frm, to in pairs:
        e = r.api(frm, "POST", "/v1/events", {
            "type": EVENT_TYPE, "source": "testnet-nat", "correlation_id": r.round,
            "payload": {"round": r.round, "from": frm["name"], "to": to["name"]}})
        ids[frm["name"]] = e["id"]
    t0 = time.monotonic()
    for frm, to in pairs:
        name = (f"event from {frm['name']} ({where(frm)}) received by a consumer on "
                f"{to['name']} ({where(to)}) within {EVENT_S} s")
        got = consume(r, to, f"nat-{r.round}",
                      lambda evs: any(e["id"] == ids[frm["name"]] for e in evs),
                      r.left(max(1, EVENT_S - (time.monotonic() - t0))))
        seen = any(e["id"] == ids[frm["name"]] for e in got)
        r.observe(name, seen, f"after {time.monotonic() - t0:.1f} s" if seen else
                  f"not delivered; the consumer got {len(got)} {EVENT_TYPE} events")
    for _, to in pairs:
        r.api(to, "DELETE", f"/v1/consumers/nat-{r.round}")

    def everywhere():
        lack = {}
        for h in c.live_hosts():
            evs = r.api(h, "GET", f"/v1/events?types={EVENT_TYPE}&limit=1000", timeout=5)["events"]
            have = {e["id"] for e in evs}
            miss = [f for f, i in ids.items() if i not in have]
            if miss:
                lack[h["name"]] = miss
        everywhere.lack = lack
        return not lack
    everywhere.lack = None
    name = f"both events in every host's log within {EVENT_S} s"
    try:
        wait_for(everywhere, r.left(max(1, EVENT_S - (time.monotonic() - t0))), 0.5, name)
        r.observe(name, True, f"after {time.monotonic() - t0:.1f} s")
    except TestnetError as e:
        r.observe(name, False, "; ".join(f"{n} lacks the one from {', '.join(m)}"
                                         for n, m in (everywhere.lack or {}).items()) or str(e))
    st["detail"] = f"{EVENT_TYPE} {ids}"


def check_blob(r, st):
    c = r.c
    src, dst = c.host("h04"), c.host("h06")
    name = f"nat/{r.round}-from-{src['name']}"
    path = os.path.join(c.dir, "nat", r.round, f"{src['name']}.bin")
    write_random_file(path, BLOB_SIZE, seed=f"{r.round}-nat")
    res = add_blob(r, src, path, name, "BLOB_PUBLISHED")
    blob = res["blob"]
    w = next(w for w in r.api(dst, "GET", "/v1/sync")["wants"] if w["names"] == "nat/*")
    from .check import place_path
    placed = place_path(w["place"], w["names"], name, blob)
    t0 = time.monotonic()
    check = (f"a blob added on {src['name']} ({where(src)}) placed on {dst['name']} ({where(dst)}) "
             f"and verified within {BLOB_S} s")
    try:
        wait_for(lambda: os.path.exists(placed) and sha256_file(placed) == blob,
                 r.left(BLOB_S), 0.5, f"{name} placed on {dst['name']}")
        r.observe(check, True, f"after {time.monotonic() - t0:.1f} s ({BLOB_SIZE >> 20} MiB, "
                               f"sha256 {blob[:12]})")
    except TestnetError:
        sync = r.api(dst, "GET", "/v1/sync")
        fl = [f for f in sync.get("failures", []) if f.get("blob") == blob or f.get("name") == name]
        tr = [t for t in sync.get("transfers", []) if t.get("blob") == blob]
        known = any(x["name"] == name for x in r.api(dst, "GET", "/v1/blobs")["names"])
        r.observe(check, False,
                  f"not placed at {placed}; {dst['name']} "
                  + ("knows the name" if known else "does not know the name")
                  + (f"; its transfer is {tr[-1].get('state')!r} ({tr[-1].get('bytes') or 0} of "
                     f"{tr[-1].get('size')} B)" if tr else "; no transfer in flight")
                  + (f"; {len(fl)} failures, last: {fl[-1].get('reason')}" if fl else ""))
    st["detail"] = f"{name} = {blob[:12]} from {src['name']} to {dst['name']}"


def check_pair(r, st):
    c = r.c
    a, b = c.host("h05"), c.host("h06")
    t0 = time.monotonic()
    name = f"{a['name']} and {b['name']} (both behind the symmetric NAT) connected within {PAIR_S} s"

    def connected():
        v = pair_via(r, a, b)
        if None not in v:
            return v
    try:
        v = wait_for(connected, r.left(PAIR_S), 0.5, name)
        r.observe(name, True, f"after {time.monotonic() - t0:.1f} s; via {v[0]!r} / {v[1]!r}")
        st["detail"] = f"via {v[0]!r} / {v[1]!r}"
    except TestnetError as e:
        r.observe(name, False, str(e))


def pair_via(r, a, b):
    """(a's via for b, b's via for a): None where not connected, "?" where
    connected but without a `via` field (an agent without NAT support)."""
    va = {p["peer_id"]: p.get("via", "?") for p in r.api(a, "GET", "/v1/peers", timeout=5)["peers"]}
    vb = {p["peer_id"]: p.get("via", "?") for p in r.api(b, "GET", "/v1/peers", timeout=5)["peers"]}
    return va.get(b["peer_id"]), vb.get(a["peer_id"])


def check_punch(r, st):
    c = r.c
    details = []
    # The two hosts behind NAT a both listen on port 4001 and the NAT keeps
    # that public port for one of them only; two of them punching to one
    # peer at once dial the same address from that peer's one port. So the
    # cone pair checked is h07 and h08, each alone behind its NAT.
    for a_names, b, want, why in (
            (("h07",), "h08", "hole-punched", "two cone-like NATs"),
            (("h03",), "h05", "relayed", "one of them behind the symmetric NAT")):
        a_hosts, b = [c.host(a) for a in a_names], c.host(b)
        who = " or ".join(a["name"] for a in a_hosts)
        name = (f"{who} ({where(a_hosts[0])}) and {b['name']} ({where(b)}): {want!r} on both "
                f"sides ({why}) within {PUNCH_S} s")
        t0 = time.monotonic()
        last = {}

        def reached():
            for a in a_hosts:
                last[a["name"]] = pair_via(r, a, b)
                if last[a["name"]] == (want, want):
                    return a
        try:
            a = wait_for(reached, r.left(PUNCH_S), 0.5, name)
            r.observe(name, True, f"{a['name']} after {time.monotonic() - t0:.1f} s")
            details.append(f"{a['name']}-{b['name']} {want} after {time.monotonic() - t0:.1f}s")
        except TestnetError:
            seen = "; ".join(f"{n} says {v[0]!r}, {b['name']} says {v[1]!r}" for n, v in last.items())
            r.observe(name, False, f"last seen: {seen}")
            details.append(f"{who}-{b['name']}: {seen}")
    st["detail"] = "; ".join(details)


def check_leader(r, st):
    c = r.c
    t0 = time.monotonic()
    name = f"one leader agreed by every host within {LEAD_S} s"
    try:
        old, term = wait_for(lambda: r.leader(), r.left(LEAD_S), 0.5, "a leader every host agrees on")
        r.observe(name, True, f"{old['name']} ({where(old)}) term {term}")
    except TestnetError as e:
        r.observe(name, False, str(e))
        return
    c.kill(old)
    r.fault("kill -9", host=old["name"], note=f"the leader ({where(old)})")
    r.cleanup.append(lambda h=old: (not c.alive(h)) and c.start(h))
    # By name: every state change reloads the state (new dicts), so `is` lies.
    rest = [h["name"] for h in c.hosts.values() if h["voter"] and h["name"] != old["name"]]
    t_kill = time.monotonic()
    name = (f"a new leader among the remaining voters ({', '.join(rest)}) agreed by every live "
            f"host within {LEAD_S} s")

    def new_leader():
        lt = r.leader([h for h in c.hosts.values() if h["name"] != old["name"] and c.alive(h)])
        return lt if lt and lt[0]["name"] in rest else None
    try:
        new, nterm = wait_for(new_leader, r.left(LEAD_S), 0.3, "a new leader")
        r.observe(name, True, f"{new['name']} ({where(new)}) term {nterm} after "
                              f"{time.monotonic() - t_kill:.1f} s")
        st["detail"] = f"{old['name']} term {term} -> {new['name']} term {nterm}"
    except TestnetError as e:
        r.observe(name, False, str(e))
    c.start(old, timeout=max(5, min(60, r.deadline - time.monotonic())))
    r.cleanup.pop()
    r.fault("restart", host=old["name"])
    name = f"the old leader {old['name']} restarted: alive everywhere and agreeing on the leader within {LEAD_S} s"
    try:
        lt = wait_for(lambda: r.leader() if all(old["name"] in v for v in
                                                alive_views(c, list(c.hosts.values())).values()) else None,
                      r.left(LEAD_S), 0.5, f"{old['name']} back")
        r.observe(name, True, f"leader {lt[0]['name']} term {lt[1]} after {time.monotonic() - t0:.1f} s "
                              "(since the first check)")
    except TestnetError as e:
        r.observe(name, False, str(e))


def check_kill(r, st):
    c = r.c
    v = c.host("h04")
    c.kill(v)
    r.fault("kill -9", host=v["name"], note=where(v))
    r.cleanup.append(lambda h=v: (not c.alive(h)) and c.start(h))
    others = [h for h in c.hosts.values() if h["name"] != v["name"] and c.alive(h)]
    t_kill = time.monotonic()
    name = f"killed {v['name']} ({where(v)}) listed dead by every other host within {DEAD_S} s"
    try:
        wait_for(lambda: all(_state_of(r, h, v["name"]) in ("dead", "left") for h in others),
                 r.left(DEAD_S), 0.2, f"every other host to list {v['name']} dead")
        r.observe(name, True, f"after {time.monotonic() - t_kill:.1f} s")
    except TestnetError as e:
        r.observe(name, False, str(e))
    c.start(v, wait=False)
    r.cleanup.pop()
    r.fault("restart", host=v["name"])
    joined, late = wait_joined(r, [v], list(c.hosts.values()))
    t = joined[v["name"]]
    r.nat["rejoin_s"][v["name"]] = t
    r.observe(f"restarted {v['name']} alive in every host's members view within {JOIN_S} s of its start",
              joined_ok(t), joined_detail(t, late[v["name"]]))
    st["detail"] = f"{v['name']} back after {t}s" if t is not None else f"{v['name']} not back"


# ---- the report ------------------------------------------------------------------

def print_nat(nat):
    hosts = nat.get("layout", {}).get("hosts", {})
    print("NAT:")
    for n, r in nat.get("layout", {}).get("routers", {}).items():
        print(f"  router {n}: {r['addr']} -> {r['lan']}.0/24, {r['nat']} ({' '.join(r['masquerade'])})")
    print(f"  {'host':5} {'behind':7} {'addr':14} {'join s':>7}  reach")
    for n, h in hosts.items():
        j = nat["join_s"].get(n)
        reach = nat["reach"].get(n)
        if isinstance(reach, dict):
            reach = (f"{reach.get('state')} relays={len(reach.get('relays') or [])} "
                     f"external={reach.get('external')}")
        print(f"  {n:5} {h['behind'] or 'public':7} {h['addr']:14} "
              f"{(f'{j:.1f}' if j is not None else '-'):>7}  {reach or '-'}")
    for n, t in nat.get("rejoin_s", {}).items():
        print(f"  {n} rejoined after restart in {t if t is not None else '-'} s")
    if nat.get("via"):
        names = sorted(nat["via"])
        print("  via (row: the host asked; column: its peer; - not connected; ? no `via` field)")
        print("        " + " ".join(f"{n:>12}" for n in names))
        for a in names:
            row = nat["via"][a]
            cells = []
            for b in names:
                if b == a:
                    cells.append(f"{'':>12}")
                elif b not in row:
                    cells.append(f"{'-':>12}")
                else:
                    cells.append(f"{row[b] or '?':>12}")
            print(f"  {a:5} " + " ".join(cells))
