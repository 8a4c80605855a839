"""The local spool: publishes the agent could not take wait in files and are
sent again, each with its own idempotency key, exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, List

import pytest

import riftmesh.router as rr
from harness import Agent
from riftmesh import AgentUnavailable, AsyncClient, Client, FlushResult, Published, Spool, Spooled, SpoolFull
from riftmesh.router import Router
from test_aio import DEADLINE, until

FLIPS = ["running", "stopped", "running"]


def down_agent(spawn_agent: Callable[..., Agent], name: str) -> Agent:
    """A started and then killed agent that will come back on the same port."""
    a = spawn_agent(name)
    a.api_arg = a.api
    a.kill()
    return a


class InMainThread:
    """Runs a coroutine on a loop in another thread while this (the main) thread
    starts the agent when the coroutine asks (``await start()``): the harness's
    agents die with the thread that started them (PR_SET_PDEATHSIG)."""

    def __init__(self, a: Agent) -> None:
        self.a = a
        self.want = threading.Event()
        self.done = threading.Event()

    async def start(self) -> None:
        self.want.set()
        ok = await asyncio.to_thread(self.done.wait, DEADLINE)
        assert ok, "the agent did not come back"

    def run(self, main: Callable[[], Any]) -> None:
        box: List[BaseException] = []

        def loop() -> None:
            try:
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - raised below
                box.append(e)

        th = threading.Thread(target=loop)
        th.start()
        while th.is_alive():
            if self.want.wait(0.05):
                self.want.clear()
                self.a.start()
                self.done.set()
        th.join()
        if box:
            raise box[0]


def spooled(d: Path) -> List[Path]:
    return sorted(p for p in d.glob("*.json"))


def statuses(api: str, t: str) -> List[str]:
    return [e.payload["status"] for e in Client(api).history(t)]


def test_fire_and_forget_spools_while_the_agent_is_down_and_the_router_sends_it_after(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path
) -> None:
    a = down_agent(spawn_agent, "py-spool-ff")
    t = f"T{uid}_FF"
    d = tmp_path / "spool"
    m = InMainThread(a)
    returned_at_once: List[bool] = []

    async def main() -> None:
        router = Router(f"ff-{uid}", api=a.api, spool_dir=d, flush_interval=0.1)
        t0 = time.monotonic()
        first = router.fire_and_forget(t, {"status": "first"})
        returned_at_once.append(time.monotonic() - t0 < 0.5 and not spooled(d))
        assert first is not None
        await first
        await until("the first file", lambda: len(spooled(d)) == 1)
        shutil.rmtree(d)  # (only the order of the three below is looked at)
        tasks = []
        for s in FLIPS:  # one after the other: the spool's order is the calls' order
            tasks.append(router.fire_and_forget(t, {"status": s}))
            await until("its spool file", lambda: len(spooled(d)) == len(tasks))
        assert all(isinstance(x, asyncio.Task) for x in tasks)
        # Each publish is tried once, then lands in the spool; nothing raises.
        await asyncio.gather(*[x for x in tasks if x is not None])
        assert router.fire_errors == 0
        bodies = [json.loads(p.read_text())["body"] for p in spooled(d)]
        assert [b["payload"]["status"] for b in bodies] == FLIPS, "oldest first by name"
        assert len({b["idempotency_key"] for b in bodies}) == 3
        # The agent comes back; the router's background flush sends them.
        await m.start()
        await until("the spool to empty", lambda: not spooled(d))
        await router.stop()

    m.run(main)
    assert returned_at_once
    assert statuses(a.api, t) == FLIPS, "each spooled publish once, in order (the repeat too)"


def test_two_clients_flushing_one_spool_deliver_each_event_once(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path
) -> None:
    a = down_agent(spawn_agent, "py-spool-two")
    t = f"T{uid}_TWO"
    d = tmp_path / "spool"
    c1 = Client(a.api, spool_dir=d, retry_for=0)
    n = 30
    keys: List[str] = []
    for i in range(n):
        r = c1.publish_or_spool(t, {"status": FLIPS[i % 3]})  # repeats: only the keys tell them apart
        assert isinstance(r, Spooled) and Path(r.path).exists() and r.type == t
        keys.append(r.key)
    # The worst case of two flushers: one read every file before the other deleted any.
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    a.start()

    c2 = Client(a.api, spool_dir=d)
    ac = AsyncClient(a.api, spool_dir=d)
    results: List[FlushResult] = []
    go = threading.Barrier(2)

    def sync_flush() -> None:
        go.wait()
        results.append(c2.flush_spool())

    def async_flush() -> None:
        async def f() -> FlushResult:
            try:
                return await ac.flush_spool()
            finally:
                await ac.aclose()

        go.wait()
        results.append(asyncio.run(f()))

    threads = [threading.Thread(target=sync_flush), threading.Thread(target=async_flush)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(DEADLINE)
    assert len(results) == 2 and all(r.error is None and r.rejected == 0 for r in results), results
    assert sum(r.sent for r in results) == n, results
    assert not spooled(d), "a file is deleted once the agent answered it"

    late = Client(a.api, spool_dir=copy).flush_spool()
    assert (late.sent, late.duplicates, late.pending) == (0, n, 0), late
    evs = list(Client(a.api).history(t))
    assert len(evs) == n and {e.idempotency_key for e in evs} == set(keys), [e.payload for e in evs]


def test_a_refused_spooled_publish_moves_to_rejected_and_is_not_sent_again(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = down_agent(spawn_agent, "py-spool-rej")
    t = f"T{uid}_REJ"
    d = tmp_path / "spool"
    c = Client(a.api, spool_dir=d, retry_for=0)
    ok1 = c.publish_or_spool(t, {"status": "running"})
    bad = c.publish_or_spool("1abc", {"status": "bad"})  # the agent alone knows the name is bad
    ok2 = c.publish_or_spool(t, {"status": "stopped"})
    assert all(isinstance(x, Spooled) for x in (ok1, bad, ok2))
    (d / "00000000000000000000-0-corrupt.json").write_text("{not json")
    a.start()
    with caplog.at_level(logging.ERROR, logger="riftmesh"):
        r = c.flush_spool()
    assert (r.sent, r.duplicates, r.rejected, r.pending, r.error) == (2, 0, 2, 0, None), r
    assert isinstance(bad, Spooled)
    rejected = sorted(p.name for p in (d / "rejected").glob("*.json"))
    assert rejected == sorted(["00000000000000000000-0-corrupt.json", Path(bad.path).name])
    reason = (d / "rejected" / (Path(bad.path).name + ".reason")).read_text()
    assert "1abc" in reason and "well-formed" in reason
    assert any("moved to" in m for m in caplog.messages)
    again = c.flush_spool()
    assert (again.sent, again.rejected, again.pending) == (0, 0, 0), "nothing is sent again"
    assert statuses(a.api, t) == ["running", "stopped"]


def test_publish_or_spool_publishes_when_it_can_and_sends_the_spool_first(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path
) -> None:
    a = down_agent(spawn_agent, "py-spool-order")
    t = f"T{uid}_ORDER"
    d = tmp_path / "spool"
    m = InMainThread(a)

    async def main() -> None:
        async with AsyncClient(a.api, spool_dir=d, retry_for=0) as c:
            first = await c.publish_or_spool(t, {"status": "running"})
            assert isinstance(first, Spooled)
            await m.start()
            nxt = await c.publish_or_spool(t, {"status": "stopped"})
            assert isinstance(nxt, Published) and not nxt.duplicate
            assert not spooled(d)

    m.run(main)
    assert statuses(a.api, t) == ["running", "stopped"]


def test_a_full_spool_refuses_new_publishes_and_fire_and_forget_does_not_raise(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = down_agent(spawn_agent, "py-spool-full")
    t = f"T{uid}_FULL"
    d = tmp_path / "spool"
    c = Client(a.api, spool_dir=d, retry_for=0, spool_max_files=2)
    c.publish_or_spool(t, {"status": "running"})
    c.publish_or_spool(t, {"status": "stopped"})
    with pytest.raises(SpoolFull):
        c.publish_or_spool(t, {"status": "running"})
    assert c.spool.refused == 1 and len(spooled(d)) == 2

    async def main() -> None:
        ac = AsyncClient(a.api, spool_dir=d, spool_max_files=2)
        router = Router(f"full-{uid}", client=ac, flush_interval=60)
        task = router.fire_and_forget(t, {"status": "lost"})
        assert task is not None
        await task
        assert router.fire_errors == 1 and ac.spool.refused == 1
        await router.stop()

    with caplog.at_level(logging.ERROR, logger="riftmesh"):
        asyncio.run(main())
    assert any("fire_and_forget" in m and "full" in m for m in caplog.messages)
    a.start()
    assert Client(a.api, spool_dir=d).flush_spool().sent == 2
    assert statuses(a.api, t) == ["running", "stopped"]


def test_module_level_fire_and_forget_and_the_default_spool_dir(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = down_agent(spawn_agent, "py-spool-mod")
    t = f"T{uid}_MOD"
    monkeypatch.setenv("RIFTMESH_API", a.api)
    monkeypatch.setenv("RIFTMESH_SERVICE", f"mod-{uid}")
    monkeypatch.delenv("RIFTMESH_SPOOL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    d = tmp_path / "state" / "riftmesh" / "spool" / f"mod-{uid}"
    m = InMainThread(a)
    rr.reset_router()
    try:
        assert rr.get_router().client.spool.directory == d
        # No running loop: made in this thread, spooled at once.
        assert rr.fire_and_forget(t, {"status": "running"}) is None
        assert len(spooled(d)) == 1

        async def main() -> None:
            rr.fire_and_forget(t, {"status": "stopped"})
            await until("the second file", lambda: len(spooled(d)) == 2)
            await m.start()
            await rr.get_router().start()  # start flushes
            assert not spooled(d)
            await rr.get_router().stop()

        m.run(main)
    finally:
        rr.reset_router()
    assert statuses(a.api, t) == ["running", "stopped"]


PUBLISHER = """
import asyncio, sys
from riftmesh.router import Router

