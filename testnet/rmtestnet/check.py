"""Cluster invariants, read from every live agent's API."""

import fnmatch
import os
import time

from .util import ApiError, TestnetError, log, sha256_file


class Result:
    def __init__(self, name, ok, detail):
        self.name, self.ok, self.detail = name, ok, detail

    def line(self):
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"

    def as_dict(self):
        return {"invariant": self.name, "ok": self.ok, "detail": self.detail}


def _all_events(c, h, timeout=15, max_pages=500):
    """Every retained event on h: list of (id, hash, type, source)."""
    out, after = [], 0
    for _ in range(max_pages):
        r = c.api(h, "GET", f"/v1/events?after={after}&limit=1000", timeout=timeout)
        for e in r["events"]:
            out.append(e)
        if r["next_after"] >= r["head"] or r["next_after"] <= after:
            break
        after = r["next_after"]
    return out


def check_once(c, verify_files=True):
    results = []
    hosts = list(c.hosts.values())
    live = c.live_hosts()
    down = [h["name"] for h in hosts if h not in live]
    results.append(Result("live agents", len(live) > 0,
                          f"{len(live)} live ({', '.join(h['name'] for h in live)})"
                          + (f"; not live: {', '.join(down)}" if down else "")))
    if not live:
        return results
    live_names = sorted(h["name"] for h in live)

    # Read everything first.
    data, errors = {}, {}
    for h in live:
        try:
            d = {}
            d["members"] = c.api(h, "GET", "/v1/members")
            try:
                d["leader"] = c.api(h, "GET", "/v1/leader")
            except ApiError as e:
                d["leader"] = {"error": str(e)}
            d["events"] = _all_events(c, h)
            d["blobs"] = c.api(h, "GET", "/v1/blobs")
            d["sync"] = c.api(h, "GET", "/v1/sync")
            data[h["name"]] = d
        except (ApiError, OSError, ValueError) as e:
            errors[h["name"]] = str(e)
    results.append(Result("API reachable", not errors,
                          "every live agent answered" if not errors else
                          "; ".join(f"{n}: {e}" for n, e in sorted(errors.items()))))
    names = [n for n in live_names if n in data]
    if not names:
        return results

    # 1. Membership: every live agent sees exactly the live agents as alive.
    bad = []
    for n in names:
        alive = sorted(m.get("name") or m["peer_id"] for m in data[n]["members"]["members"]
                       if m["state"] == "alive")
        if alive != live_names:
            extra = sorted(set(alive) - set(live_names))
            missing = sorted(set(live_names) - set(alive))
            bad.append(f"{n} sees alive {alive}"
                       + (f" (extra {extra})" if extra else "")
                       + (f" (missing {missing})" if missing else ""))
    results.append(Result("members agree", not bad,
                          f"all {len(names)} see alive = {live_names}" if not bad else "; ".join(bad)))

    # 2. Leader: exactly one, same name and term everywhere.
    views = {n: data[n]["leader"] for n in names}
    seen = {(v.get("leader"), v.get("term")) for v in views.values()}
    # is_self is the claim; role stays "leader" on a cut-off leader that no
    # longer claims (with a note), so it is not counted.
    selfs = sorted(n for n, v in views.items() if v.get("is_self"))
    errs = {n: v["error"] for n, v in views.items() if "error" in v}
    ok = not errs and len(seen) == 1 and None not in next(iter(seen)) and len(selfs) == 1 \
        and selfs[0] == next(iter(seen))[0]
    if ok:
        lead, term = next(iter(seen))
        detail = f"{lead} term {term}, agreed by all {len(names)}"
    else:
        parts = [f"{n}: {v.get('leader')}/term {v.get('term')}/{v.get('role')}"
                 if "error" not in v else f"{n}: {v['error']}" for n, v in sorted(views.items())]
        detail = f"claiming leadership: {selfs or 'none'}; views: " + "; ".join(parts)
    results.append(Result("one leader", ok, detail))

    # 3. Events: every event (content hash) on any live agent is on every
    #    live agent, exactly once. Identity is the content hash: the same fact
    #    published by two agents at once (HOST_OFFLINE of a killed host, say)
    #    has one hash but two ids, and each agent keeps the copy it accepted
    #    first, so ids legitimately differ between logs.
    union = {}
    dup = []
    per = {}
    for n in names:
        ids, hashes = {}, {}
        for e in data[n]["events"]:
            ids[e["id"]] = ids.get(e["id"], 0) + 1
            hashes[e["hash"]] = hashes.get(e["hash"], 0) + 1
            union.setdefault(e["hash"], (e["id"], e["type"], n))
        d_ids = [i for i, k in ids.items() if k > 1]
        d_h = [x for x, k in hashes.items() if k > 1]
        if d_ids or d_h:
            dup.append(f"{n}: {len(d_ids)} ids and {len(d_h)} hashes more than once "
                       f"(e.g. {(d_ids or d_h)[:3]})")
        per[n] = set(hashes)
    results.append(Result("events once", not dup,
                          "no event id or content hash twice in any log" if not dup else "; ".join(dup)))
    missing = []
    for n in names:
        lack = set(union) - per[n]
        if lack:
            ex = sorted(lack)[:3]
            missing.append(f"{n} lacks {len(lack)} (e.g. " + ", ".join(
                f"{union[x][1]} {union[x][0]} hash {x[:12]} seen on {union[x][2]}" for x in ex) + ")")
    total = sum(len(data[n]["events"]) for n in names)
    results.append(Result("events everywhere", not missing,
                          f"{len(union)} distinct events (content hashes) on all {len(names)} live agents"
                          if not missing else "; ".join(missing)))

    # 4. Blobs: each wanted name is present (complete) on each wanting agent,
    #    pointing at the same blob everywhere, and its placed file matches.
    newest = {}
    for n in names:
        for r in data[n]["blobs"]["names"]:
            cur = newest.get(r["name"])
            if cur is None or (r["updated_ms"], r["event_id"]) > (cur["updated_ms"], cur["event_id"]):
                newest[r["name"]] = dict(r, seen_on=n)
    bad, checked = [], 0
    for n in names:
        h = c.host(n)
        wants = [w for w in data[n]["sync"]["wants"] if w.get("active")]
        mine = {r["name"]: r for r in data[n]["blobs"]["names"]}
        for name, rec in sorted(newest.items()):
            w = next((w for w in wants if fnmatch.fnmatchcase(name, w["names"])), None)
            if w is None:
                continue
            checked += 1
            m = mine.get(name)
            if m is None:
                bad.append(f"{n}: wants {name} but does not know the name")
                continue
            if m["blob"] != rec["blob"]:
                bad.append(f"{n}: {name} -> {m['blob'][:12]}, newest is {rec['blob'][:12]} (on {rec['seen_on']})")
                continue
            if not m.get("present"):
                st = next((t for t in data[n]["sync"]["transfers"] if t.get("blob") == m["blob"]), None)
                fl = [f for f in data[n]["sync"]["failures"] if f.get("blob") == m["blob"]]
                bad.append(f"{n}: {name} not complete"
                           + (f" (transfer {st.get('state')}, {st.get('bytes')}/{st.get('size')} B)" if st else "")
                           + (f" (last failure: {fl[-1].get('reason')})" if fl else ""))
                continue
            if w.get("place") and verify_files:
                path = place_path(w["place"], w["names"], name, m["blob"])
                if not os.path.exists(path):
                    bad.append(f"{n}: {name} complete but not placed at {path}")
                elif sha256_file(path) != m["blob"]:
                    bad.append(f"{n}: placed {path} has sha256 {sha256_file(path)[:12]}, blob is {m['blob'][:12]}")
    results.append(Result("wanted blobs present", not bad,
                          f"{checked} (agent, wanted name) pairs complete and verified, "
                          f"{len(newest)} names known" if not bad else "; ".join(bad[:8])
                          + (f" … and {len(bad) - 8} more" if len(bad) > 8 else "")))
    return results


def place_path(template, pattern, name, blob):
    pre, star, post = pattern.partition("*")
    if star:
        m = name[len(pre):]
        lit = post.rsplit("*", 1)[-1]
        if lit and m.endswith(lit):
            m = m[: -len(lit)]
    else:
        m = name
    return template.replace("{name}", m).replace("{full}", name).replace("{blob}", blob)


def check(c, wait=0, interval=2.0, quiet=False, verify_files=True):
    """Run the checks; with wait > 0 repeat until all pass or wait seconds
    passed. Returns (ok, results, seconds waited)."""
    t0 = time.monotonic()
    deadline = t0 + wait
    attempt = 0
    while True:
        attempt += 1
        results = check_once(c, verify_files=verify_files)
        ok = all(r.ok for r in results)
        if ok or time.monotonic() >= deadline:
            return ok, results, time.monotonic() - t0
        if not quiet:
            failing = ", ".join(r.name for r in results if not r.ok)
            log(f"check attempt {attempt}: failing: {failing}; retrying until the deadline "
                f"({deadline - time.monotonic():.0f}s left)")
        time.sleep(min(interval, max(0.1, deadline - time.monotonic())))
