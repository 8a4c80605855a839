"""Plain data returned by the client. Every object keeps the agent's JSON in ``raw``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "Event",
    "Published",
    "Spooled",
    "HistoryPage",
    "Batch",
    "ConsumerInfo",
    "DeadLetter",
    "Trace",
    "Member",
    "LeaderInfo",
    "LockInfo",
    "BlobAdded",
    "BlobInfo",
    "HandlerFailure",
]


def _ms_to_dt(ms: Optional[int]) -> Optional[datetime]:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc)


@dataclass
class Event:
    """One event as this agent holds it (EventView in proto-notes/api.md).

    ``seq`` is local to this agent; ``id`` and ``hash`` name the event across
    the cluster. ``source`` is the name the publishing component gave
    (``publish(..., source="training_daemon")``; ``""`` if none) and ``node``
    the peer id of the agent that signed it.
    ``attempt`` is set by the subscription runner: 1 on the first delivery to a
    handler in this process, 2 on its first retry, and so on.
    """

    seq: int
    id: str
    type: str
    payload: Any
    hash: str
    source: str
    node: str
    source_seq: int
    ts_ms: int
    received_ms: int
    correlation_id: Optional[str]
    parent_id: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)
    attempt: int = field(default=1, compare=False)
    idempotency_key: Optional[str] = None

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "Event":
        return cls(
            seq=int(v["seq"]),
            id=str(v["id"]),
            type=str(v["type"]),
            payload=v.get("payload"),
            hash=str(v.get("hash", "")),
            # An agent older than `node` sent the peer id as `source` and
            # the component as `origin`.
            source=str(v.get("source") or "") if "node" in v else str(v.get("origin") or ""),
            node=str(v["node"]) if "node" in v else str(v.get("source", "")),
            source_seq=int(v.get("source_seq", 0)),
            ts_ms=int(v.get("ts_ms", 0)),
            received_ms=int(v.get("received_ms", 0)),
            correlation_id=v.get("correlation_id"),
            parent_id=v.get("parent_id"),
            raw=v,
            idempotency_key=v.get("idempotency_key"),
        )

    @property
    def origin(self) -> Optional[str]:
        """Deprecated: the component's name, now ``source`` (``None`` if none)."""
        return self.source or None

    @property
    def time(self) -> datetime:
        """When the source published it (UTC)."""
        dt = _ms_to_dt(self.ts_ms)
        assert dt is not None
        return dt

    @property
    def received(self) -> datetime:
        """When this agent appended it (UTC)."""
        dt = _ms_to_dt(self.received_ms)
        assert dt is not None
        return dt

    @property
    def chain_id(self) -> str:
        """The correlation id a follow-up event should carry (its own id if none)."""
        return self.correlation_id or self.id


@dataclass(frozen=True)
class Published:
    """The answer to a publish: the event id, and whether it was a duplicate.

    For a duplicate, ``id`` and ``seq`` are those of the original event (``id``
    is ``""`` if retention already removed it), ``age_ms`` is how long before
    the answer the original was published and ``duplicate_by`` says which
    rule matched: ``"idempotency_key"`` (the same type and key) or
    ``"content"`` (the same type and payload within the repeat window, for a
    publish without a key). ``idempotency_key`` is the key this publish sent
    (``None`` with ``by_content=True``). ``warning`` is set when the event was
    accepted but probably not as meant (a MODEL_PROMOTED without a blob
    reference: nothing is transferred); the client also logs it.
    """

    id: str
    duplicate: bool
    hash: str
    seq: int
    type: str
    age_ms: Optional[int] = None
    duplicate_by: Optional[str] = None
    idempotency_key: Optional[str] = None
    warning: Optional[str] = None

    @classmethod
    def from_json(cls, v: Dict[str, Any], key: Optional[str] = None) -> "Published":
        age = v.get("age_ms")
        by = v.get("duplicate_by")
        return cls(
            id=str(v["id"]),
            duplicate=bool(v["duplicate"]),
            hash=str(v["hash"]),
            seq=int(v["seq"]),
            type=str(v["type"]),
            age_ms=int(age) if age is not None else None,
            duplicate_by=str(by) if by is not None else None,
            idempotency_key=key,
            warning=_warned(v.get("warning")),
        )


def _warned(w: Any) -> Optional[str]:
    """The agent's warning on a publish, logged once here."""
    if w is None:
        return None
    logging.getLogger("riftmesh").warning("%s", w)
    return str(w)


@dataclass(frozen=True)
class Spooled:
    """A publish the agent could not take: it waits in the local spool.

    ``key`` is its idempotency key (the spool sends it again with that key,
    so it becomes one event however often it is sent) and ``path`` the file
    holding it until :meth:`Client.flush_spool` has handed it to the agent.
    """

    key: str
    path: str
    type: str


@dataclass
class HistoryPage:
    events: List[Event]
    next_after: int
    head: int


@dataclass
class Batch:
    """One fetch of a durable consumer (nothing is acknowledged by fetching)."""

    consumer: str
    events: List[Event]
    missed: int
    cursor: int
    head: int


