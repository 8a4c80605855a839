"""AsyncClient against real agents: every call awaited on the test's own event loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, TypeVar

import pytest

from harness import Agent, riftmesh_bin
from riftmesh import (
    AgentUnavailable,
    AsyncClient,
    BadRequest,
    Event,
    EventType,
    HandlerFailure,
    LockHeld,
    NotFound,
)

DEADLINE = 60.0
T = TypeVar("T")


async def until(what: str, fn: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Poll ``fn`` (sync or async) on the loop until it is truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_publish_batch_history_event_trace(agent: Agent, uid: str) -> None:
    async def main() -> None:
        async with AsyncClient(agent.api) as c:
            t = f"AIO_{uid}_PUB"
            r = await c.publish(t, {"n": 1}, source="aio-test")
            assert not r.duplicate and r.type == t and r.seq > 0 and r.idempotency_key
            again = await c.publish(t.lower().replace("_", "."), {"n": 1}, idempotency_key=r.idempotency_key)
            assert again.duplicate and again.id == r.id and again.duplicate_by == "idempotency_key"
            c1 = await c.publish(t, {"n": 0}, by_content=True)
            c2 = await c.publish(t, {"n": 0}, by_content=True)
            assert c2.duplicate and c2.id == c1.id and c2.duplicate_by == "content" and c2.age_ms is not None
            ev = await c.event(r.id)
            assert ev.payload == {"n": 1} and ev.source == "aio-test" and ev.node == agent.peer_id
            child = await c.publish(t, {"n": 2}, caused_by=ev)
            tr = await c.trace(child.id)
            assert [e.id for _, e in tr.events] == [r.id, child.id]
            rs = await c.publish_batch([(t, {"n": 3}), {"type": t, "payload": {"n": 4}, "source": "b"}])
            assert [x.duplicate for x in rs] == [False, False]
            assert rs[0].idempotency_key != rs[1].idempotency_key
            got = [e.payload["n"] async for e in c.history(t, page_size=2)]
            assert got == [1, 0, 2, 3, 4]
            with pytest.raises(NotFound):
                await c.event("no-such-id")

    run(main())


def test_many_publishes_in_flight_share_few_connections(agent: Agent, uid: str) -> None:
    async def main() -> None:
        c = AsyncClient(agent.api, max_connections=8)
        t = f"AIO_{uid}_MANY"
        rs = await asyncio.gather(*(c.publish(t, {"n": n}) for n in range(200)))
        assert len({r.id for r in rs}) == 200 and not any(r.duplicate for r in rs)
        # 8 connections at most, kept alive and reused for everything after.
        assert c._http.connections_opened <= 8
        before = c._http.connections_opened
        for n in range(20):
            await c.publish(t, {"seq": n})
        assert c._http.connections_opened == before
        await c.aclose()

    run(main())


def test_the_loop_runs_while_requests_wait(agent: Agent, uid: str) -> None:
    """A long poll (and a publish) awaits without blocking the event loop."""

    async def main() -> None:
        async with AsyncClient(agent.api) as c:
            await c.create_consumer(f"aio-block-{uid}", [f"AIO_{uid}_NOTHING"])
            ticks: List[float] = []

            async def ticker() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)

            tk = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            t0 = time.monotonic()
            b = await c.fetch(f"aio-block-{uid}", wait=1.0)
            r = await c.publish(f"AIO_{uid}_TICK", {"n": 1})
            took = time.monotonic() - t0
            tk.cancel()
            assert b.events == [] and took >= 0.9 and not r.duplicate
            # The ticker ran all along: a call that blocked the loop would leave a gap as long as itself.
            gaps = [y - x for x, y in zip(ticks, ticks[1:])] + [t0 + took - ticks[-1]]
            assert max(gaps) < 0.5, f"the loop stood still for {max(gaps):.2f} s during a 1 s long poll"
            assert len(ticks) >= 20

    run(main())


def test_consumer_calls_and_dead_letters(agent: Agent, uid: str) -> None:
    async def main() -> None:
        async with AsyncClient(agent.api) as c:
            name = f"aio-cons-{uid}"
            t = f"AIO_{uid}_CONS"
            info = await c.create_consumer(name, [t])
            assert info.types == [t]
            seqs = [(await c.publish(t, {"n": n})).seq for n in range(3)]
            b = await c.fetch(name, max=10)
            assert [e.seq for e in b.events] == seqs
            await c.ack(name, seqs[0])
            await c.nack(name, seqs[1], "bad one")
            b = await c.fetch(name)
            assert [e.seq for e in b.events] == [seqs[2]]
            dl = await c.dead_letters(name)
            assert [(d.seq, d.reason) for d in dl] == [(seqs[1], "bad one")]
            assert (await c.consumer(name)) is not None
            await c.delete_consumer(name)
            assert (await c.consumer(name)) is None

    run(main())


def test_run_loop_with_async_and_sync_handlers_and_on_error(agent: Agent, uid: str) -> None:
    async def main() -> None:
        c = AsyncClient(agent.api, backoff=0.05, max_backoff=0.05)
        t = f"AIO_{uid}_RUN"
        got: List[int] = []
        sync_got: List[int] = []
        failures: List[HandlerFailure] = []
        wide: List[HandlerFailure] = []

        @c.subscribe(t, consumer=f"aio-run-{uid}")
        async def h(ev: Event) -> None:
            got.append(ev.payload["n"])

        @c.subscribe(t, consumer=f"aio-run-sync-{uid}")
        def hs(ev: Event) -> None:
            sync_got.append(ev.payload["n"])

        @c.subscribe(t, consumer=f"aio-run-bad-{uid}", max_attempts=3, on_error=failures.append)
        async def bad(ev: Event) -> None:
            raise ValueError(f"no {ev.payload['n']}")

        c.on_error(wide.append)
        runner = asyncio.ensure_future(c.run())
        names = {f"aio-run-{uid}", f"aio-run-sync-{uid}", f"aio-run-bad-{uid}"}
        await until("the consumers", lambda: _has(c, names))
        for n in range(3):
            await c.publish(t, {"n": n})
        await until("the deliveries", lambda: len(got) == 3 and len(sync_got) == 3)
        await until("three dead letters", lambda: len([f for f in failures if f.final]) == 3)
        c.stop()
        await asyncio.wait_for(runner, DEADLINE)
        assert got == [0, 1, 2] and sync_got == [0, 1, 2]
        assert [(f.event.payload["n"], f.attempt, f.final) for f in failures[:3]] == [
            (0, 1, False), (0, 2, False), (0, 3, True)
        ]
        assert failures[0].retry_in == pytest.approx(0.05) and isinstance(failures[0].error, ValueError)
        assert wide == failures
        dl = await c.dead_letters(f"aio-run-bad-{uid}")
        assert len(dl) == 3 and "ValueError: no 0" in dl[0].reason
        await c.aclose()

    run(main())


async def _has(c: AsyncClient, names: set) -> bool:  # type: ignore[type-arg]
    return names <= {x.name for x in await c.consumers()}


def test_async_lock_members_leader(agent: Agent, uid: str) -> None:
    async def main() -> None:
        async with AsyncClient(agent.api) as c:
            ms = await c.members()
            assert ms[0].is_self and ms[0].peer_id == agent.peer_id
            ld = await until("a leader", lambda: _leader(c))
            assert ld.is_self and ld.term
            async with c.lock(f"aio-lock-{uid}", ttl=0.6, timeout=DEADLINE) as lock:
                token = lock.check()
                assert f"aio-lock-{uid}" in {x.name for x in await c.locks()}
                with pytest.raises(LockHeld) as ei:
                    await c.lock(f"aio-lock-{uid}", ttl=5, holder="rival").acquire()
                assert ei.value.token == token
                # Renewed by its task past its TTL.
                await until("two renewals", lambda: lock.renewals >= 2)
                assert lock.held
            assert f"aio-lock-{uid}" not in {x.name for x in await c.locks()}

    run(main())


async def _leader(c: AsyncClient) -> Optional[Any]:
    ld = await c.leader()
    return ld if ld.leader else None


def _blob_root_flag() -> bool:
    """Whether this agent has --blob-root (then it reads files by path only under one)."""
    out = subprocess.run([str(riftmesh_bin()), "agent", "--help"], capture_output=True, text=True, timeout=60).stdout
    return "--blob-root" in out


def test_async_blobs(spawn_agent: Callable[..., Agent], uid: str, tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    a = spawn_agent("py-aio-blobs", extra=["--blob-root", str(src_dir)] if _blob_root_flag() else [])
    data = os.urandom(3 << 20) + uid.encode()
    src = src_dir / "m.pth"
    src.write_bytes(data)

    async def main() -> None:
        async with AsyncClient(a.api) as c:
            added = await c.blob_add(src, name=f"models/aio-{uid}", event=EventType.MODEL_PROMOTED)
            assert added.blob == hashlib.sha256(data).hexdigest()
            assert await c.blob_get(f"models/aio-{uid}") == data
            out = await c.blob_get(added.blob, tmp_path / "o" / "copy.pth")
            assert out.read_bytes() == data
            ev = await c.event(added.event_id)
            assert await c.blob_get(ev) == data
            assert (await c.blob_info(added.blob)).state == "complete"
            forgot = await c.blob_forget(f"models/aio-{uid}")
            assert forgot["blob"] == added.blob and forgot["event"] == "BLOB_FORGOTTEN"
            with pytest.raises(NotFound):
                await c.blob_info(f"models/aio-{uid}")
            # The pooled connection still works after streaming bodies.
            assert await c.health()

    run(main())


def test_errors_are_the_sync_clients() -> None:
    async def main() -> None:
        with pytest.raises(AgentUnavailable) as ei:
            await AsyncClient("127.0.0.1:1", retry_for=0).publish("TRAINING_COMPLETED", {})
        assert ei.value.address == "127.0.0.1:1"

    run(main())


def test_bad_request(agent: Agent) -> None:
    async def main() -> None:
        async with AsyncClient(agent.api) as c:
            with pytest.raises(BadRequest) as ei:
                await c.publish("1abc", {})
            assert ei.value.status == 400 and "1abc" in ei.value.message

    run(main())


def test_a_kept_connection_survives_an_agent_restart(spawn_agent: Callable[..., Agent], uid: str) -> None:
    a = spawn_agent("py-aio-restart")

    async def main() -> None:
        c = AsyncClient(a.api, timeout=10)
        await c.publish(f"AIO_{uid}_R", {"n": 1})
        assert len(c._http._idle) == 1
        # Same port again: the idle connection in the pool is now dead.
        a.api_arg = a.api
        await asyncio.to_thread(a.restart)
        r = await c.publish(f"AIO_{uid}_R", {"n": 2})
        assert not r.duplicate
        await c.aclose()

    run(main())
