from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from harness import Agent, wait_until
from riftmesh import AgentUnavailable, Client, Event, normalize_pattern

DEADLINE = 60.0


def test_subscribe_acks_and_a_restarted_consumer_gets_no_redelivery(agent: Agent, uid: str) -> None:
    t = f"T{uid}_DONE"
    name = f"durable-{uid}"
    got: List[Tuple[int, int]] = []

    first = Client(agent.api)

    @first.subscribe(t, consumer=name)
    def h1(ev: Event) -> None:
        got.append((1, ev.payload["n"]))

    first.start()
    try:
        # The consumer is created by start(); events published after it exists are its own.
        wait_until("the consumer to exist", lambda: first.consumer(name), DEADLINE)
        seqs = [first.publish(t, {"n": n}).seq for n in range(3)]
        wait_until("three deliveries", lambda: len(got) >= 3, DEADLINE)
        # Acked once the handler returned: the agent's cursor reaches the last one.
        wait_until("the ack", lambda: first.consumer(name).cursor >= seqs[-1], DEADLINE)  # type: ignore[union-attr]
    finally:
        first.stop()
    assert got == [(1, 0), (1, 1), (1, 2)]
    info = first.consumer(name)
    assert info is not None and info.cursor >= seqs[-1] and info.dead_letters == 0

    # A second process with the same consumer name resumes after the acked events.
    second = Client(agent.api)

    @second.subscribe(t, consumer=name)
    def h2(ev: Event) -> None:
        got.append((2, ev.payload["n"]))

    second.publish(t, {"n": 3})  # published while no process consumes
    second.start()
    try:
        second.publish(t, {"n": 4})
        wait_until("the new events", lambda: len(got) >= 5, DEADLINE)
    finally:
        second.stop()
    # Delivery is in seq order, so had any of 0-2 come again it would be before 3.
    assert got[3:] == [(2, 3), (2, 4)]


def test_unacked_events_are_delivered_again(client: Client, uid: str) -> None:
    t = f"T{uid}_AGAIN"
    name = f"again-{uid}"
    client.create_consumer(name, [t])
    p = client.publish(t, {"n": 1})
    assert [e.id for e in client.fetch(name).events] == [p.id]
    # Fetching did not move the cursor: a runner gets it again, then acks it.
    got: List[str] = []
    client.subscribe(t, consumer=name)(lambda ev: got.append(ev.id))
    client.start()
    wait_until("redelivery", lambda: got, DEADLINE)
    wait_until("the ack", lambda: client.consumer(name).cursor >= p.seq, DEADLINE)  # type: ignore[union-attr]
    client.stop()
    assert got == [p.id]
    assert client.fetch(name).events == []


def test_agent_restart_keeps_the_cursor(spawn_agent, uid: str) -> None:  # type: ignore[no-untyped-def]
    a: Agent = spawn_agent("py-restart")
    t = f"T{uid}_DURABLE"
    name = "restart-consumer"
    got: List[int] = []

    def consume(until: int) -> None:
        c = Client(a.api)
        c.subscribe(t, consumer=name)(lambda ev: got.append(ev.payload["n"]))
        c.start()
        try:
            wait_until(f"{until} deliveries", lambda: len(got) >= until, DEADLINE)
            last = c.history_page(t, limit=1000).events[-1].seq
            wait_until("the ack", lambda: c.consumer(name).cursor >= last, DEADLINE)  # type: ignore[union-attr]
        finally:
            c.stop()

    c0 = Client(a.api)
    c0.create_consumer(name, [t])
    for n in range(2):
        c0.publish(t, {"n": n})
    consume(2)
    a.restart()  # SIGKILL, then the same data dir
    c1 = Client(a.api)
    c1.publish(t, {"n": 2})
    consume(3)
    assert got == [0, 1, 2]