async def main() -> None:
    api, spool, t, name = sys.argv[1:5]
    router = Router(name, api=api, spool_dir=spool, flush_interval=0.1)
    for s in sys.argv[5:]:
        task = router.fire_and_forget(t, {"status": s})
        assert task is not None
        await task        # one after the other: spooled in the calls' order
    await router.stop()

asyncio.run(main())
"""


def test_spooled_events_survive_the_publishers_restart_and_arrive_once_in_order(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    a = down_agent(spawn_agent, "py-spool-restart")
    t = f"T{uid}_RESTART"
    d = tmp_path / "spool"
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    # A publisher process fires three events with the agent down, and exits.
    p = subprocess.run(
        [sys.executable, str(script), a.api, str(d), t, f"pub-{uid}", *FLIPS],
        capture_output=True, text=True, timeout=DEADLINE,
    )
    assert p.returncode == 0, p.stderr
    assert len(spooled(d)) == 3, p.stderr
    # The agent comes back; a new publisher process (the daemon restarted)
    # sends what the first one left, before anything of its own.
    a.start()
    p = subprocess.run(
        [sys.executable, str(script), a.api, str(d), t, f"pub-{uid}", "after"],
        capture_output=True, text=True, timeout=DEADLINE,
    )
    assert p.returncode == 0, p.stderr
    assert statuses(a.api, t) == FLIPS + ["after"], "each once, in order, the spool before the new one"
    assert not spooled(d)


def test_publish_fire_and_forget_never_raises_and_its_events_arrive_once_in_order(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = down_agent(spawn_agent, "py-spool-ffparam")
    t = f"T{uid}_FFP"
    d = tmp_path / "spool"
    monkeypatch.setenv("RIFTMESH_API", a.api)
    monkeypatch.setenv("RIFTMESH_SPOOL", str(d))
    m = InMainThread(a)
    c = Client(a.api, spool_dir=d, retry_for=0)
    with pytest.raises(AgentUnavailable):
        c.publish(t, {"n": -1})  # without it, an unreachable agent raises
    # Client: sent at once, or spooled; never raised.
    r0 = c.publish(t, {"n": 0}, fire_and_forget=True)
    assert isinstance(r0, Spooled) and c.fire_errors == 0
    with pytest.raises(ValueError):
        c.publish(t, {"n": -2}, by_content=True, fire_and_forget=True)  # no key: nothing to spool with
    rr.reset_router()

    async def main() -> None:
        async with AsyncClient(a.api, spool_dir=d) as ac:
            r1 = await ac.publish(t, {"n": 1}, fire_and_forget=True)
            assert isinstance(r1, Spooled) and ac.fire_errors == 0
        router = Router(f"ffp-{uid}", api=a.api, spool_dir=d, flush_interval=3600)
        await router.publish(t, {"n": 2}, fire_and_forget=True)  # awaited: sent or spooled by now
        router.publish(t, {"n": 3}, fire_and_forget=True)  # not awaited: it acts all the same
        await rr.publish(t, {"n": 4}, fire_and_forget=True)  # module level, on get_router()
        rr.publish(t, {"n": 5}, fire_and_forget=True)
        await until("six spool files", lambda: len(spooled(d)) == 6)
        assert router.fire_errors == 0 and rr.get_router().fire_errors == 0
        await m.start()
        later = router.publish(t, {"n": 6}, fire_and_forget=True)  # goes after the spool
        await later
        assert not spooled(d)
        await router.stop()
        await rr.get_router().stop()

    try:
        m.run(main)
    finally:
        rr.reset_router()
    evs = list(Client(a.api).history(t))
    assert [e.payload["n"] for e in evs] == list(range(7)), "each once, in call order"


def test_concurrent_fire_and_forget_calls_arrive_in_call_order(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path
) -> None:
    a = down_agent(spawn_agent, "py-spool-conc")
    t = f"T{uid}_CONC"
    d = tmp_path / "spool"
    m = InMainThread(a)
    n = 60

    async def main() -> None:
        router = Router(f"conc-{uid}", api=a.api, spool_dir=d, flush_interval=3600)
        ac = AsyncClient(a.api, spool_dir=d)
        calls: List[Any] = []
        for i in range(40):  # the router's take their place when called ...
            if i % 2:
                calls.append(router.fire_and_forget(t, {"n": i}))
            else:
                calls.append(router.publish(t, {"n": i}, fire_and_forget=True))
        # ... a coroutine's when it starts (gather starts them in order); all in flight at once.
        await asyncio.gather(*calls, *[ac.publish(t, {"n": i}, fire_and_forget=True) for i in range(40, n)])
        assert router.fire_errors == 0 and ac.fire_errors == 0
        files = [json.loads(p.read_text())["body"]["payload"]["n"] for p in spooled(d)]
        assert files == list(range(n)), "spooled in call order"
        await m.start()
        # Calls made while the spool still holds the first ones go behind them.
        await asyncio.gather(*[ac.publish(t, {"n": i}, fire_and_forget=True) for i in range(n, n + 20)])
        assert not spooled(d)
        await ac.aclose()
        await router.stop()

    m.run(main)
    got = [e.payload["n"] for e in Client(a.api).history(t)]
    assert got == list(range(n + 20)), "each once, in call order"


def test_fire_and_forget_from_threads_keeps_each_threads_order_and_sends_each_once(
    spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path
) -> None:
    a = down_agent(spawn_agent, "py-spool-threads")
    t = f"T{uid}_THREADS"
    d = tmp_path / "spool"
    c = Client(a.api, spool_dir=d)
    go = threading.Barrier(6)
    out: List[Any] = []

    def publisher(k: int) -> None:
        go.wait()
        for i in range(15):
            out.append(c.publish(t, {"th": k, "i": i}, fire_and_forget=True))

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(DEADLINE)
    assert len(out) == 90 and all(isinstance(r, Spooled) for r in out) and c.fire_errors == 0
    a.start()
    r = c.flush_spool()
    assert (r.sent, r.pending, r.error) == (90, 0, None), r
    evs = [(e.payload["th"], e.payload["i"]) for e in Client(a.api).history(t)]
    assert sorted(evs) == sorted((k, i) for k in range(6) for i in range(15)), "each once"
    for k in range(6):
        assert [i for th, i in evs if th == k] == list(range(15)), f"thread {k} in its order"


def test_a_blocking_spooling_publish_on_an_event_loops_thread_does_not_hang(tmp_path: Path) -> None:
    """A task of the loop holds the spool's turn; the blocking Client, called
    on that loop's thread, cannot wait for it (the loop would never give it on)."""
    d = tmp_path / "spool"
    out: List[Any] = []

    async def main() -> None:
        ac = AsyncClient("127.0.0.1:1", spool_dir=d)
        task = asyncio.ensure_future(ac.publish("T_LOOP", {"n": 0}, fire_and_forget=True))
        await asyncio.sleep(0)  # its first step: it has the turn and waits for a worker thread
        assert ac.spool.line.waiting == 1
        out.append(Client("127.0.0.1:1", spool_dir=d).publish("T_LOOP", {"n": 1}, fire_and_forget=True))
        out.append(await task)
        await ac.aclose()

    th = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    th.start()
    th.join(DEADLINE)
    assert not th.is_alive(), "the event loop's thread hangs"
    assert len(out) == 2 and all(isinstance(r, Spooled) for r in out)


def test_a_forked_child_has_a_line_of_its_own(tmp_path: Path) -> None:
    # The parent holds its turn across the fork; a child that inherited the
    # parent's line would wait for a turn no thread of its own will give on.
    line = Spool(tmp_path / "spool").line
    place = line.take()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = Spool(tmp_path / "spool").line
            p = child.take()
            child.wait(p)
            child.leave(p)
            code = 0
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 10
        done, status = os.waitpid(pid, os.WNOHANG)
        while not done and time.monotonic() < deadline:
            time.sleep(0.02)
            done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waited on its parent's line")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        line.leave(place)
