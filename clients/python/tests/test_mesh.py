from __future__ import annotations

from typing import List

from harness import Agent, wait_until
from riftmesh import Client, Event

DEADLINE = 90.0


def test_event_published_on_one_agent_is_delivered_on_the_other(mesh2: List[Agent], uid: str) -> None:
    a_agent, b_agent = mesh2
    a = Client(a_agent.api)
    b = Client(b_agent.api)
    t = f"T{uid}_CROSS"
    got: List[Event] = []
    b.subscribe(t, consumer=f"cross-{uid}")(got.append)
    b.start()
    try:
        wait_until("the consumer on b", lambda: b.consumer(f"cross-{uid}"), DEADLINE)
        p = a.publish(t, {"model": uid}, source="trainer", correlation_id=f"run-{uid}", by_content=True)
        wait_until("delivery on b", lambda: got, DEADLINE)
        ev = got[0]
        assert ev.id == p.id and ev.hash == p.hash
        assert ev.node == a_agent.peer_id and ev.source == "trainer"
        assert ev.correlation_id == f"run-{uid}" and ev.payload == {"model": uid}
        # The same content published on b without a key is a duplicate of a's event.
        dup = b.publish(t, {"model": uid}, by_content=True)
        assert dup.duplicate and dup.id == p.id and dup.duplicate_by == "content"
        # And b's own event reaches a.
        back = b.publish(t, {"model": uid, "from": "b"})
        wait_until("b's event on a", lambda: any(e.id == back.id for e in a.history(t)), DEADLINE)
        wait_until("b's event acked on b", lambda: b.consumer(f"cross-{uid}").cursor >= back.seq, DEADLINE)  # type: ignore[union-attr]
    finally:
        b.stop()
    assert [e.id for e in got] == [p.id, back.id]


def test_members_of_a_two_agent_mesh(mesh2: List[Agent]) -> None:
    a_agent, b_agent = mesh2
    a = Client(a_agent.api)

    def both_alive() -> bool:
        ms = {m.name: m for m in a.members()}
        return b_agent.name in ms and ms[b_agent.name].state == "alive" and ms[b_agent.name].connected

    wait_until("b alive in a's member table", both_alive, DEADLINE)
    ms = a.members()
    assert ms[0].name == a_agent.name and ms[0].is_self
    other = next(m for m in ms if m.name == b_agent.name)
    assert other.peer_id == b_agent.peer_id and not other.is_self
    assert any(p["peer_id"] == b_agent.peer_id for p in a.peers())