@dataclass
class ConsumerInfo:
    name: str
    types: List[str]
    cursor: int
    lag: int
    dead_letters: int
    created: Optional[str]
    last_ack: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "ConsumerInfo":
        return cls(
            name=str(v["name"]),
            types=list(v.get("types") or []),
            cursor=int(v.get("cursor", 0)),
            lag=int(v.get("lag", 0)),
            dead_letters=int(v.get("dead_letters", 0)),
            created=v.get("created"),
            last_ack=v.get("last_ack"),
            raw=v,
        )


@dataclass
class DeadLetter:
    """An event a consumer gave up on, with the reason (the handler's error)."""

    seq: int
    reason: str
    at: str
    event: Optional[Event]

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "DeadLetter":
        ev = v.get("event")
        return cls(
            seq=int(v["seq"]),
            reason=str(v.get("reason", "")),
            at=str(v.get("at", "")),
            event=Event.from_json(ev) if isinstance(ev, dict) else None,
        )


@dataclass
class Trace:
    """The events linked to one event: ``(depth, event)`` in depth-first order."""

    correlation_id: str
    events: List[Tuple[int, Event]]


@dataclass
class Member:
    name: Optional[str]
    peer_id: str
    is_self: bool
    state: str
    incarnation: int
    connected: bool
    last_heard_ms_ago: Optional[int]
    rtt_ms: Optional[float]
    addresses: List[str]
    tags: Dict[str, str]
    jobs: Dict[str, float]
    health: Optional[Dict[str, Any]]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "Member":
        return cls(
            name=v.get("name"),
            peer_id=str(v.get("peer_id", "")),
            is_self=bool(v.get("is_self", False)),
            state=str(v.get("state", "")),
            incarnation=int(v.get("incarnation", 0)),
            connected=bool(v.get("connected", False)),
            last_heard_ms_ago=v.get("last_heard_ms_ago"),
            rtt_ms=v.get("rtt_ms"),
            addresses=list(v.get("addresses") or []),
            tags=dict(v.get("tags") or {}),
            jobs=dict(v.get("jobs") or {}),
            health=v.get("health"),
            raw=v,
        )


@dataclass
class LeaderInfo:
    """``GET /v1/leader``: ``term`` is the leadership fencing token."""

    leader: Optional[str]
    leader_peer_id: Optional[str]
    term: Optional[int]
    since_ms: Optional[int]
    is_self: bool
    role: str
    voters: List[str]
    is_voter: bool
    note: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "LeaderInfo":
        return cls(
            leader=v.get("leader"),
            leader_peer_id=v.get("leader_peer_id"),
            term=v.get("term"),
            since_ms=v.get("since_ms"),
            is_self=bool(v.get("is_self", False)),
            role=str(v.get("role", "")),
            voters=list(v.get("voters") or []),
            is_voter=bool(v.get("is_voter", False)),
            note=v.get("note"),
            raw=v,
        )


@dataclass
class LockInfo:
    name: str
    holder: str
    token: int
    ttl_ms: int
    expires_ms: int

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "LockInfo":
        return cls(
            name=str(v["name"]),
            holder=str(v.get("holder", "")),
            token=int(v["token"]),
            ttl_ms=int(v.get("ttl_ms", 0)),
            expires_ms=int(v.get("expires_ms", 0)),
        )


@dataclass
class BlobAdded:
    """The answer to :meth:`Client.blob_add`: ``blob`` is the SHA-256 of the file."""

    blob: str
    name: str
    size: int
    root: str
    chunk_size: int
    chunks: int
    stored: str
    event: str
    event_id: str
    event_duplicate: bool
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "BlobAdded":
        return cls(
            blob=str(v["blob"]),
            name=str(v.get("name", "")),
            size=int(v.get("size", 0)),
            root=str(v.get("root", "")),
            chunk_size=int(v.get("chunk_size", 0)),
            chunks=int(v.get("chunks", 0)),
            stored=str(v.get("stored", "")),
            event=str(v.get("event", "")),
            event_id=str(v.get("event_id", "")),
            event_duplicate=bool(v.get("event_duplicate", False)),
            raw=v,
        )


@dataclass
class BlobInfo:
    """``GET /v1/blob``: ``state`` is complete, fetching, partial or absent."""

    blob: str
    size: Optional[int]
    state: str
    chunks_have: Optional[int]
    transfer: Optional[Dict[str, Any]]
    last_failure: Optional[Dict[str, Any]]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "BlobInfo":
        return cls(
            blob=str(v.get("blob", "")),
            size=v.get("size"),
            state=str(v.get("state", "")),
            chunks_have=v.get("chunks_have"),
            transfer=v.get("transfer"),
            last_failure=v.get("last_failure"),
            raw=v,
        )


@dataclass
class HandlerFailure:
    """What an ``on_error`` callback is given when a handler raised.

    ``attempt`` counts this handler's runs on this event (1 on the first);
    ``final`` is true when no retry follows: the event is dead-lettered for
    this consumer (``consumer``) and the consumer moves on. Otherwise the
    handler runs again after ``retry_in`` seconds.
    """

    consumer: str
    handler: str
    event: Event
    error: BaseException
    attempt: int
    max_attempts: int
    final: bool
    retry_in: Optional[float]
