"""riftmesh.router, the seeds' event router, against a real agent."""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
import time
from typing import Any, Dict, List, Tuple

import pytest

import riftmesh.router as rr
from harness import HERE, Agent
from riftmesh import AsyncClient, Client, Event, HandlerFailure
from riftmesh.router import DataEventType, Router, RouterEvent
from test_aio import DEADLINE, run, until

# A seed daemon, written as the seeds write them: the consumer of
# ../shared/seeds/003 ("Step 4: Subscribe in Consumer": subscribe in
# __init__, an async handler reading event.get(...)) whose handler makes the
# Quick Start's `await publish(type, payload=..., source=...)` call. Only its
# import line changes for riftmesh.
SEED_IMPORT = "from app.coordination.event_router import get_router, publish, DataEventType\n"
RIFTMESH_IMPORT = "from riftmesh.router import get_router, publish, DataEventType\n"
SEED_DAEMON = (
    SEED_IMPORT
    + '''

class PromotionTrigger:
    def __init__(self):
        router = get_router()
        router.subscribe(DataEventType.TRAINING_COMPLETED, self._on_training_completed)

    async def _on_training_completed(self, event: dict) -> None:
        config = event.get("config")
        # Handle event...
        await publish(
            DataEventType.MODEL_PROMOTED,
            payload={"config": config, "model_path": event.get("model_path")},
            source="promoter",
        )
'''
)


