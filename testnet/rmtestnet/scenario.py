"""A whole pipeline round while faults happen.

selfplay hosts publish game batches (GAME_BATCH_READY blobs) -> training
hosts pull them (want games/*) and publish candidates + TRAINING_COMPLETED ->
the evaluator fetches the candidates and publishes EVALUATION_COMPLETED ->
the leader (GET /v1/leader, holding the `promote` lock and its fencing token)
publishes MODEL_PROMOTED -> every host places the model (MODEL_DISTRIBUTED).
Faults: kill -9 + restart of a training host during selfplay, a partition
(leader + a training host cut off) during training and evaluation, healed
once both sides have seen it; optionally SIGSTOP of a host and link shaping.

What each fault must make the cluster observe is an invariant with a time
bound, not a note: the killed agent declared dead by every other agent
within 30 s, the partition seen by both sides within 45 s, a leader agreed
in the majority within 30 s, the paused agent seen as not alive within
30 s. A fault that cannot run as asked (delay/loss without sch_netem) is
replaced by one that can (the link rate alone), and the report says so.
"""

import hashlib
import json
import os
import time

from . import faults as F
from .check import check, place_path
from .cluster import Cluster
from .util import (ApiError, TestnetError, log, parse_size, sha256_file, wait_for,
                   write_random_file)


class Round:
    def __init__(self, c, args):
        self.c = c
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.deadline
        self.stages = []
        self.faults = []
        self.notes = []
        self.observations = []     # each fault's expected observation: invariants
        self.cfg = args.config_name
        self.round = f"r{int(time.time())}"
        self.cleanup = []          # callables undoing faults still in place

    def rel(self):
        return round(time.monotonic() - self.t0, 2)

    def left(self, cap=None):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TestnetError("scenario deadline reached")
        return time.monotonic() + (min(left, cap) if cap else left)

    def stage(self, name):
        return _Stage(self, name)

    def fault(self, what, **kw):
        kw = {k: v for k, v in kw.items() if v is not None}
        self.faults.append(dict(at_s=self.rel(), fault=what, **kw))
        log(f"fault @{self.rel():.1f}s: {what} {json.dumps(kw)}")

    def observe(self, name, ok, detail):
        """Record the observation a fault must produce as an invariant."""
        self.observations.append({"invariant": name, "ok": bool(ok), "detail": detail,
                                  "at_s": self.rel()})
        log(f"{'observed' if ok else 'NOT observed'}: {name}: {detail}")

    def live(self):
        return self.c.live_hosts()

    def api(self, h, method, path, body=None, timeout=15):
        return self.c.api(h, method, path, body, timeout)

    def by_role(self, role):
        return [h for h in self.c.hosts.values() if h["role"] == role]

    def leader(self, among=None):
        """The leader every live agent (or `among`) agrees on."""
        views = set()
        for h in among or self.live():
            l = self.api(h, "GET", "/v1/leader", timeout=5)
            views.add((l.get("leader"), l.get("term")))
        if len(views) == 1:
            name, term = next(iter(views))
            if name:
                return self.c.host(name), term
        return None


class _Stage:
    def __init__(self, r, name):
        self.r, self.name = r, name

    def __enter__(self):
        self.start = self.r.rel()
        log(f"stage {self.name} (@{self.start:.1f}s)")
        self.rec = {"stage": self.name, "start_s": self.start, "ok": False}
        self.r.stages.append(self.rec)
        return self.rec

    def __exit__(self, et, ev, tb):
        self.rec["seconds"] = round(self.r.rel() - self.start, 2)
        self.rec["ok"] = et is None
        if et is not None:
            self.rec["error"] = str(ev)


def add_blob(r, h, path, name, event):
    return r.api(h, "POST", "/v1/blobs", {"path": path, "name": name, "event": event}, timeout=120)


def blob_complete(r, h, name):
    try:
        return r.api(h, "GET", f"/v1/blob?ref={name}", timeout=5).get("state") == "complete"
    except ApiError as e:
        if e.status == 404:
            return False
        raise


