"""The fold rule of membership events (proto-notes/membership.md), on a
crafted order and on a real cluster where a host was killed and restarted."""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Dict, List

from harness import Agent, wait_until
from riftmesh import Client, MemberFold


def fact(t: str, inc: int, node: str = "12D3KooWnode", name: str = "gpu-07") -> Dict[str, Any]:
    return {"type": t, "id": f"{t}-{inc}", "payload": {"node": node, "name": name, "incarnation": inc}}


def test_the_fold_ends_in_the_true_state_whatever_the_order() -> None:
    # The restarted host's own HOST_ONLINE (incarnation 2) logged before the
    # older suspicion and death of its previous run (incarnation 1).
    seen = [fact("HOST_ONLINE", 2), fact("NODE_SUSPECT", 1), fact("HOST_OFFLINE", 1)]
    for order in itertools.permutations(seen):
        v = MemberFold()
        for e in order:
            v.apply(e)
        assert v.state("gpu-07") == "alive", order
        assert v.fact("12D3KooWnode").incarnation == 2  # type: ignore[union-attr]
    # At one incarnation the stronger state wins, in any order.
    same = [fact("HOST_ONLINE", 5), fact("NODE_SUSPECT", 5), fact("HOST_OFFLINE", 5), fact("HOST_LEFT", 5)]
    for order in itertools.permutations(same):
        v = MemberFold()
        for e in order:
            v.apply(e)
        assert v.state("gpu-07") == "left", order
    v = MemberFold()
    assert not v.apply({"type": "TRAINING_COMPLETED", "payload": {"node": "x", "incarnation": 1}})
    assert not v.apply({"type": "HOST_ONLINE", "payload": {"node": "x"}})
    assert v.members() == {}


def test_a_restarted_host_folds_alive_from_a_peers_log(spawn_agent: Callable[..., Agent]) -> None:
    a = spawn_agent("fold-a")
    b = spawn_agent("fold-b", bootstrap=[a.p2p_addr()])
    ca = Client(a.api, timeout=30)
    node_b = Client(b.api, timeout=30).status()["peer_id"]

    def state_on_a() -> str:
        ms = [m for m in ca.members() if m.peer_id == node_b]
        return ms[0].state if ms else ""

    wait_until("b alive on a", lambda: state_on_a() == "alive" or None, 60)
    b.kill()
    wait_until("b dead on a", lambda: state_on_a() == "dead" or None, 60)
    b.start()
    wait_until("b alive on a again", lambda: state_on_a() == "alive" or None, 60)

    def facts_of_b() -> List[Any]:
        evs = [e for e in ca.history(["HOST_*", "NODE_*"]) if (e.payload or {}).get("node") == node_b]
        kinds = {e.type for e in evs}
        # Both runs are in a's log: the death of the first, the start of the second.
        return evs if {"HOST_OFFLINE", "HOST_ONLINE"} <= kinds and len({e.payload["incarnation"] for e in evs}) >= 2 else []

    evs = wait_until("both runs of b in a's log", lambda: facts_of_b() or None, 60)
    rng = random.Random(7)
    for _ in range(20):
        order = list(evs)
        rng.shuffle(order)
        v = MemberFold()
        for e in order:
            v.apply(e)
        assert v.state(node_b) == "alive", [(e.type, e.payload["incarnation"]) for e in order]
    # Log order, as a consumer sees it, agrees with the agent's own view.
    v = MemberFold()
    for e in evs:
        v.apply(e)
    assert v.state(node_b) == state_on_a() == "alive"
