"""The fold rule of the agent's membership events (proto-notes/membership.md,
"Folding the events into a view"): applied in any order, the facts of one
member end in its true state.

::

    view = MemberFold()
    for ev in mesh.history(["HOST_*", "NODE_*"]):
        view.apply(ev)
    view.state("gpu-07")     # "alive" | "suspect" | "dead" | "left" | None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .models import Event

__all__ = ["MemberFold", "MemberFact", "FACT_STATES"]

# Type -> (state, strength at equal incarnation).
FACT_STATES: Dict[str, Tuple[str, int]] = {
    "HOST_ONLINE": ("alive", 0),
    "NODE_RECOVERED": ("alive", 0),
    "NODE_SUSPECT": ("suspect", 1),
    "HOST_OFFLINE": ("dead", 2),
    "HOST_LEFT": ("left", 3),
}


@dataclass(frozen=True)
class MemberFact:
    """The fact about one member that won so far."""

    node: str
    name: str
    incarnation: int
    state: str
    type: str
    event_id: str


class MemberFold:
    """A view of the cluster from HOST_* / NODE_* events, by the fold rule:
    a higher incarnation wins; at the same incarnation, left > dead >
    suspect > alive; a lower incarnation is ignored."""

    def __init__(self) -> None:
        self._facts: Dict[str, MemberFact] = {}

    def apply(self, event: Union[Event, Mapping[str, Any]]) -> bool:
        """Fold one event in; True when it changed the view. Events of other
        types, and payloads without node and incarnation, are ignored."""
        if isinstance(event, Event):
            etype, payload, eid = event.type, event.payload, event.id
        else:
            etype = str(event.get("type") or event.get("event_type") or "")
            payload, eid = event.get("payload"), str(event.get("id") or event.get("event_id") or "")
        rule = FACT_STATES.get(etype)
        if rule is None or not isinstance(payload, Mapping):
            return False
        node, inc = payload.get("node"), payload.get("incarnation")
        if not isinstance(node, str) or not isinstance(inc, int):
            return False
        state, strength = rule
        cur = self._facts.get(node)
        if cur is not None and (cur.incarnation, FACT_STATES[cur.type][1]) >= (inc, strength):
            return False
        self._facts[node] = MemberFact(
            node=node, name=str(payload.get("name", "")), incarnation=inc, state=state, type=etype, event_id=eid
        )
        return True

    def fact(self, node_or_name: str) -> Optional[MemberFact]:
        """The winning fact of a member, by peer id or name."""
        f = self._facts.get(node_or_name)
        if f is not None:
            return f
        named = [f for f in self._facts.values() if f.name == node_or_name]
        return max(named, key=lambda f: f.incarnation) if named else None

    def state(self, node_or_name: str) -> Optional[str]:
        f = self.fact(node_or_name)
        return f.state if f else None

    def members(self) -> Dict[str, MemberFact]:
        """Every member's winning fact, by peer id."""
        return dict(self._facts)