def run_scenario(args):
    c = Cluster(args.state)
    started = False
    if not (c.exists() and c.load() and c.live_hosts()):
        from .cli import up
        log("no running testnet: bringing one up for the scenario")
        up(args)
        c = Cluster(args.state).load()
        started = True
    r = Round(c, args)
    ok = False
    invariants = []
    try:
        try:
            play(r)
        finally:
            undo_faults(r)
        with r.stage("invariants") as st:
            good, results, waited = check(c, wait=max(5, min(180, r.deadline - time.monotonic())))
            invariants = [x.as_dict() for x in results]
            st["detail"] = f"{'all hold' if good else 'FAILED'} after {waited:.1f}s"
            if not good:
                raise TestnetError("invariants failed")
        missed = [o["invariant"] for o in r.observations if not o["ok"]]
        if missed:
            raise TestnetError(f"fault observations failed: {'; '.join(missed)}")
        ok = True
    except TestnetError as e:
        log(f"scenario failed: {e}")
        if not invariants:
            try:
                _, results, _ = check(c, wait=0, quiet=True)
                invariants = [x.as_dict() for x in results]
            except Exception as e2:  # report what we can
                r.notes.append(f"final check failed to run: {e2}")
        r.notes.append(str(e))
    finally:
        report = make_report(r, ok, invariants)
        print_report(report)
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=1)
        if args.json:
            print(json.dumps(report, indent=1))
        if started and not args.keep:
            from .cluster import teardown
            teardown(c.dir)
    return 0 if ok else 1


def undo_faults(r):
    """Whatever is still in place (after an error): heal, unshape, resume,
    restart killed hosts."""
    c = r.c
    for fn in reversed(r.cleanup):
        try:
            fn()
        except Exception as e:
            log(f"cleanup step failed: {e}")
    r.cleanup.clear()


