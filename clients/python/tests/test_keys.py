"""Idempotency keys: repeats are new facts, retries are not (proto-notes/events.md §13)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Callable, Dict, List, Tuple

import pytest

import riftmesh.router as rr
from harness import Agent, wait_until
from riftmesh import AsyncClient, Client, Event, Published
from riftmesh.router import Router
from test_aio import DEADLINE


class RetryLog(logging.Handler):
    """Counts the clients' "retrying with the same key" log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying with the same key" in record.getMessage():
            self.retries += 1


@pytest.fixture
def retry_log() -> Any:
    h = RetryLog()
    lg = logging.getLogger("riftmesh")
    old = lg.level
    lg.setLevel(logging.INFO)
    lg.addHandler(h)
    try:
        yield h
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


def test_a_status_that_flips_back_is_delivered_every_time(agent: Agent, uid: str) -> None:
    """running, stopped, running from Client, AsyncClient and the router: nine deliveries."""
    t = f"T{uid}_DAEMON_STATUS"
    sub = Client(agent.api, timeout=30, poll_wait=1)
    name = f"flips-{uid}"
    sub.create_consumer(name, [t])
    got: List[Event] = []
    sub.subscribe(t, consumer=name)(got.append)
    sub.start()
    flips = ["running", "stopped", "running"]
    try:
        pub = Client(agent.api)
        for s in flips:
            pub.publish(t, {"daemon": "selfplay", "status": s}, source="client")

        async def from_async() -> None:
            async with AsyncClient(agent.api) as c:
                for s in flips:
                    await c.publish(t, {"daemon": "selfplay", "status": s}, source="aio")
            router = Router(f"flips-{uid}", api=agent.api)
            for s in flips:
                await router.publish(t, {"daemon": "selfplay", "status": s}, source="router")
            await router.stop()

        asyncio.run(from_async())
        wait_until("nine deliveries", lambda: len(got) >= 9, DEADLINE)
        wait_until("all acknowledged", lambda: sub.consumer(name).cursor >= got[-1].seq, DEADLINE)  # type: ignore[union-attr]
    finally:
        sub.stop()
    by: Dict[str, List[str]] = {}
    for e in got:
        by.setdefault(str(e.source), []).append(e.payload["status"])
    assert by == {"client": flips, "aio": flips, "router": flips}
    assert len({e.id for e in got}) == 9 and len({e.idempotency_key for e in got}) == 9


def test_the_module_level_router_publish_sends_a_key(agent: Agent, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIFTMESH_API", agent.api)
    monkeypatch.setenv("RIFTMESH_SERVICE", f"keys-{uid}")
    rr.reset_router()
    t = f"T{uid}_MODKEY"

    async def main() -> Tuple[Published, Published, Published]:
        a = await rr.publish(t, {"status": "running"})
        b = await rr.publish(t, {"status": "running"})
        c = await rr.publish(t, {"status": "other"}, idempotency_key=a.idempotency_key)
        await rr.get_router().stop()
        return a, b, c

    try:
        a, b, c = asyncio.run(main())
    finally:
        rr.reset_router()
    assert not a.duplicate and not b.duplicate and a.id != b.id
    assert c.duplicate and c.id == a.id and c.duplicate_by == "idempotency_key"


class AnswerDroppingProxy:
    """A TCP proxy in front of a real agent that passes the first ``drop``
    requests on and then closes the connection as soon as the agent's answer
    starts: the publish lands, its answer is lost (what a crash or a network
    cut between the agent's write and the client's read looks like)."""

    def __init__(self, target: str, drop: int) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.drop = drop
        self.dropped = 0
        self.forwarded = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.api = f"127.0.0.1:{self.server.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        u = socket.create_connection(self.target)
        with self._lock:
            drop = self.dropped < self.drop
            if drop:
                self.dropped += 1
            else:
                self.forwarded += 1

        def up() -> None:
            try:
                while True:
                    b = c.recv(65536)
                    if not b:
                        break
                    u.sendall(b)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        try:
            while True:
                b = u.recv(65536)
                if not b or drop:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            for s in (c, u):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_a_lost_answer_is_retried_with_the_same_key(agent: Agent, uid: str, retry_log: RetryLog) -> None:
    t = f"T{uid}_LOST"
    proxy = AnswerDroppingProxy(agent.api, drop=2)
    try:
        c = Client(proxy.api, timeout=10, retry_for=30)
        r = c.publish(t, {"status": "running"})
        assert proxy.dropped == 2 and proxy.forwarded == 1 and retry_log.retries == 1
        assert r.duplicate and r.duplicate_by == "idempotency_key", "the first try landed: the retry is its duplicate"

        proxy.drop, proxy.dropped, proxy.forwarded = 1, 0, 0
        rs = c.publish_batch([(t, {"status": "stopped"}), (t, {"status": "running"})])
        assert proxy.dropped == 1 and proxy.forwarded == 1
        assert [x.duplicate for x in rs] == [True, True]

        async def aio() -> Published:
            proxy.drop, proxy.dropped, proxy.forwarded = 1, 0, 0
            async with AsyncClient(proxy.api, timeout=10, retry_for=30) as ac:
                return await ac.publish(t, {"status": "stopped"})

        ar = asyncio.run(aio())
        assert proxy.dropped == 1 and ar.duplicate and ar.duplicate_by == "idempotency_key"
    finally:
        proxy.close()
    evs = list(Client(agent.api).history(t))
    assert [e.payload["status"] for e in evs] == ["running", "stopped", "running", "stopped"]
    assert [e.id for e in evs] == [r.id, rs[0].id, rs[1].id, ar.id]


def test_a_publish_waits_out_an_agent_restart(spawn_agent: Callable[..., Agent], uid: str, retry_log: RetryLog) -> None:
    a = spawn_agent("py-keys-restart")
    a.api_arg = a.api  # the same port when it comes back
    t = f"T{uid}_RESTART"
    Client(a.api).publish(t, {"status": "before"})
    a.kill()

    results: Dict[str, Any] = {}

    def sync_call() -> None:
        try:
            results["sync"] = Client(a.api, timeout=10, retry_for=DEADLINE).publish(t, {"status": "sync"})
        except BaseException as e:  # noqa: BLE001 - reported below
            results["sync"] = e

    def async_call() -> None:
        async def go() -> Published:
            async with AsyncClient(a.api, timeout=10, retry_for=DEADLINE) as c:
                return await c.publish(t, {"status": "async"})

        try:
            results["async"] = asyncio.run(go())
        except BaseException as e:  # noqa: BLE001 - reported below
            results["async"] = e

    threads = [threading.Thread(target=sync_call), threading.Thread(target=async_call)]
    for th in threads:
        th.start()
    wait_until("both calls to retry", lambda: retry_log.retries >= 2, DEADLINE)
    assert not results, f"returned while the agent was down: {results}"
    a.start()
    for th in threads:
        th.join(DEADLINE)
    s, y = results["sync"], results["async"]
    assert isinstance(s, Published) and not s.duplicate, s
    assert isinstance(y, Published) and not y.duplicate, y
    evs = list(Client(a.api).history(t))
    assert sorted(e.payload["status"] for e in evs) == ["async", "before", "sync"]
    assert {e.id for e in evs} >= {s.id, y.id}