def test_failing_handler_is_retried_then_dead_lettered(client: Client, uid: str) -> None:
    t = f"T{uid}_EVAL"
    name = f"deadletter-{uid}"
    bad_calls: List[Tuple[int, int, float]] = []
    good_calls: List[int] = []

    @client.subscribe(t, consumer=name, priority=10, max_attempts=3, backoff=0.1)
    def bad(ev: Event) -> None:
        bad_calls.append((ev.payload["n"], ev.attempt, time.monotonic()))
        if ev.payload["n"] == 0:
            raise RuntimeError(f"model file missing: models/{uid}.pth")

    @client.subscribe(t, consumer=name, priority=0)
    def good(ev: Event) -> None:
        good_calls.append(ev.payload["n"])

    client.start()
    wait_until("the consumer", lambda: client.consumer(name), DEADLINE)
    p0 = client.publish(t, {"n": 0})
    p1 = client.publish(t, {"n": 1})
    dead = wait_until("a dead letter", lambda: client.dead_letters(name), DEADLINE)
    wait_until("the next event", lambda: 1 in good_calls, DEADLINE)
    wait_until("the ack", lambda: client.consumer(name).cursor >= p1.seq, DEADLINE)  # type: ignore[union-attr]
    client.stop()

    assert len(dead) == 1
    d = dead[0]
    assert d.seq == p0.seq
    assert d.event is not None and d.event.id == p0.id
    assert "RuntimeError: model file missing: models/" + uid in d.reason
    assert "failed 3 time(s)" in d.reason and "bad" in d.reason
    # Three attempts, with the backoff between them (0.1 s, then 0.2 s).
    on0 = [(a, ts) for n, a, ts in bad_calls if n == 0]
    assert [a for a, _ in on0] == [1, 2, 3]
    gaps = [on0[i + 1][1] - on0[i][1] for i in range(2)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps
    # The other handler ran once per event: not stopped by the failure, not re-run by retries.
    assert good_calls == [0, 1]
    assert [n for n, _, _ in bad_calls if n == 1] == [1]
    info = client.consumer(name)
    assert info is not None and info.dead_letters == 1


def test_flaky_handler_succeeds_on_retry_without_dead_letter(client: Client, uid: str) -> None:
    t = f"T{uid}_FLAKY"
    name = f"flaky-{uid}"
    attempts: List[int] = []

    @client.subscribe(t, consumer=name, max_attempts=4, backoff=0.05)
    def flaky(ev: Event) -> None:
        attempts.append(ev.attempt)
        if ev.attempt < 2:
            raise ConnectionError("the model server is restarting")

    client.start()
    wait_until("the consumer", lambda: client.consumer(name), DEADLINE)
    p = client.publish(t, {"n": 1})
    wait_until("the ack", lambda: client.consumer(name).cursor >= p.seq, DEADLINE)  # type: ignore[union-attr]
    client.stop()
    assert attempts == [1, 2]
    assert client.dead_letters(name) == []


def test_priorities_higher_runs_first(client: Client, uid: str) -> None:
    t = f"T{uid}_PRIO"
    name = f"prio-{uid}"
    order: List[Tuple[int, str]] = []

    def make(label: str, prio: int) -> None:
        @client.subscribe(t, consumer=name, priority=prio)
        def h(ev: Event) -> None:
            order.append((ev.payload["n"], label))

    make("low", 1)
    make("high", 10)
    make("mid-a", 5)
    make("mid-b", 5)  # same priority: registration order

    @client.subscribe(f"T{uid}_OTHER", consumer=name, priority=100)
    def other(ev: Event) -> None:
        order.append((ev.payload["n"], "other"))

    client.start()
    wait_until("the consumer", lambda: client.consumer(name), DEADLINE)
    client.publish(t, {"n": 1})
    client.publish(f"T{uid}_OTHER", {"n": 2})
    client.publish(t, {"n": 3})
    wait_until("all handlers", lambda: len(order) >= 9, DEADLINE)
    client.stop()
    per_event = ["high", "mid-a", "mid-b", "low"]
    assert order == [(1, x) for x in per_event] + [(2, "other")] + [(3, x) for x in per_event]
    assert sorted(client.consumer(name).types) == sorted([t, f"T{uid}_OTHER"])  # type: ignore[union-attr]


def test_async_handlers_with_run_async(client: Client, uid: str) -> None:
    t = f"T{uid}_ASYNC"
    name = f"async-{uid}"
    seen: List[Tuple[str, int]] = []
    threads: List[str] = []

    @client.subscribe(t, consumer=name, priority=2)
    async def first(ev: Event) -> None:
        await asyncio.sleep(0.01)
        seen.append(("async", ev.payload["n"]))

    @client.subscribe(t, consumer=name, priority=1)
    def second(ev: Event) -> None:  # a plain handler in run_async runs in a worker thread
        threads.append(threading.current_thread().name)
        seen.append(("sync", ev.payload["n"]))

    @client.subscribe(t, consumer=name, priority=0, max_attempts=2, backoff=0.05)
    async def failing(ev: Event) -> None:
        if ev.payload["n"] == 1:
            raise ValueError("async handler refuses n=1")
        seen.append(("last", ev.payload["n"]))
        if ev.payload["n"] == 2:
            client.stop()

    async def main() -> None:
        runner = asyncio.ensure_future(client.run_async())
        await asyncio.to_thread(wait_until, "the consumer", lambda: client.consumer(name), DEADLINE)
        await asyncio.to_thread(client.publish, t, {"n": 1})
        await asyncio.to_thread(client.publish, t, {"n": 2})
        await asyncio.wait_for(runner, DEADLINE)

    asyncio.run(main())
    assert seen == [("async", 1), ("sync", 1), ("async", 2), ("sync", 2), ("last", 2)]
    assert threads and threading.main_thread().name not in threads
    dead = client.dead_letters(name)
    assert len(dead) == 1 and "ValueError: async handler refuses n=1" in dead[0].reason


def test_async_handler_under_the_sync_runner(client: Client, uid: str) -> None:
    t = f"T{uid}_MIXED"
    got: List[int] = []

    @client.subscribe(t, consumer=f"mixed-{uid}")
    async def h(ev: Event) -> None:
        await asyncio.sleep(0)
        got.append(ev.payload["n"])
        client.stop()  # from inside a handler: run() returns

    def publish_later() -> None:
        wait_until("the consumer", lambda: client.consumer(f"mixed-{uid}"), DEADLINE)
        client.publish(t, {"n": 7})

    th = threading.Thread(target=publish_later)
    th.start()
    client.run()
    th.join()
    assert got == [7]


def test_stop_cuts_a_long_poll_short(agent: Agent, uid: str) -> None:
    c = Client(agent.api, poll_wait=60)
    c.subscribe(f"T{uid}_IDLE", consumer=f"idle-{uid}")(lambda ev: None)
    c.start()
    wait_until("the consumer", lambda: c.consumer(f"idle-{uid}"), DEADLINE)
    # The runner is inside its 60 s long poll once its request is attached to the abort handle.
    wait_until("the long poll", lambda: c._groups[0].abort._conn is not None, DEADLINE, 0.01)
    t0 = time.monotonic()
    c.stop()
    assert time.monotonic() - t0 < 5


def test_patterns_normalise_like_the_agent(client: Client, uid: str) -> None:
    raw = ["training.*", "Eval.Completed", "training-done", "model_?romoted", f"t{uid}.custom-thing"]
    info = client.create_consumer(f"patterns-{uid}", raw)
    assert info.types == [normalize_pattern(p) for p in raw]
    assert info.types[2] == "TRAINING_COMPLETED"  # an alias


def test_start_options_apply_only_when_the_consumer_is_new(agent: Agent, uid: str) -> None:
    t = f"T{uid}_REPLAY"
    name = f"fromstart-{uid}"
    c = Client(agent.api)
    published = [c.publish(t, {"n": n}) for n in range(2)]
    got: List[str] = []

    def run_once(expect: int, last_seq: int) -> None:
        m = Client(agent.api)
        m.subscribe(t, consumer=name, from_start=True)(lambda ev: got.append(ev.id))
        m.start()
        try:
            wait_until(f"{expect} deliveries", lambda: len(got) >= expect, DEADLINE)
            wait_until("the ack", lambda: m.consumer(name).cursor >= last_seq, DEADLINE)  # type: ignore[union-attr]
        finally:
            m.stop()

    run_once(2, published[-1].seq)  # new consumer: replays what is retained
    assert got == [p.id for p in published]
    late = c.publish(t, {"n": 2})
    run_once(3, late.seq)  # existing consumer: from_start is not applied again
    assert got == [p.id for p in published] + [late.id]


def test_replay_moves_a_consumer_back(client: Client, uid: str) -> None:
    t = f"T{uid}_BACK"
    name = f"replay-{uid}"
    client.create_consumer(name, [t])
    ps = [client.publish(t, {"n": n}) for n in range(2)]
    # `since` below is inclusive at millisecond resolution: the third event
    # must be received in a later millisecond than the second.
    second_ms = client.event(ps[1].id).received_ms
    wait_until(
        "the clock to pass the second event's millisecond",
        lambda: time.time() * 1000 > second_ms + 1,
        DEADLINE,
    )
    ps.append(client.publish(t, {"n": 2}))
    batch = client.fetch(name)
    assert [e.id for e in batch.events] == [p.id for p in ps]
    client.ack(name, ps[-1].seq)
    assert client.fetch(name).events == []

    client.replay(name, after_seq=ps[0].seq)
    assert [e.id for e in client.fetch(name).events] == [ps[1].id, ps[2].id]
    client.replay(name, from_start=True)
    assert [e.id for e in client.fetch(name).events][:3] == [p.id for p in ps]
    client.ack(name, ps[-1].seq)
    client.replay(name, since=client.event(ps[2].id).received)
    assert [e.id for e in client.fetch(name).events] == [ps[2].id]
    with pytest.raises(ValueError):
        client.replay(name)


def test_a_client_can_run_again_after_stop(client: Client, uid: str) -> None:
    t = f"T{uid}_AGAIN2"
    got: List[int] = []

    @client.subscribe(t, consumer=f"rerun-{uid}")
    def h(ev: Event) -> None:
        got.append(ev.payload["n"])
        client.stop()  # stop from inside the handler

    for n in range(2):
        client.start()
        wait_until("the consumer", lambda: client.consumer(f"rerun-{uid}"), DEADLINE)
        client.publish(t, {"n": n})
        wait_until(f"delivery {n}", lambda: len(got) > n, DEADLINE)
        client.stop()
    assert got == [0, 1]
    with pytest.raises(RuntimeError, match="nothing to run"):
        Client(client.address).start()


def test_an_event_no_handler_matches_is_dead_lettered_not_skipped(client: Client, uid: str) -> None:
    a, b = f"T{uid}_MINE", f"T{uid}_NOT_MINE"
    name = f"unhandled-{uid}"
    got: List[str] = []
    client.subscribe(a, consumer=name)(lambda ev: got.append(ev.type))
    client.start()
    wait_until("the consumer", lambda: client.consumer(name), DEADLINE)
    # Another process changes the consumer's types under this one.
    client.create_consumer(name, [a, b])
    pb = client.publish(b, {"n": 1})
    pa = client.publish(a, {"n": 2})
    wait_until("the handled event", lambda: got, DEADLINE)
    wait_until("the ack", lambda: client.consumer(name).cursor >= pa.seq, DEADLINE)  # type: ignore[union-attr]
    client.stop()
    assert got == [a]
    dead = client.dead_letters(name)
    assert [d.seq for d in dead] == [pb.seq] and "no handler of this process matches" in dead[0].reason


def test_dead_letter_reason_says_where_the_handler_failed(client: Client, uid: str) -> None:
    t = f"T{uid}_WHERE"
    name = f"where-{uid}"

    @client.subscribe(t, consumer=name, max_attempts=1)
    def explode(ev: Event) -> None:
        {}["missing key"]

    client.start()
    wait_until("the consumer", lambda: client.consumer(name), DEADLINE)
    client.publish(t, {"n": 1})
    dead = wait_until("the dead letter", lambda: client.dead_letters(name), DEADLINE)
    client.stop()
    assert "KeyError: 'missing key' (at test_subscribe.py:" in dead[0].reason
    assert "in explode)" in dead[0].reason


def test_runner_survives_an_agent_restart(spawn_agent, uid: str) -> None:  # type: ignore[no-untyped-def]
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    a: Agent = spawn_agent("py-bounce", api=f"127.0.0.1:{port}")  # a fixed port, kept across the restart
    t = f"T{uid}_BOUNCE"
    name = "bounce"
    got: List[int] = []
    c = Client(a.api, poll_wait=2)
    c.subscribe(t, consumer=name)(lambda ev: got.append(ev.payload["n"]))
    c.start()
    try:
        wait_until("the consumer", lambda: c.consumer(name), DEADLINE)
        p0 = c.publish(t, {"n": 0})
        wait_until("the first event acked", lambda: c.consumer(name).cursor >= p0.seq, DEADLINE)  # type: ignore[union-attr]
        a.kill()
        with pytest.raises(AgentUnavailable):
            c.health()
        a.start()  # same data dir, same API port
        c.publish(t, {"n": 1})
        wait_until("delivery after the restart", lambda: len(got) >= 2, DEADLINE)
    finally:
        c.stop()
    assert got == [0, 1]


# A daemon whose handler is still running when Ctrl-C comes: it says so, then
# finishes only once the file named by its payload exists.
_SLOW_HANDLER = """
import logging, os, sys, time
from riftmesh import Client
logging.basicConfig(level=logging.INFO)
mesh = Client(sys.argv[1])

@mesh.subscribe(sys.argv[2], consumer=sys.argv[3])
def slow(event):
    print("started", event.seq, flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(event.payload["go"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("finished", event.seq, flush=True)

mesh.run()
"""


def test_ctrl_c_while_a_handler_runs_lets_it_finish_and_acknowledges_it(
    agent: Agent, uid: str, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    t = f"T{uid}_SIGINT"
    name = f"sigint-{uid}"
    go = tmp_path / "go"
    mesh = Client(agent.api)
    p = subprocess.Popen(
        [sys.executable, "-c", _SLOW_HANDLER, agent.api, t, name],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: List[str] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until("the consumer", lambda: mesh.consumer(name) or p.poll() is not None, DEADLINE)
        assert p.poll() is None, "\n".join(lines)
        seq = mesh.publish(t, {"go": str(go)}).seq
        wait_until("the handler to start", lambda: f"started {seq}" in lines, DEADLINE)
        # Ctrl-C while the handler runs (the main thread is waiting for the runner) ...
        p.send_signal(signal.SIGINT)
        # ... is seen before the handler may end.
        wait_until("the interrupt to be logged", lambda: p.poll() is not None or any("interrupted" in x for x in lines), DEADLINE)
        go.touch()
        rc = p.wait(timeout=DEADLINE)
        reader.join(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    out = "\n".join(lines)
    assert rc == 0, out
    assert f"finished {seq}" in lines, f"the handler was cut off:\n{out}"
    info = mesh.consumer(name)
    assert info is not None and info.cursor >= seq, f"not acknowledged:\n{out}"