def play(r):
    c, a = r.c, r.args
    want = set((a.faults or "").split(",")) - {""}
    unknown = want - {"kill", "partition", "pause", "shape"}
    if unknown:
        raise TestnetError(f"unknown faults {sorted(unknown)}")
    sp, tr = r.by_role("selfplay"), r.by_role("training")
    ev = (r.by_role("eval") or [h for h in c.hosts.values() if h not in sp + tr] or tr)[0]
    if not sp or not tr:
        raise TestnetError("the scenario needs at least one selfplay and one training host")
    voters = [h for h in c.hosts.values() if h["voter"]]
    work = os.path.join(c.dir, "scenario", r.round)
    os.makedirs(work, exist_ok=True)

    with r.stage("formed") as st:
        lt = wait_for(lambda: r.leader(), r.left(120), 0.5, "a leader every agent agrees on")
        st["detail"] = f"leader {lt[0]['name']} term {lt[1]}"
    leader0 = lt[0]

    # Fault plan.
    nonvoter_tr = [h for h in tr if not h["voter"]]
    part_tr = (nonvoter_tr or tr)[-1]
    victim = next((h for h in tr if h is not part_tr), part_tr)
    shaped = None

    # 1. selfplay
    batch_names = []
    with r.stage("selfplay") as st:
        n = 0
        bsize = parse_size(a.batch_size)
        for b in range(a.batches):
            for h in sp:
                n += 1
                name = f"games/{r.cfg}/batch-{r.round}-{n:04d}"
                path = os.path.join(work, h["name"], f"batch-{n:04d}.bin")
                write_random_file(path, bsize, seed=f"{r.round}-{name}")
                res = add_blob(r, h, path, name, "GAME_BATCH_READY")
                batch_names.append((name, res["blob"], h["name"]))
            if b == 0 and "kill" in want:
                c.kill(victim)
                r.fault("kill -9", host=victim["name"], note="training host, while batches are published")
                r.cleanup.append(lambda v=victim: (not c.alive(v)) and c.start(v))
                others = [h for h in r.live() if h is not victim]
                t_kill = time.monotonic()
                name = f"killed agent {victim['name']} declared dead by every other agent within 30 s"
                try:
                    wait_for(lambda: all(_state_of(r, h, victim["name"]) in ("dead", "left")
                                         for h in others), r.left(30), 0.2,
                             f"every other agent to declare {victim['name']} dead")
                    r.fault("declared dead", host=victim["name"], note="by every other agent")
                    r.observe(name, True, f"after {time.monotonic() - t_kill:.1f} s")
                except TestnetError as e:
                    r.observe(name, False, str(e))
        if "shape" in want:
            shaped = next((h for h in sp if h is not leader0), sp[0])
            try:
                F.shape(c, shaped, a.shape_delay, a.shape_loss, a.shape_rate)
                r.fault("shape", host=shaped["name"], delay=a.shape_delay, loss=a.shape_loss, rate=a.shape_rate)
            except TestnetError as e:
                # No sch_netem here: the fault is replaced by the rate alone
                # (tbf), and the report lists it under faults replaced.
                F.shape(c, shaped, None, None, a.shape_rate)
                r.fault("shape", host=shaped["name"], rate=a.shape_rate,
                        replaced=f"delay {a.shape_delay} / loss {a.shape_loss} not applied ({e}): rate only")
            r.cleanup.append(lambda h=shaped: F.unshape(c, h))
        st["detail"] = f"{len(batch_names)} batches of {a.batch_size} from {', '.join(h['name'] for h in sp)}"

    if "kill" in want:
        with r.stage("restart") as st:
            c.start(victim, timeout=max(10, r.deadline - time.monotonic()))
            F.reapply_api_partition(c, victim)
            r.fault("restart", host=victim["name"], note="same data dir and address")
            r.cleanup.pop()
            st["detail"] = f"{victim['name']} back (pid {victim['pid']})"

    # 2. game sync to the training hosts
    with r.stage("games to trainers") as st:
        def all_games():
            return all(blob_complete(r, h, name) for h in tr for name, _, _ in batch_names)
        wait_for(all_games, r.left(), 1.0, "every training host to hold every game batch")
        st["detail"] = f"{len(batch_names)} batches complete on {', '.join(h['name'] for h in tr)}"

    # 3. training, with the partition starting now
    part = None
    if "partition" in want:
        lead, _ = wait_for(lambda: r.leader(), r.left(60), 0.5, "a leader")
        minority = [lead] + ([part_tr] if part_tr is not lead else
                             [h for h in c.hosts.values() if not h["voter"] and h is not lead][:1])
        # At most a minority of voters on the small side.
        while sum(1 for h in minority if h["voter"]) > len(voters) // 2:
            minority.pop()
        majority = [h for h in c.hosts.values() if h not in minority]
        part = (minority, majority)
        F.partition(c, [",".join(h["name"] for h in minority), ",".join(h["name"] for h in majority)],
                    a.partition_method)
        r.fault("partition", groups=[[h["name"] for h in minority], [h["name"] for h in majority]],
                method=c.s["partition"]["method"], note="leader and a training host cut off")
        r.cleanup.append(lambda: c.s.get("partition") and F.heal(c))

    candidates = {}
    with r.stage("training") as st:
        msize = parse_size(a.model_size)
        for h in tr:
            name = f"candidates/{r.cfg}/{r.round}-{h['name']}"
            path = os.path.join(work, h["name"], "candidate.bin")
            write_random_file(path, msize, seed=f"{r.round}-{h['name']}-model")
            res = add_blob(r, h, path, name, "BLOB_PUBLISHED")
            games = [n for n, _, _ in batch_names]
            ev_ = r.api(h, "POST", "/v1/events", {
                "type": "TRAINING_COMPLETED", "source": "trainer", "correlation_id": r.round,
                "payload": {"round": r.round, "config": r.cfg, "host": h["name"], "candidate": name,
                            "blob": res["blob"], "games": len(games),
                            "games_digest": hashlib.sha256("\n".join(games).encode()).hexdigest()}})
            candidates[h["name"]] = {"name": name, "blob": res["blob"], "event": ev_["id"]}
        st["detail"] = f"{len(candidates)} candidates ({a.model_size}) + TRAINING_COMPLETED"

    if part:
        with r.stage("partition observed") as st:
            minority, majority = part

            def seen():
                for side, other in ((minority, majority), (majority, minority)):
                    for h in side:
                        if not c.alive(h):
                            continue
                        m = r.api(h, "GET", "/v1/members", timeout=5)["members"]
                        alive = {x.get("name") for x in m if x["state"] == "alive"}
                        if any(o["name"] in alive for o in other):
                            return False
                return True
            t_part = time.monotonic()
            name = "partition seen by both sides (the other side not alive) within 45 s"
            try:
                wait_for(seen, r.left(45), 0.5, "both sides to see the other side as not alive")
                st["detail"] = "each side sees the other as suspect/dead"
                r.observe(name, True, f"after {time.monotonic() - t_part:.1f} s")
            except TestnetError as e:
                st["detail"] = f"not observed within 45 s: {e}"
                r.observe(name, False, str(e))
            t_lead = time.monotonic()
            name = "the majority agrees on a leader of its own within 30 s"
            try:
                def majority_leader():
                    lt = r.leader([h for h in majority if c.alive(h)])
                    return lt if lt and lt[0] in majority else None
                nl = wait_for(majority_leader, r.left(30), 0.5, "a leader in the majority")
                st["detail"] += f"; majority leader {nl[0]['name']} term {nl[1]}"
                r.observe(name, True, f"{nl[0]['name']} term {nl[1]} after {time.monotonic() - t_lead:.1f} s")
            except TestnetError as e:
                st["detail"] += "; no leader agreed in the majority within 30 s"
                r.observe(name, False, str(e))
        F.heal(c)
        r.fault("heal")
        r.cleanup.pop()

    # 4. evaluation
    winner = None
    with r.stage("evaluation") as st:
        cons = f"eval-{r.round}"
        r.api(ev, "PUT", f"/v1/consumers/{cons}", {"types": ["TRAINING_COMPLETED"], "from_start": True})
        got = {}
        paused = None
        if "pause" in want:
            paused = next((h for h in sp if h is not ev and c.alive(h)), None)
            if paused:
                c.pause(paused)
                r.fault("pause (SIGSTOP)", host=paused["name"])
                r.cleanup.append(lambda h=paused: c.alive(h) and c.resume(h))
        while len(got) < len(tr):
            if time.monotonic() > r.deadline:
                raise TestnetError(f"evaluator saw TRAINING_COMPLETED from {sorted(got)} only")
            b = r.api(ev, "GET", f"/v1/consumers/{cons}/events?max=100&wait_ms=5000", timeout=20)
            for e in b["events"]:
                p = e["payload"]
                if p.get("round") == r.round:
                    got[p["host"]] = p
            if b["events"]:
                r.api(ev, "POST", f"/v1/consumers/{cons}/ack", {"seq": b["events"][-1]["seq"]})
        if paused:
            others = [h for h in r.live() if h is not paused]
            name = f"paused agent {paused['name']} seen as not alive by every other agent within 30 s"
            t_pause = time.monotonic()
            try:
                wait_for(lambda: all(_state_of(r, h, paused["name"]) != "alive" for h in others),
                         r.left(30), 0.5, f"{paused['name']} seen as not alive")
                r.observe(name, True, f"after {time.monotonic() - t_pause:.1f} s")
            except TestnetError as e:
                r.observe(name, False, str(e))
            c.resume(paused)
            r.fault("resume (SIGCONT)", host=paused["name"])
            r.cleanup.pop()
        scores = {}
        for host, p in sorted(got.items()):
            r.api(ev, "POST", "/v1/blob/fetch", {"ref": p["candidate"]})
            wait_for(lambda: blob_complete(r, ev, p["candidate"]), r.left(), 0.5,
                     f"evaluator to fetch {p['candidate']}")
            scores[host] = 1400 + int(p["blob"][:4], 16) % 200
        best = max(scores, key=lambda k: (scores[k], k))
        winner = got[best]
        r.api(ev, "DELETE", f"/v1/consumers/{cons}")
        res = r.api(ev, "POST", "/v1/events", {
            "type": "EVALUATION_COMPLETED", "source": "evaluator", "correlation_id": r.round,
            "payload": {"round": r.round, "config": r.cfg, "scores": scores, "winner": winner["candidate"],
                        "blob": winner["blob"]}})
        st["detail"] = f"{ev['name']} scored {scores}; winner {best}; event {res['id']}"

    # 5. promotion by the leader, under the promote lock
    with r.stage("promotion") as st:
        lead, term = wait_for(lambda: r.leader(), r.left(60), 0.5, "a leader every agent agrees on")
        lock = None

        def acquire():
            nonlocal lock
            try:
                lock = r.api(lead, "POST", f"/v1/locks/promote-{r.cfg}/acquire",
                             {"ttl_secs": 60, "holder": f"promoter@{lead['name']}"})
                return lock.get("granted")
            except ApiError as e:
                if e.status in (409, 503):
                    return False
                raise
        wait_for(acquire, r.left(60), 0.5, "the promote lock")
        token = lock["token"]
        # The promoter sees the evaluation on its own agent first.
        wait_for(lambda: any(e["payload"].get("round") == r.round for e in
                             r.api(lead, "GET", "/v1/events?types=EVALUATION_COMPLETED&limit=1000")["events"]),
                 r.left(), 0.5, "EVALUATION_COMPLETED at the leader")
        r.api(lead, "POST", "/v1/blob/fetch", {"ref": winner["candidate"]})
        wait_for(lambda: blob_complete(r, lead, winner["candidate"]), r.left(), 0.5, "the winner at the leader")
        out = os.path.join(work, lead["name"], "promoted.bin")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(r.c.api(lead, "GET", f"/v1/blob/content?ref={winner['candidate']}", timeout=120, raw=True))
        if sha256_file(out) != winner["blob"]:
            raise TestnetError("content of the winning candidate does not hash to its blob id")
        # Still the lock holder (fencing): renew with the token before promoting.
        ren = r.api(lead, "POST", f"/v1/locks/promote-{r.cfg}/renew", {"token": token})
        if not ren.get("granted"):
            raise TestnetError(f"lost the promote lock before promoting: {ren}")
        res = add_blob(r, lead, out, f"models/{r.cfg}", "MODEL_PROMOTED")
        model_blob = res["blob"]
        r.api(lead, "POST", f"/v1/locks/promote-{r.cfg}/release", {"token": token})
        st["detail"] = (f"leader {lead['name']} (term {term}) with lock token {token} promoted "
                        f"models/{r.cfg} = {model_blob[:12]} (event {res['event_id']})")

    # 6. distribution
    with r.stage("distribution") as st:
        hosts = list(c.hosts.values())

        def placed(h):
            w = next(w for w in r.api(h, "GET", "/v1/sync")["wants"] if w["names"] == "models/*")
            p = place_path(w["place"], w["names"], f"models/{r.cfg}", model_blob)
            return os.path.exists(p) and sha256_file(p) == model_blob

        wait_for(lambda: all(placed(h) for h in hosts), r.left(), 1.0,
                 "the model placed and verified on every host")
        t_placed = r.rel()

        def distributed():
            evs = r.api(ev, "GET", "/v1/events?types=MODEL_DISTRIBUTED&limit=1000")["events"]
            hs = {e["payload"].get("host") for e in evs if e["payload"].get("blob") == model_blob}
            return hs >= {h["name"] for h in hosts} and hs
        try:
            hs = wait_for(distributed, r.left(60), 1.0, "MODEL_DISTRIBUTED from every host")
            st["detail"] = (f"placed on all {len(hosts)} hosts by {t_placed:.1f}s; "
                            f"MODEL_DISTRIBUTED from {len(hs)} hosts")
        except TestnetError:
            evs = r.api(ev, "GET", "/v1/events?types=MODEL_DISTRIBUTED&limit=1000")["events"]
            hs = sorted({e["payload"].get("host") for e in evs if e["payload"].get("blob") == model_blob})
            missing = sorted({h["name"] for h in hosts} - set(hs))
            raise TestnetError(f"model placed everywhere but MODEL_DISTRIBUTED missing from {missing} "
                               f"(seen from {hs})")
    r.model_blob = model_blob
    # Transfers that failed on the way (retried by the agents), for the report.
    fails = r.api(ev, "GET", "/v1/events?types=DATA_SYNC_FAILED,MODEL_DISTRIBUTION_FAILED&limit=1000")["events"]
    mine = [e["payload"] for e in fails if r.round in str(e["payload"].get("name", e["payload"].get("names", "")))
            or e["payload"].get("blob") == model_blob]
    for p in mine:
        r.notes.append(f"sync failure on {p.get('host')} for {p.get('name') or p.get('names')}: {p.get('reason')}")