def test_the_readme_shows_this_port() -> None:
    text = (HERE.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n# before\n(.*?)# after\n(.*?)```", text, re.S)
    assert block, "the before/after example is gone from README.md"
    assert block.group(1) == SEED_IMPORT
    assert block.group(2) == SEED_DAEMON.replace(SEED_IMPORT, RIFTMESH_IMPORT)


@pytest.fixture
def fresh_router(agent: Agent, uid: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("RIFTMESH_API", agent.api)
    monkeypatch.setenv("RIFTMESH_SERVICE", f"seedport-{uid}")
    rr.reset_router()
    yield
    rr.reset_router()


def test_a_seed_daemon_ports_by_its_import_line(agent: Agent, uid: str, fresh_router: Any) -> None:
    ported = SEED_DAEMON.replace(SEED_IMPORT, RIFTMESH_IMPORT)
    changed = [
        line for line in difflib.unified_diff(SEED_DAEMON.splitlines(), ported.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed == ["-" + SEED_IMPORT.strip(), "+" + RIFTMESH_IMPORT.strip()]

    async def main() -> List[RouterEvent]:
        ns: Dict[str, Any] = {"__name__": "promotion_trigger"}
        exec(compile(ported, "promotion_trigger.py", "exec"), ns)
        ns["PromotionTrigger"]()
        promoted: List[RouterEvent] = []

        async def watch(event: dict) -> None:  # type: ignore[type-arg]
            promoted.append(event)  # type: ignore[arg-type]

        rr.get_router().subscribe(DataEventType.MODEL_PROMOTED, watch)
        # The seeds' Quick Start publish, with a payload of this test's own.
        publish = rr.publish
        await publish(
            DataEventType.TRAINING_COMPLETED,
            payload={"config": "hex8_2p", "model_path": f"models/hex8_2p-{uid}.pth"},
            source="training_daemon",
        )
        await until("MODEL_PROMOTED from the ported daemon", lambda: promoted)
        await rr.get_router().stop()
        return promoted

    promoted = run(main())
    ev = promoted[0]
    assert ev["type"] == DataEventType.MODEL_PROMOTED == "MODEL_PROMOTED"
    assert ev.get("config") == "hex8_2p" and ev.get("model_path") == f"models/hex8_2p-{uid}.pth"
    assert ev["source"] == "promoter" and ev["node"] == agent.peer_id
    names = {s.consumer for s in rr.get_router().subscriptions}
    assert names == {f"seedport-{uid}.TRAINING_COMPLETED", f"seedport-{uid}.MODEL_PROMOTED"}


def test_event_dict_shape_recent_events_and_counts(agent: Agent, uid: str) -> None:
    t = f"RT_{uid}_SHAPE"

    async def main() -> Tuple[Router, List[RouterEvent], str]:
        router = Router(f"shape-{uid}", api=agent.api)
        got: List[RouterEvent] = []
        router.subscribe(t, got.append)  # a sync handler
        router.subscribe(t, lambda e: None)
        payload = {"config": "sq8", "source": "from-payload", "timestamp": 1.5, "type": "x", "node": "n", "event_id": "e"}
        t0 = time.time()
        r = await router.publish(t, payload=payload, source="shaper")
        await until("the delivery", lambda: got)
        await router.stop()
        assert abs(got[0]["timestamp"] - t0) < 30
        return router, got, r.id

    router, got, event_id = run(main())
    ev = got[0]
    assert isinstance(ev, dict) and isinstance(ev.event, Event) and ev.attempt == 1
    assert ev.get("config") == "sq8"
    assert ev["type"] == t and ev["source"] == "shaper" and ev["node"] == agent.peer_id
    assert ev["event_id"] == event_id
    assert ev["payload"]["source"] == "from-payload" and ev["payload"]["timestamp"] == 1.5
    assert router.get_subscription_counts() == {t: 2}
    # What it published and its handlers got: the one event, once.
    recent = router.get_recent_events(limit=100)
    assert [(e["event_id"], e["type"], e["source"], e.get("config")) for e in recent] == [(event_id, t, "shaper", "sq8")]
    assert router.get_recent_events(limit=0) == []
    assert [s.consumer for s in router.subscriptions] == [f"shape-{uid}.{t}", f"shape-{uid}.{t}.2"]


def test_data_event_type_covers_the_seeds_and_matches_event_type(agent: Agent) -> None:
    assert DataEventType.TRAINING_COMPLETE is DataEventType.TRAINING_COMPLETED
    # The seeds tell CURRICULUM_ADVANCED and CURRICULUM_REBALANCED apart: so does the catalog.
    assert DataEventType.CURRICULUM_ADVANCED == "CURRICULUM_ADVANCED"
    assert DataEventType.CURRICULUM_REBALANCED == "CURRICULUM_REBALANCED"
    for name in ("TRAINING_EARLY_STOPPED", "REGRESSION_DETECTED", "EVALUATION_PROGRESS", "TASK_ABANDONED"):
        assert DataEventType[name].value == name
    # Every value is what the agent stores as the type, whichever spelling was published.
    c = Client(agent.api)
    for member in ("TRAINING_COMPLETE", "PROMOTED", "NODE_DEAD", "TRAINING_EARLY_STOPPED"):
        t = c.publish(member.lower().replace("_", "."), {"dt": member, "at": time.time()}).type
        assert t == DataEventType[member]


def test_a_failing_handler_does_not_hold_back_the_others(agent: Agent, uid: str) -> None:
    """Isolation: one consumer per handler. The failing handler retries event 0
    while the other handler gets every event within 200 ms of its publish, and
    the error callback fires within 200 ms of the publish too."""
    t = f"RT_{uid}_ISO"
    limit = 0.2

    async def main() -> Tuple[Dict[int, float], Dict[int, float], List[Tuple[int, int, float]], List[HandlerFailure]]:
        router = Router(f"iso-{uid}", api=agent.api, max_attempts=1000, backoff=0.05, max_backoff=0.05)
        published: Dict[int, float] = {}
        good: Dict[int, float] = {}
        errors: List[Tuple[int, int, float]] = []
        router_wide: List[HandlerFailure] = []

        async def flaky(event: dict) -> None:  # type: ignore[type-arg]
            raise RuntimeError(f"cannot handle {event['n']}")

        def steady(event: dict) -> None:  # type: ignore[type-arg]
            good[event["n"]] = time.monotonic()

        sub = router.subscribe(t, flaky)
        sub.on_error(lambda f: errors.append((f.event.payload["n"], f.attempt, time.monotonic())))
        router.subscribe(t, steady)
        router.on_error(router_wide.append)
        await router.start()
        for n in range(6):
            seen = len(errors)
            published[n] = time.monotonic()
            await router.publish(t, {"n": n, "uid": uid})
            await until(f"event {n} to reach the steady handler", lambda: n in good, 5)
            await until("another retry of the failing handler", lambda: len(errors) > seen, 5)
        await router.stop()
        return published, good, errors, router_wide

    published, good, errors, wide = run(main())
    late = {n: round(good[n] - published[n], 3) for n in published if good[n] - published[n] > limit}
    assert not late, f"the steady handler got these events more than {limit} s after their publish: {late}"
    # The failing handler is still retrying its first event all along.
    assert {n for n, _, _ in errors} == {0}
    assert [a for _, a, _ in errors] == list(range(1, len(errors) + 1))
    assert errors[0][2] - published[0] <= limit, "the error callback came late"
    assert len(wide) == len(errors) and not any(f.final for f in wide)


def test_a_renamed_subscription_is_warned_about(agent: Agent, uid: str, caplog: pytest.LogCaptureFixture) -> None:
    t = f"RT_{uid}_RENAME"

    async def main() -> List[int]:
        old = Router(f"old-{uid}", api=agent.api)
        old.subscribe(t, lambda e: None)
        await old.start()
        await old.stop()
        c = AsyncClient(agent.api)
        # A consumer of other types with a backlog too: not a candidate.
        await c.create_consumer(f"aaa-other-{uid}", [f"{t}_OTHER"])
        await c.publish(f"{t}_OTHER", {"n": 0})
        for n in range(3):
            await c.publish(t, {"n": n})  # the backlog of old-<uid>.<T>
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="riftmesh"):
            renamed = Router(f"new-{uid}", api=agent.api)
            renamed.subscribe(t, lambda e: None)
            await renamed.start()
            await renamed.stop()
        warned = [r.getMessage() for r in caplog.records if "backlog" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert f"old-{uid}.{t} has 3 unacknowledged event(s)" in warned[0]
        assert f"consumer='old-{uid}.{t}'" in warned[0]
        assert f"aaa-other-{uid}" not in warned[0]
        # Taking the old name, as the warning says: no warning, and the backlog arrives.
        caplog.clear()
        got: List[int] = []
        with caplog.at_level(logging.WARNING, logger="riftmesh"):
            kept = Router(f"new-{uid}", api=agent.api)
            kept.subscribe(t, lambda e: got.append(e["n"]), consumer=f"old-{uid}.{t}")
            await kept.start()
            await until("the backlog", lambda: len(got) == 3)
            await kept.stop()
        assert not [r for r in caplog.records if "backlog" in r.getMessage()]
        await c.aclose()
        return got

    assert run(main()) == [0, 1, 2]


def test_the_sync_client_warns_about_a_renamed_handler(agent: Agent, uid: str, caplog: pytest.LogCaptureFixture) -> None:
    t = f"RT_{uid}_SYNCREN"
    c = Client(agent.api)
    c.create_consumer(f"mod.old_name_{uid}", [t])
    c.publish(t, {"n": 1})
    fresh = Client(agent.api)

    @fresh.subscribe(t, consumer=f"mod.new_name_{uid}")
    def new_name(ev: Event) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="riftmesh"):
        fresh._ensure_consumer(fresh._make_groups()[0])
    assert f"consumer='mod.old_name_{uid}'" in caplog.text


def test_module_level_subscribe_in_both_forms(agent: Agent, uid: str, fresh_router: Any) -> None:
    """`subscribe(type, handler)` and `@subscribe(type)` at module level go to get_router()."""
    t = f"RT_{uid}_MODULE"
    got: List[Tuple[str, Any]] = []

    def plain(event: dict) -> None:  # type: ignore[type-arg]
        got.append(("plain", event.get("n")))

    async def main() -> None:
        rr.subscribe(t, plain)

        @rr.subscribe(t)
        async def decorated(event: dict) -> None:  # type: ignore[type-arg]
            got.append(("decorated", event.get("n")))

        assert rr.get_router().get_subscription_counts() == {t: 2}
        await rr.publish(t, payload={"n": 7})
        await until("both handlers", lambda: len(got) == 2)
        await rr.get_router().stop()

    run(main())
    assert sorted(got) == [("decorated", 7), ("plain", 7)]
    # publish without source: the router's name, from RIFTMESH_SERVICE.
    ev = next(e for e in Client(agent.api).history(t))
    assert ev.source == f"seedport-{uid}"