def _state_of(r, h, name):
    for m in r.api(h, "GET", "/v1/members", timeout=5)["members"]:
        if m.get("name") == name:
            return m["state"]
    return None


def make_report(r, ok, invariants):
    obs = [{k: v for k, v in o.items() if k != "at_s"} for o in r.observations]
    return {"ok": ok and all(o["ok"] for o in obs), "round": r.round, "config": r.cfg,
            "hosts": len(r.c.hosts), "total_s": r.rel(), "stages": r.stages, "faults": r.faults,
            "faults_replaced": [f for f in r.faults if f.get("replaced")],
            "invariants": obs + invariants, "notes": r.notes}


def print_report(rep):
    print()
    print(f"== scenario {rep['round']} ({rep['hosts']} hosts, config {rep['config']}): "
          f"{'PASS' if rep['ok'] else 'FAIL'} in {rep['total_s']:.1f}s ==")
    print("stages:")
    print(f"  {'stage':22} {'start':>7} {'secs':>7}  result")
    for s in rep["stages"]:
        print(f"  {s['stage']:22} {s['start_s']:7.1f} {s.get('seconds', 0):7.1f}  "
              f"{'ok' if s['ok'] else 'FAILED'}  {s.get('detail', '')}{'  ' + s['error'] if s.get('error') else ''}")
    print("faults:")
    for f in rep["faults"]:
        rest = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("at_s", "fault"))
        print(f"  @{f['at_s']:7.1f}s  {f['fault']}  {rest}")
    if not rep["faults"]:
        print("  none")
    for f in rep.get("faults_replaced", []):
        print(f"  REPLACED: {f['fault']} on {f.get('host')}: {f['replaced']}")
    print("invariants:")
    for i in rep["invariants"]:
        print(f"  {'PASS' if i['ok'] else 'FAIL'}  {i['invariant']}: {i['detail']}")
    for n in rep["notes"]:
        print(f"note: {n}")
