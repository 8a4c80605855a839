"""The client of the local riftmesh agent (HTTP/JSON API, proto-notes/api.md)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import os
import re
import signal
import stat
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from ._transport import Abort, Aborted, Transport, format_address, quote, resolve_address, resolve_token
from .errors import (
    AgentUnavailable,
    BlobFetchError,
    ClientError,
    NotFound,
    RiftmeshError,
    RiftmeshTimeout,
    ServerError,
    Unavailable,
)
from .lock import Lock
from .models import (
    Batch,
    BlobAdded,
    BlobInfo,
    ConsumerInfo,
    DeadLetter,
    Event,
    HistoryPage,
    LeaderInfo,
    LockInfo,
    Member,
    Published,
    Spooled,
    Trace,
)
from .patterns import TypeLike, TypePattern, type_name
from .spool import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, FlushResult, Spool, default_spool_dir

__all__ = ["Client", "Handler", "TimeLike"]

log = logging.getLogger("riftmesh")

Handler = Callable[[Event], Union[None, Awaitable[None], Any]]
"""A subscription handler: ``def h(event)`` or ``async def h(event)``."""

H = TypeVar("H", bound=Callable[..., Any])

TimeLike = Union[datetime, timedelta, str, int, float]
"""A point in time for ``since=``: a ``datetime`` (naive means local time), a
``timedelta`` (that long ago), a number (Unix time in seconds, as
``time.time()``), or a string the agent parses (``"10m"``, ``"2h"``,
``"2026-11-23T10:00:00Z"``)."""

# Longest long-poll the agent accepts.
MAX_WAIT = 60.0
# Largest nack reason the agent accepts, in bytes.
MAX_REASON = 4096
_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _since_param(since: TimeLike) -> Union[str, int]:
    """``since`` as the agent takes it: ms since the epoch, or its own text."""
    if isinstance(since, bool):
        raise TypeError("since= takes a datetime, timedelta, number of seconds or string")
    if isinstance(since, datetime):
        return int(since.timestamp() * 1000)
    if isinstance(since, timedelta):
        return int((time.time() - since.total_seconds()) * 1000)
    if isinstance(since, (int, float)):
        return int(since * 1000)
    if isinstance(since, str):
        return since
    raise TypeError(f"since= cannot be a {type(since).__name__}")


def _patterns(args: Sequence[Union[TypeLike, Iterable[TypeLike]]]) -> List[str]:
    out: List[str] = []
    for a in args:
        if isinstance(a, (str, Enum)):
            out.append(type_name(a))
        else:
            out.extend(type_name(x) for x in a)
    return out


def blob_upload(
    http: "Transport",
    path: Union[str, "os.PathLike[str]"],
    name: str,
    event: Optional[TypeLike],
    link: Optional[Dict[str, Optional[str]]] = None,
) -> BlobAdded:
    """Stream a local file to ``POST /v1/blobs/upload`` (shared by both clients)."""
    query: Dict[str, Any] = {"name": name}
    if event is not None:
        query["event"] = type_name(event)
    for k, v in (link or {}).items():
        if v is not None:
            query[k] = v
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; the
    # type is checked on the descriptor before anything is read.
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{os.fspath(path)!r} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        # Sending and hashing a large model outlasts the usual timeout.
        v = http.upload("/v1/blobs/upload", f, st.st_size, query=query, timeout=max(http.timeout, 6 * 3600.0))
    return BlobAdded.from_json(v)


def naming_link(
    source: Optional[str], correlation_id: Optional[str], parent_id: Optional[str], caused_by: Optional[Event]
) -> Dict[str, Optional[str]]:
    """A naming event's ``source``, ``correlation_id`` and ``parent_id``."""
    if caused_by is not None:
        parent_id = parent_id or caused_by.id
        correlation_id = correlation_id or caused_by.chain_id
    return {"source": source, "correlation_id": correlation_id, "parent_id": parent_id}


def _callable_name(fn: Callable[..., Any]) -> str:
    mod = getattr(fn, "__module__", None) or ""
    if mod == "__main__":
        script = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0]
        mod = script if script and script != "-c" else "main"
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{qual}" if mod else qual


def _default_consumer(fn: Callable[..., Any]) -> str:
    """A stable consumer name from the handler's module and name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", _callable_name(fn)).strip("._-") or "handler"
    if len(name) > 64:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name[-55:].lstrip("._-") + "-" + digest
    return name


# Consumers with the same types that are looked at when a new one is created.
_BACKLOG_CANDIDATES = 5
_BACKLOG_PEEK = 100


def _same_types(infos: Sequence[ConsumerInfo], name: str, types: Sequence[str]) -> List[ConsumerInfo]:
    """Other consumers whose type patterns are exactly ``types`` (a renamed one looks so)."""
    want = sorted(types)
    out = [c for c in infos if c.name != name and sorted(c.types) == want]
    return out[:_BACKLOG_CANDIDATES]


def _backlog_warning(name: str, found: Sequence[Tuple[ConsumerInfo, int]]) -> str:
    """The warning for a new consumer while consumers with its types have unacknowledged events."""
    parts = "; ".join(
        f"{c.name} has {n}{'+' if n >= _BACKLOG_PEEK else ''} unacknowledged event(s) after its cursor {c.cursor}"
        for c, n in found
    )
    return (
        f"consumer {name} does not exist yet and starts with the events published from now on, "
        f"while another consumer with the same types has a backlog ({parts}). If this handler "
        f"or service was renamed, pass consumer={found[0][0].name!r} to keep its place "
        "(or from_start=True / since= to replay); if the old consumer is unused, delete it"
    )


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def _event_body(
    type: TypeLike,
    payload: Any = None,
    *,
    source: Optional[str] = None,
    correlation_id: Optional[str] = None,
    parent_id: Optional[str] = None,
    caused_by: Optional[Event] = None,
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"type": type_name(type)}
    if payload is not None:
        body["payload"] = payload
    if caused_by is not None:
        parent_id = parent_id or caused_by.id
        correlation_id = correlation_id or caused_by.chain_id
    if source is not None:
        # Sent under its older request name, which agents before `source`
        # also take (a rolling upgrade has both); the agent stores the same.
        body["origin"] = source
    if correlation_id is not None:
        body["correlation_id"] = correlation_id
    if parent_id is not None:
        body["parent_id"] = parent_id
    return body


# ------------------------------------------------------------ idempotency keys and retries

# Errors after which a keyed publish is sent again: nothing answered, no answer
# in time, or 503. The key makes a second copy of a publish that did land a
# duplicate of the first.
RETRYABLE = (AgentUnavailable, RiftmeshTimeout, Unavailable)
# Backoff of those retries: doubling from the first delay up to the cap.
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 2.0
_EVENT_FIELDS = frozenset({"type", "payload", "source", "correlation_id", "parent_id", "caused_by", "idempotency_key"})


def subscription_counts_of(v: Dict[str, Any], cluster: bool, by_host: bool) -> Dict[str, Any]:
    """The counts of a ``GET /v1/subscriptions`` answer (see ``Client.subscription_counts``)."""
    out: Dict[str, Any] = {}
    for h in v.get("hosts", []):
        if h.get("subscriptions") is None or not (cluster or h.get("is_self")):
            continue
        host = h.get("name") or h.get("peer_id")
        for pattern, n in h["subscriptions"].items():
            if by_host:
                out.setdefault(pattern, {})[host] = n
            else:
                out[pattern] = out.get(pattern, 0) + n
    return out


def new_key() -> str:
    """A fresh idempotency key (a random UUID, 32 hex digits)."""
    return uuid.uuid4().hex


def _with_key(body: Dict[str, Any], idempotency_key: Optional[str], by_content: bool) -> Optional[str]:
    """Put the publish's key in ``body`` (a new one unless given); none with ``by_content``."""
    if by_content:
        if idempotency_key is not None:
            raise ValueError("give idempotency_key= or by_content=True, not both")
        return None
    key = new_key() if idempotency_key is None else idempotency_key
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a str, not {type(key).__name__}")
    body["idempotency_key"] = key
    return key


def _publish_body(
    type: TypeLike,
    payload: Any,
    *,
    source: Optional[str],
    correlation_id: Optional[str],
    parent_id: Optional[str],
    caused_by: Optional[Event],
    idempotency_key: Optional[str],
    by_content: bool,
) -> Tuple[Dict[str, Any], Optional[str]]:
    body = _event_body(
        type, payload, source=source, correlation_id=correlation_id, parent_id=parent_id, caused_by=caused_by
    )
    return body, _with_key(body, idempotency_key, by_content)


def _batch_bodies(
    events: Iterable[Union[Mapping[str, Any], Tuple[TypeLike, Any]]], by_content: bool
) -> Tuple[List[Dict[str, Any]], List[Optional[str]]]:
    """The request items of a batch and their keys (one new key per item)."""
    items: List[Dict[str, Any]] = []
    keys: List[Optional[str]] = []
    for e in events:
        if isinstance(e, Mapping):
            kw = dict(e)
            unknown = set(kw) - _EVENT_FIELDS
            if unknown:
                raise TypeError(f"unknown event fields {sorted(unknown)}")
            key = kw.pop("idempotency_key", None)
            body = _event_body(kw.pop("type"), kw.pop("payload", None), **kw)
        else:
            t, p = e
            key = None
            body = _event_body(t, p)
        keys.append(_with_key(body, key, by_content))
        items.append(body)
    return items, keys


# Errors after which publish_or_spool spools: the agent did not take the
# publish (unreachable, no answer in time, 5xx) after its retries.
SPOOL_ON = (AgentUnavailable, RiftmeshTimeout, ServerError)

FireResult = Optional[Union[Published, Spooled]]
"""What ``publish(..., fire_and_forget=True)`` returns: the :class:`Published`,
the :class:`Spooled` file, or ``None`` when it was dropped (logged)."""


def _fire_body(
    type: TypeLike, payload: Any, kw: Dict[str, Any]
) -> Tuple[Dict[str, Any], str]:
    """The keyed request body of a fire-and-forget publish."""
    if kw.pop("by_content", False):
        raise ValueError("fire_and_forget=True needs an idempotency key: by_content=True cannot be spooled")
    body, key = _publish_body(type, payload, by_content=False, **kw)
    assert key is not None
    return body, key


def _fire_failed(what: Any, e: BaseException) -> None:
    log.error("fire_and_forget %s failed: %s: %s", what, e.__class__.__name__, e)


def _spool_for(spool_dir: Optional[Union[str, "os.PathLike[str]"]], max_files: int, max_bytes: int) -> Spool:
    return Spool(spool_dir if spool_dir is not None else default_spool_dir(), max_files=max_files, max_bytes=max_bytes)


def _flush_outcome(res: FlushResult, answer: Dict[str, Any]) -> None:
    if answer.get("duplicate"):
        res.duplicates += 1
    else:
        res.sent += 1


class _Retry:
    """When a keyed publish is sent again: after a :data:`RETRYABLE` error, for
    ``retry_for`` seconds in all, waiting 0.05 s, 0.1 s, ... up to 2 s between tries."""

    def __init__(self, retry_for: float, keyed: bool) -> None:
        self.keyed = keyed
        self.deadline = time.monotonic() + max(0.0, float(retry_for))
        self.delay = RETRY_FIRST_DELAY
        self.tries = 0

    def wait_after(self, err: BaseException) -> Optional[float]:
        """Seconds to wait before the next try, or ``None``: give up and raise ``err``."""
        self.tries += 1
        if not self.keyed or not isinstance(err, RETRYABLE):
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        d = min(self.delay, left)
        self.delay = min(self.delay * 2.0, RETRY_MAX_DELAY)
        if self.tries == 1:
            log.info("publish failed (%s: %s); retrying with the same key for up to %.1f s", type(err).__name__, err, left)
        return d


def _latest_query(
    types: Optional[Union[TypeLike, Iterable[TypeLike]]], limit: int, before: Optional[int]
) -> Dict[str, Any]:
    """The query of one newest-first history page (``latest``)."""
    q: Dict[str, Any] = {"order": "desc", "limit": max(1, min(limit, 1000))}
    if types is not None:
        pats = _patterns([types])
        if pats:
            q["types"] = ",".join(pats)
    if before is not None:
        q["before"] = before
    return q


@dataclass
class Subscription:
    """One handler registered with :meth:`Client.subscribe`."""

    handler: Callable[[Event], Any]
    patterns: List[TypePattern]
    consumer: str
    priority: int
    max_attempts: int
    backoff: float
    max_backoff: float
    index: int
    name: str = ""
    is_async: bool = False
    # Called with a HandlerFailure each time the handler raises (AsyncClient, router).
    on_error: Optional[Callable[[Any], Any]] = None
    # AsyncClient: run a plain (non-async) handler in a worker thread (else on the loop).
    in_thread: bool = True

    def matches(self, type_: str) -> bool:
        return not self.patterns or any(p.matches(type_) for p in self.patterns)

    def delay(self, failures: int) -> float:
        """Seconds to wait before the retry that follows the ``failures``-th failure."""
        return float(min(self.max_backoff, self.backoff * 2.0 ** (failures - 1)))


@dataclass
class _Start:
    from_start: bool = False
    since: Optional[Union[str, int]] = None
    after_seq: Optional[int] = None

    def body(self) -> Dict[str, Any]:
        b: Dict[str, Any] = {}
        if self.from_start:
            b["from_start"] = True
        if self.since is not None:
            b["since"] = str(self.since)
        if self.after_seq is not None:
            b["after_seq"] = self.after_seq
        return b


@dataclass
class _Group:
    """The subscriptions that share one durable consumer."""

    consumer: str
    subs: List[Subscription] = field(default_factory=list)
    start: Optional[_Start] = None
    abort: Abort = field(default_factory=Abort)

    def types(self) -> List[str]:
        if any(not s.patterns for s in self.subs):
            return []
        out: List[str] = []
        for s in self.subs:
            for p in s.patterns:
                if p.text not in out:
                    out.append(p.text)
        return out

    def handlers_for(self, ev: Event) -> List[Subscription]:
        hs = [s for s in self.subs if s.matches(ev.type)]
        hs.sort(key=lambda s: (-s.priority, s.index))
        return hs


class _Outcome:
    """What the runner does with an event after its handlers ran."""

    def __init__(self) -> None:
        self.unhandled = False
        self.failures: Dict[int, int] = {}
        self.errors: Dict[int, BaseException] = {}
        self.given_up: List[Subscription] = []
        self.next_at: Dict[int, float] = {}

    def reason(self, ev: Event) -> str:
        if self.unhandled:
            return (
                f"no handler of this process matches {ev.type} {ev.id} (the consumer's "
                "types were changed by another process, or this client's alias table is older than the agent's)"
            )
        parts = []
        for s in self.given_up:
            e = self.errors[s.index]
            parts.append(
                f"handler {s.name} failed {self.failures[s.index]} time(s) on {ev.type} "
                f"{ev.id}: {type(e).__name__}: {e}{_where(e)}"
            )
        return _truncate_utf8("; ".join(parts), MAX_REASON)

    @property
    def dead(self) -> bool:
        return self.unhandled or bool(self.given_up)


def _where(e: BaseException) -> str:
    """`` (at file:line in function)`` of the innermost frame of ``e``'s traceback."""
    tb = e.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f" (at {os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name})"


class Client:
    """A client of the local riftmesh agent.

    ``api`` is ``HOST:PORT`` (or ``http://HOST:PORT``); without it the client
    uses ``RIFTMESH_API``, else ``127.0.0.1:7411``. ``token`` is the agent's
    API token, sent as ``Authorization: Bearer`` (an agent whose API is not
    on loopback, or has ``api_token_file``, answers 401 without it:
    :class:`~riftmesh.Unauthorized`); without it the client reads the file
    named by ``RIFTMESH_API_TOKEN_FILE``, if set. ``timeout`` bounds every
    request (long polls get their wait on top). The subscription defaults
    (``max_attempts``, ``backoff``, ``max_backoff``) apply to handlers that do
    not set their own.
    """

    def __init__(
        self,
        api: Optional[str] = None,
        *,
        token: Optional[str] = None,
        timeout: float = 30.0,
        poll_wait: float = 25.0,
        batch_size: int = 100,
        max_attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        retry_for: float = 10.0,
        spool_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        spool_max_files: int = DEFAULT_MAX_FILES,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        host, port = resolve_address(api)
        token = resolve_token(token)
        self.address = format_address(host, port)
        self.timeout = timeout
        self.poll_wait = min(float(poll_wait), MAX_WAIT)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_for = retry_for
        self.spool = _spool_for(spool_dir, spool_max_files, spool_max_bytes)
        # publish(..., fire_and_forget=True) calls that were dropped (logged: a full spool, a 4xx ...).
        self.fire_errors = 0
        self._http = Transport(host, port, timeout, token)
        self._subs: List[Subscription] = []
        self._starts: Dict[str, _Start] = {}
        self._stop = threading.Event()
        self._async_stop: Optional[Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = None
        self._groups: List[_Group] = []
        self._threads: List[threading.Thread] = []
        self._errors: List[BaseException] = []
        self._running = False

    def __repr__(self) -> str:
        return f"<riftmesh.Client {self.address}>"

    # ================================================================ agent

    def health(self) -> bool:
        """True if the agent answers ``GET /v1/health``; raises if it does not."""
        return bool(self._http.request("GET", "/v1/health").get("ok"))

    def status(self) -> Dict[str, Any]:
        """``GET /v1/status`` as the agent returns it."""
        return self._http.request("GET", "/v1/status")  # type: ignore[no-any-return]

    def peers(self) -> List[Dict[str, Any]]:
        """The peers this agent is connected to (``GET /v1/peers``)."""
        return list(self._http.request("GET", "/v1/peers")["peers"])

    def members(self) -> List[Member]:
        """Every host of the cluster as this agent knows it, itself first."""
        v = self._http.request("GET", "/v1/members")
        return [Member.from_json(m) for m in v["members"]]

    def leader(self) -> LeaderInfo:
        """The current leader and its term (the fencing token)."""
        return LeaderInfo.from_json(self._http.request("GET", "/v1/leader"))

    def types(self) -> List[Dict[str, Any]]:
        """The agent's event type catalog (``GET /v1/types``)."""
        return list(self._http.request("GET", "/v1/types")["types"])

    def report_jobs(self, jobs: Mapping[str, Optional[float]], *, ttl: Optional[float] = None) -> Dict[str, float]:
        """Set (or with ``None`` remove) this host's job counters; they travel with
        its health record. With ``ttl`` they are dropped unless set again in time."""
        body: Dict[str, Any] = {"jobs": dict(jobs)}
        if ttl is not None:
            body["ttl_secs"] = max(1, math.ceil(ttl))
        return dict(self._http.request("POST", "/v1/jobs", body=body)["jobs"])

    # ================================================================ publish

    @overload
    def publish(
        self,
        type: TypeLike,
        payload: Any = None,
        *,
        source: Optional[str] = None,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        caused_by: Optional[Event] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
        fire_and_forget: Literal[False] = False,
    ) -> Published: ...

    @overload
    def publish(
        self,
        type: TypeLike,
        payload: Any = None,
        *,
        source: Optional[str] = None,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        caused_by: Optional[Event] = None,
        idempotency_key: Optional[str] = None,
        by_content: Literal[False] = False,
        retry_for: Optional[float] = None,
        fire_and_forget: Literal[True],
    ) -> FireResult: ...

    @overload
    def publish(
        self,
        type: TypeLike,
        payload: Any = None,
        *,
        source: Optional[str] = None,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        caused_by: Optional[Event] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
        fire_and_forget: bool,
    ) -> FireResult: ...

    def publish(
        self,
        type: TypeLike,
        payload: Any = None,
        *,
        source: Optional[str] = None,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        caused_by: Optional[Event] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
        fire_and_forget: bool = False,
    ) -> FireResult:
        """Publish one event; returns its id and whether it was a duplicate.

        ``type`` is any accepted spelling or an :class:`~riftmesh.EventType`.
        ``source`` names the publishing component (the event's ``source``;
        the agent that signed it is its ``node``). ``correlation_id`` and ``parent_id`` link events into a
        chain (:meth:`trace`); ``caused_by=event`` sets both from the event
        that caused this one. The call returns once the event is on disk.

        Every call is a new fact: it sends a new idempotency key
        (``idempotency_key=`` sets it; every publish of this type with that
        key is one event). While the agent is unreachable, does not answer
        in time or answers 503, the same request (same key) is sent again for
        ``retry_for`` seconds (the client's default, 10 s; 0: never).
        ``by_content=True`` sends no key: the same type and payload within the
        agent's repeat window (30 s) is then a duplicate, and nothing is retried.

        ``fire_and_forget=True`` never raises for an agent that does not take
        the event: it is :meth:`publish_or_spool` tried once (``retry_for``
        defaults to 0), so the event goes to the spool if the agent is
        unreachable, does not answer or answers 5xx. Anything else (a full
        spool, a 4xx answer, a payload that is not JSON) is logged as an error
        on the ``riftmesh`` logger, counted in :attr:`fire_errors` and the
        call returns ``None``. Returns the :class:`Published` or the
        :class:`Spooled`. Concurrent calls keep their call order (see
        :meth:`publish_or_spool`). ``by_content=True`` cannot be spooled and
        raises ``ValueError``.
        """
        if fire_and_forget:
            kw: Dict[str, Any] = dict(
                source=source, correlation_id=correlation_id, parent_id=parent_id, caused_by=caused_by,
                idempotency_key=idempotency_key, by_content=by_content,
            )
            return self._fire(type, payload, kw, retry_for)
        body, key = _publish_body(
            type,
            payload,
            source=source,
            correlation_id=correlation_id,
            parent_id=parent_id,
            caused_by=caused_by,
            idempotency_key=idempotency_key,
            by_content=by_content,
        )
        v = self._post_retrying("/v1/events", body, key is not None, retry_for)
        return Published.from_json(v, key)

    def _fire(self, event_type: TypeLike, payload: Any, kw: Dict[str, Any], retry_for: Optional[float]) -> FireResult:
        by_content = bool(kw.get("by_content"))
        try:
            body, key = _fire_body(event_type, payload, kw)
            place = self.spool.line.take()
        except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
            if by_content:
                raise
            self.fire_errors += 1
            _fire_failed(event_type, e)
            return None
        try:
            return self._publish_in_line(place, body, key, 0.0 if retry_for is None else retry_for)
        except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
            self.fire_errors += 1
            _fire_failed(body["type"], e)
            return None

    def publish_batch(
        self,
        events: Iterable[Union[Mapping[str, Any], Tuple[TypeLike, Any]]],
        *,
        by_content: bool = False,
        retry_for: Optional[float] = None,
    ) -> List[Published]:
        """Publish many events in one request (all validated before any is written).

        Each item is a ``(type, payload)`` pair or a mapping with the keyword
        arguments of :meth:`publish` (``type``, ``payload``, ``source``,
        ``correlation_id``, ``parent_id``, ``caused_by``, ``idempotency_key``).
        Results are in order. Each item gets its own new key (unless it
        gives one, or ``by_content=True``), and the request is retried as
        :meth:`publish` is.
        """
        items, keys = _batch_bodies(events, by_content)
        v = self._post_retrying("/v1/events/batch", {"events": items}, not by_content, retry_for)
        return [Published.from_json(r, k) for r, k in zip(v["results"], keys)]

    def _post_retrying(self, path: str, body: Dict[str, Any], keyed: bool, retry_for: Optional[float]) -> Any:
        retry = _Retry(self.retry_for if retry_for is None else retry_for, keyed)
        while True:
            try:
                return self._http.request("POST", path, body=body)
            except RiftmeshError as e:
                wait = retry.wait_after(e)
                if wait is None:
                    raise
            time.sleep(wait)

    # ================================================================ spool

    def publish_or_spool(
        self,
        type: TypeLike,
        payload: Any = None,
        *,
        source: Optional[str] = None,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        caused_by: Optional[Event] = None,
        idempotency_key: Optional[str] = None,
        retry_for: Optional[float] = None,
    ) -> Union[Published, Spooled]:
        """:meth:`publish`, or, when the agent does not take it within
        ``retry_for`` (unreachable, no answer, 5xx), a file in the local spool
        (:attr:`spool`): returns a :class:`Published` or a :class:`Spooled`.
        A 4xx answer raises as :meth:`publish` does; a full spool raises
        :class:`~riftmesh.SpoolFull`. While older publishes wait in the spool,
        they are flushed first (and if that fails this one is spooled behind
        them at once), so events from one spool reach the agent in order.

        Concurrent calls (threads, or tasks of an :class:`AsyncClient` on the
        same spool directory) take their place in line when called and go
        one at a time in that order: each is sent, or spooled, only after the
        calls made before it, so they reach the spool and the agent in call
        order even when they fail.
        """
        body, key = _publish_body(
            type,
            payload,
            source=source,
            correlation_id=correlation_id,
            parent_id=parent_id,
            caused_by=caused_by,
            idempotency_key=idempotency_key,
            by_content=False,
        )
        assert key is not None
        return self._publish_in_line(self.spool.line.take(), body, key, retry_for)

    def _publish_in_line(
        self, place: int, body: Dict[str, Any], key: str, retry_for: Optional[float]
    ) -> Union[Published, Spooled]:
        """Send or spool ``body`` when ``place``'s turn in the spool's line comes."""
        line = self.spool.line
        try:
            line.wait(place)
            if self.spool.has_pending() and self.flush_spool().error is not None:
                return Spooled(key=key, path=str(self.spool.put(body)), type=body["type"])
            try:
                v = self._post_retrying("/v1/events", body, True, retry_for)
            except SPOOL_ON as e:
                path = self.spool.put(body)
                log.warning("the agent did not take a %s publish (%s); spooled as %s", body["type"], e, path)
                return Spooled(key=key, path=str(path), type=body["type"])
            return Published.from_json(v, key)
        finally:
            line.leave(place)

    def flush_spool(self) -> FlushResult:
        """Send the spooled publishes, oldest first, each with its own key, and
        delete each file once the agent answered it (new or duplicate). A 4xx
        answer moves the file to ``rejected/``. Stops at the first error that
        leaves the agent unable to take them (``FlushResult.error``)."""
        res = FlushResult()
        sp = self.spool
        sp.clean_tmp()
        for path in sp.pending():
            try:
                body = sp.load(path)
            except FileNotFoundError:
                continue  # another flusher sent it meanwhile
            except (OSError, ValueError) as e:
                sp.reject(path, f"unreadable spool file: {e}")
                res.rejected += 1
                continue
            try:
                v = self._http.request("POST", "/v1/events", body=body)
            except ClientError as e:
                sp.reject(path, str(e))
                res.rejected += 1
                continue
            except RiftmeshError as e:
                res.error = e
                break
            sp.done(path)
            _flush_outcome(res, v)
        res.pending = len(sp.pending())
        return res

    # ================================================================ history

    def event(self, id: str) -> Event:
        """One retained event by id (``NotFound`` otherwise)."""
        return Event.from_json(self._http.request("GET", f"/v1/events/{quote(id)}"))

    def trace(self, id: str) -> Trace:
        """The chain of events linked to ``id`` (correlation and parent ids)."""
        v = self._http.request("GET", f"/v1/trace/{quote(id)}")
        return Trace(
            correlation_id=str(v["correlation_id"]),
            events=[(int(x["depth"]), Event.from_json(x["event"])) for x in v["events"]],
        )

    def history_page(
        self,
        types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None,
        *,
        since: Optional[TimeLike] = None,
        after: Optional[int] = None,
        limit: int = 100,
    ) -> HistoryPage:
        """One page of ``GET /v1/events``."""
        q: Dict[str, Any] = {"limit": limit}
        if types is not None:
            pats = _patterns([types])
            if pats:
                q["types"] = ",".join(pats)
        if after is not None:
            q["after"] = after
        elif since is not None:
            q["since"] = _since_param(since)
        v = self._http.request("GET", "/v1/events", query=q)
        return HistoryPage(
            events=[Event.from_json(e) for e in v["events"]],
            next_after=int(v["next_after"]),
            head=int(v["head"]),
        )

    def latest(self, types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None, n: int = 10) -> List[Event]:
        """The newest ``n`` retained events matching ``types``, oldest first
        (``GET /v1/events?order=desc``, paged back until ``n`` or the oldest)."""
        out: List[Event] = []
        before: Optional[int] = None
        while len(out) < n:
            v = self._http.request("GET", "/v1/events", query=_latest_query(types, n - len(out), before))
            out.extend(Event.from_json(e) for e in v["events"])
            if v.get("done", True):
                break
            before = int(v["next_before"])
        return out[:n][::-1]

    def history(
        self,
        types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None,
        *,
        since: Optional[TimeLike] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
        page_size: int = 100,
    ) -> Iterator[Event]:
        """Retained events in local ``seq`` order, paged as needed; nothing is
        acknowledged. ``after`` is a local sequence number (events after it),
        ``since`` a time (events this agent received at or after it); with
        neither, from the oldest retained event. ``types`` are patterns.
        ``limit`` caps how many are yielded."""
        count = 0
        page = self.history_page(types, since=since, after=after, limit=page_size)
        while True:
            for ev in page.events:
                if limit is not None and count >= limit:
                    return
                yield ev
                count += 1
            if page.next_after >= page.head:
                return
            page = self.history_page(types, after=page.next_after, limit=page_size)

    # ================================================================ consumers

    def subscription_counts(self, *, cluster: bool = True, by_host: bool = False) -> Dict[str, Any]:
        """Durable consumers per type pattern (``GET /v1/subscriptions``):
        ``{pattern: total}`` over every live host (``cluster=True``) or this
        agent only; with ``by_host=True``, ``{pattern: {host: count}}``. Other
        hosts' counts are as fresh as their last health record (about
        ``health_interval``); hosts whose agent sends none are left out."""
        return subscription_counts_of(self._http.request("GET", "/v1/subscriptions"), cluster, by_host)

    def consumers(self) -> List[ConsumerInfo]:
        return [ConsumerInfo.from_json(c) for c in self._http.request("GET", "/v1/consumers")]

    def consumer(self, name: str) -> Optional[ConsumerInfo]:
        """The named durable consumer, or ``None`` if it does not exist."""
        for c in self.consumers():
            if c.name == name:
                return c
        return None

    def create_consumer(
        self,
        name: str,
        types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None,
        *,
        from_start: bool = False,
        since: Optional[TimeLike] = None,
        after_seq: Optional[int] = None,
        from_now: bool = False,
    ) -> ConsumerInfo:
        """Create or update a durable consumer (``PUT /v1/consumers/{name}``).

        ``types=None`` keeps the current patterns (all types for a new one). A
        start option moves the cursor every time it is given; without one a new
        consumer starts at the head and an existing one keeps its cursor."""
        body: Dict[str, Any] = {}
        if types is not None:
            body["types"] = _patterns([types])
        if from_start:
            body["from_start"] = True
        if since is not None:
            body["since"] = str(_since_param(since))
        if after_seq is not None:
            body["after_seq"] = after_seq
        if from_now:
            body["from_now"] = True
        v = self._http.request("PUT", f"/v1/consumers/{quote(name)}", body=body)
        return ConsumerInfo.from_json(v)

    def replay(
        self,
        consumer: str,
        *,
        since: Optional[TimeLike] = None,
        after_seq: Optional[int] = None,
        from_start: bool = False,
    ) -> ConsumerInfo:
        """Move a durable consumer's cursor back so its handlers get those events
        again: to just before ``since`` (a time), to ``after_seq`` (a local
        sequence number), or to the oldest retained event."""
        if sum(x is not None and x is not False for x in (since, after_seq, from_start or None)) != 1:
            raise ValueError("replay() takes exactly one of since=, after_seq=, from_start=True")
        return self.create_consumer(consumer, since=since, after_seq=after_seq, from_start=from_start)

    def delete_consumer(self, name: str) -> ConsumerInfo:
        """Remove a consumer and its dead letters."""
        return ConsumerInfo.from_json(self._http.request("DELETE", f"/v1/consumers/{quote(name)}"))

    def fetch(
        self,
        consumer: str,
        *,
        max: int = 100,
        wait: float = 0.0,
        timeout: Optional[float] = None,
        _abort: Optional[Abort] = None,
    ) -> Batch:
        """Events after the consumer's cursor (fetching does not move it).

        ``wait`` long-polls up to that many seconds (at most 60) for a first
        event. ``timeout`` is the HTTP timeout; by default the client's plus
        ``wait``."""
        wait = min(max_wait(wait), MAX_WAIT)
        t = timeout if timeout is not None else self.timeout + wait
        v = self._http.request(
            "GET",
            f"/v1/consumers/{quote(consumer)}/events",
            query={"max": max, "wait_ms": int(wait * 1000)},
            timeout=t,
            abort=_abort,
        )
        return Batch(
            consumer=str(v["consumer"]),
            events=[Event.from_json(e) for e in v["events"]],
            missed=int(v.get("missed", 0)),
            cursor=int(v["cursor"]),
            head=int(v["head"]),
        )

    def ack(self, consumer: str, seq: int) -> ConsumerInfo:
        """Acknowledge everything up to and including ``seq``."""
        v = self._http.request("POST", f"/v1/consumers/{quote(consumer)}/ack", body={"seq": seq})
        return ConsumerInfo.from_json(v)

    def nack(self, consumer: str, seq: int, reason: str) -> ConsumerInfo:
        """Dead-letter ``seq`` with ``reason`` (this also acknowledges up to it)."""
        v = self._http.request(
            "POST",
            f"/v1/consumers/{quote(consumer)}/nack",
            body={"seq": seq, "reason": _truncate_utf8(reason or "failed", MAX_REASON)},
        )
        return ConsumerInfo.from_json(v)

    def dead_letters(self, consumer: str) -> List[DeadLetter]:
        v = self._http.request("GET", f"/v1/consumers/{quote(consumer)}/dead-letters")
        return [DeadLetter.from_json(d) for d in v["dead_letters"]]

    # ================================================================ subscribe

    def subscribe(
        self,
        *patterns: Union[TypeLike, Iterable[TypeLike]],
        consumer: Optional[str] = None,
        priority: int = 0,
        max_attempts: Optional[int] = None,
        backoff: Optional[float] = None,
        max_backoff: Optional[float] = None,
        from_start: bool = False,
        since: Optional[TimeLike] = None,
        after_seq: Optional[int] = None,
    ) -> Callable[[H], H]:
        """Register a handler for the events whose type matches one of ``patterns``
        (none: every type). Use it as a decorator; the function is returned as is.

        ``consumer`` names the durable consumer (cursor and dead letters kept by
        the agent across restarts); by default the handler's module and name.
        Handlers that share a consumer name share its cursor: each event runs
        the matching handlers one after another, higher ``priority`` first,
        and is acknowledged once they all returned. A handler that raises is
        retried (``backoff`` seconds, doubling up to ``max_backoff``) without
        running again the handlers that succeeded; after ``max_attempts`` runs
        the event is dead-lettered with the error and the consumer moves on.

        ``from_start``, ``since`` or ``after_seq`` say where a consumer that
        does not exist yet starts (default: new events only). An existing
        consumer always resumes after its last acknowledged event; use
        :meth:`replay` to move it back.
        """
        pats = [TypePattern(p) for p in _patterns(patterns)]
        start_opts = sum(x for x in (from_start, since is not None, after_seq is not None))
        if start_opts > 1:
            raise ValueError("give at most one of from_start=, since=, after_seq=")

        def register(fn: H) -> H:
            if not callable(fn):
                raise TypeError("subscribe() decorates a callable")
            name = consumer if consumer is not None else _default_consumer(fn)
            if not _CONSUMER_NAME.match(name):
                raise ValueError(f"consumer name {name!r}: use 1-64 of A-Z a-z 0-9 - _ .")
            if start_opts:
                st = _Start(
                    from_start=from_start,
                    since=_since_param(since) if since is not None else None,
                    after_seq=after_seq,
                )
                old = self._starts.get(name)
                if old is not None and old != st:
                    raise ValueError(f"consumer {name!r} was given two different start options")
                self._starts[name] = st
            sub = Subscription(
                handler=fn,
                patterns=pats,
                consumer=name,
                priority=priority,
                max_attempts=max(1, max_attempts if max_attempts is not None else self.max_attempts),
                backoff=backoff if backoff is not None else self.backoff,
                max_backoff=max_backoff if max_backoff is not None else self.max_backoff,
                index=len(self._subs),
                name=_callable_name(fn),
                is_async=inspect.iscoroutinefunction(fn)
                or inspect.iscoroutinefunction(getattr(fn, "__call__", None)),
            )
            self._subs.append(sub)
            return fn

        return register

    @property
    def subscriptions(self) -> List[Subscription]:
        return list(self._subs)

    def _make_groups(self) -> List[_Group]:
        groups: Dict[str, _Group] = {}
        for s in self._subs:
            g = groups.get(s.consumer)
            if g is None:
                g = groups[s.consumer] = _Group(consumer=s.consumer, start=self._starts.get(s.consumer))
            g.subs.append(s)
        if not groups:
            raise RuntimeError("nothing to run: register handlers with @client.subscribe(...) first")
        return list(groups.values())

    def _ensure_consumer(self, g: _Group) -> None:
        infos = self.consumers()
        exists = any(c.name == g.consumer for c in infos)
        body: Dict[str, Any] = {"types": g.types()}
        if not exists and g.start is not None:
            body.update(g.start.body())
        if not exists and g.start is None:
            self._warn_backlog(g.consumer, body["types"], infos)
        self._http.request("PUT", f"/v1/consumers/{quote(g.consumer)}", body=body)
        log.info("consumer %s: types %s%s", g.consumer, body["types"] or "all", "" if exists else " (new)")

    def _warn_backlog(self, name: str, types: List[str], infos: Sequence[ConsumerInfo]) -> None:
        """Warn when a new consumer would leave another's backlog behind (a rename)."""
        found: List[Tuple[ConsumerInfo, int]] = []
        for c in _same_types(infos, name, types):
            try:
                n = len(self.fetch(c.name, max=_BACKLOG_PEEK).events)
            except RiftmeshError:
                continue
            if n:
                found.append((c, n))
        if found:
            log.warning("%s", _backlog_warning(name, found))

    # ---------------------------------------------------------------- stop

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Stop the subscription runners: in-flight long polls are cut short, an
        event whose handlers are running is finished first. Waits up to
        ``timeout`` for :meth:`start`'s threads, then raises the error that
        ended a runner, if any."""
        self._request_stop()
        me = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            if t is me:
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if all(not t.is_alive() for t in self._threads):
            self._threads = []
        self._raise_errors()

    def _raise_errors(self) -> None:
        if self._errors:
            err = self._errors[0]
            self._errors = []
            raise err

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _begin(self, is_async: bool) -> List[_Group]:
        if self._running or any(t.is_alive() for t in self._threads):
            raise RuntimeError("this client is already running its subscriptions")
        groups = self._make_groups()
        self._stop.clear()
        self._errors = []
        self._groups = groups
        self._threads = []
        self._running = is_async
        return groups

    # ---------------------------------------------------------------- sync runner

    def start(self) -> None:
        """Run the subscriptions in background threads (one per consumer) and
        return at once; :meth:`stop` ends them."""
        groups = self._begin(False)
        self._threads = [
            threading.Thread(
                target=self._thread_main, args=(g,), name=f"riftmesh-{g.consumer}", daemon=True
            )
            for g in groups
        ]
        for t in self._threads:
            t.start()

    def _request_stop(self) -> None:
        """Ask the runners to stop without waiting for them (safe in a signal handler)."""
        self._stop.set()
        for g in self._groups:
            g.abort.abort()
        a = self._async_stop
        if a is not None:
            loop, ev = a
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass  # loop already closed

    def run(self, *, handle_sigterm: bool = True) -> None:
        """Run the subscriptions until :meth:`stop` is called (from a handler or
        another thread), Ctrl-C, or SIGTERM (when called from the main thread and
        ``handle_sigterm``): the event being handled is finished and
        acknowledged first. Async handlers run on an event loop of their
        consumer's thread. Raises what ended a runner."""
        old: Any = None
        old_int: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        if handle_sigterm and in_main:
            old = signal.signal(signal.SIGTERM, lambda signum, frame: self._request_stop())
        # Ctrl-C asks the runners to stop instead of raising KeyboardInterrupt
        # into Thread.join: an interrupted join can mark a running thread as
        # ended (CPython's _wait_for_tstate_lock), and the process would then
        # exit while a handler runs, before its event is acknowledged. A second
        # Ctrl-C raises KeyboardInterrupt as usual.
        interrupted = threading.Event()

        def on_sigint(signum: int, frame: Any) -> None:
            if interrupted.is_set():
                raise KeyboardInterrupt
            interrupted.set()
            self._request_stop()

        if in_main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            old_int = signal.signal(signal.SIGINT, on_sigint)
        try:
            self.start()
            try:
                logged = False
                while any(t.is_alive() for t in self._threads):
                    for t in self._threads:
                        t.join(0.5)
                        if interrupted.is_set() and not logged:
                            logged = True
                            log.info("interrupted: stopping")
            except KeyboardInterrupt:
                log.info("interrupted: stopping")
            finally:
                self.stop(None)
        finally:
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)
            if handle_sigterm and in_main:
                signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)

    def _thread_main(self, g: _Group) -> None:
        loop: Optional[asyncio.AbstractEventLoop] = None
        try:
            if any(s.is_async for s in g.subs):
                loop = asyncio.new_event_loop()
            self._loop_sync(g, loop)
        except BaseException as e:  # noqa: BLE001 - reported by run()/stop()
            if not isinstance(e, Aborted):
                log.error("consumer %s stopped: %s", g.consumer, e)
                self._errors.append(e)
            self._stop.set()
            for other in self._groups:
                other.abort.abort()
        finally:
            if loop is not None:
                loop.close()

    def _retry_wait(self, failures: int) -> float:
        return float(min(10.0, 0.2 * 2.0 ** min(failures, 6)))

    def _loop_sync(self, g: _Group, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        failures = 0
        ensured = False
        while not self._stop.is_set():
            try:
                if not ensured:
                    self._ensure_consumer(g)
                    ensured = True
                batch = self.fetch(g.consumer, max=self.batch_size, wait=self.poll_wait, _abort=g.abort)
                failures = 0
            except Aborted:
                return
            except NotFound:
                log.warning("consumer %s disappeared; creating it again", g.consumer)
                ensured = False
                continue
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                wait = self._retry_wait(failures)
                log.warning("consumer %s: %s; retrying in %.1f s", g.consumer, e, wait)
                if self._stop.wait(wait):
                    return
                continue
            self._note_missed(g, batch)
            self._process_sync(g, batch, loop)

    def _note_missed(self, g: _Group, batch: Batch) -> None:
        if batch.missed:
            log.warning(
                "consumer %s: %d event(s) were removed by retention before they were acknowledged",
                g.consumer,
                batch.missed,
            )

    def _call_sync(self, s: Subscription, ev: Event, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        r = s.handler(ev)
        if inspect.isawaitable(r):
            if loop is None:
                loop = asyncio.new_event_loop()
                try:
                    loop.run_until_complete(r)
                finally:
                    loop.close()
            else:
                loop.run_until_complete(r)

    def _process_sync(self, g: _Group, batch: Batch, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        done = batch.cursor
        acked = batch.cursor
        for ev in batch.events:
            if self._stop.is_set():
                break
            out = _Outcome()
            pending = list(g.handlers_for(ev))
            if not pending:
                out.unhandled = True
                log.warning("consumer %s: no handler matches %s seq %d; dead-lettering it", g.consumer, ev.type, ev.seq)
            while pending:
                now = time.monotonic()
                due = [s for s in pending if out.next_at.get(s.index, 0.0) <= now]
                for s in due:
                    ev.attempt = out.failures.get(s.index, 0) + 1
                    try:
                        self._call_sync(s, ev, loop)
                        pending.remove(s)
                    except Exception as e:  # noqa: BLE001 - a handler's error is data
                        self._handler_failed(g, s, ev, e, out, pending)
                if pending:
                    if done > acked:
                        self._ack_quiet(g, done)
                        acked = done
                    wake = min(out.next_at[s.index] for s in pending)
                    if self._stop.wait(max(0.0, wake - time.monotonic())):
                        return  # not acknowledged: delivered again next time
            if out.dead:
                self._nack_sync(g, ev, out.reason(ev))
                acked = ev.seq
            done = ev.seq
        if done > acked:
            self._ack_quiet(g, done)

    def _handler_failed(
        self,
        g: _Group,
        s: Subscription,
        ev: Event,
        e: BaseException,
        out: _Outcome,
        pending: List[Subscription],
    ) -> None:
        n = out.failures.get(s.index, 0) + 1
        out.failures[s.index] = n
        out.errors[s.index] = e
        if n >= s.max_attempts:
            pending.remove(s)
            out.given_up.append(s)
            log.error(
                "consumer %s: handler %s failed %d time(s) on %s seq %d: %s: %s; dead-lettering it",
                g.consumer, s.name, n, ev.type, ev.seq, type(e).__name__, e,
            )
        else:
            d = s.delay(n)
            out.next_at[s.index] = time.monotonic() + d
            log.warning(
                "consumer %s: handler %s failed on %s seq %d (attempt %d of %d): %s: %s; retrying in %.2f s",
                g.consumer, s.name, ev.type, ev.seq, n, s.max_attempts, type(e).__name__, e, d,
            )

    def _ack_quiet(self, g: _Group, seq: int) -> None:
        """Acknowledge, retrying while the agent is away (until stopped)."""
        failures = 0
        while True:
            try:
                self.ack(g.consumer, seq)
                return
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                if self._stop.is_set() or failures > 20:
                    log.warning("consumer %s: ack of %d failed: %s; it will be delivered again", g.consumer, seq, e)
                    return
                time.sleep(self._retry_wait(failures))

    def _nack_sync(self, g: _Group, ev: Event, reason: str) -> None:
        failures = 0
        while True:
            try:
                self.nack(g.consumer, ev.seq, reason)
                return
            except NotFound:
                # Retention removed it meanwhile: nothing left to dead-letter.
                log.warning("consumer %s: seq %d is no longer retained; acknowledging it", g.consumer, ev.seq)
                self._ack_quiet(g, ev.seq)
                return
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                if self._stop.is_set() or failures > 20:
                    raise RiftmeshError(f"could not dead-letter seq {ev.seq} of consumer {g.consumer}: {e}") from e
                time.sleep(self._retry_wait(failures))

    # ---------------------------------------------------------------- async runner

    async def run_async(self, *, handle_sigterm: bool = True) -> None:
        """Run the subscriptions on the running event loop until :meth:`stop`,
        cancellation, or SIGTERM (on the main thread's loop, when
        ``handle_sigterm``). ``async def`` handlers are awaited on this loop;
        plain handlers run in a worker thread so they do not block it."""
        groups = self._begin(True)
        loop = asyncio.get_running_loop()
        stop_ev = asyncio.Event()
        self._async_stop = (loop, stop_ev)
        tasks = [asyncio.ensure_future(self._loop_async(g, stop_ev)) for g in groups]
        sig = False
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            try:
                loop.add_signal_handler(signal.SIGTERM, self._request_stop)
                sig = True
            except (NotImplementedError, RuntimeError):
                pass  # not on this platform or loop
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        finally:
            self._stop.set()
            for g in groups:
                g.abort.abort()
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if sig:
                loop.remove_signal_handler(signal.SIGTERM)
            self._async_stop = None
            self._running = False

    async def _sleep_or_stop(self, stop_ev: asyncio.Event, seconds: float) -> bool:
        """Sleep; True if stopped meanwhile."""
        if self._stop.is_set():
            return True
        try:
            await asyncio.wait_for(stop_ev.wait(), timeout=max(0.0, seconds))
            return True
        except asyncio.TimeoutError:
            return self._stop.is_set()

    async def _loop_async(self, g: _Group, stop_ev: asyncio.Event) -> None:
        failures = 0
        ensured = False
        while not self._stop.is_set():
            try:
                if not ensured:
                    await asyncio.to_thread(self._ensure_consumer, g)
                    ensured = True
                batch = await asyncio.to_thread(
                    self.fetch, g.consumer, max=self.batch_size, wait=self.poll_wait, _abort=g.abort
                )
                failures = 0
            except Aborted:
                return
            except NotFound:
                log.warning("consumer %s disappeared; creating it again", g.consumer)
                ensured = False
                continue
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                wait = self._retry_wait(failures)
                log.warning("consumer %s: %s; retrying in %.1f s", g.consumer, e, wait)
                if await self._sleep_or_stop(stop_ev, wait):
                    return
                continue
            self._note_missed(g, batch)
            await self._process_async(g, batch, stop_ev)

    async def _call_async(self, s: Subscription, ev: Event) -> None:
        if s.is_async:
            await s.handler(ev)
            return
        r = await asyncio.to_thread(s.handler, ev)
        if inspect.isawaitable(r):
            await r

    async def _process_async(self, g: _Group, batch: Batch, stop_ev: asyncio.Event) -> None:
        done = batch.cursor
        acked = batch.cursor
        for ev in batch.events:
            if self._stop.is_set():
                break
            out = _Outcome()
            pending = list(g.handlers_for(ev))
            if not pending:
                out.unhandled = True
                log.warning("consumer %s: no handler matches %s seq %d; dead-lettering it", g.consumer, ev.type, ev.seq)
            while pending:
                now = time.monotonic()
                due = [s for s in pending if out.next_at.get(s.index, 0.0) <= now]
                for s in due:
                    ev.attempt = out.failures.get(s.index, 0) + 1
                    try:
                        await self._call_async(s, ev)
                        pending.remove(s)
                    except Exception as e:  # noqa: BLE001
                        self._handler_failed(g, s, ev, e, out, pending)
                if pending:
                    if done > acked:
                        await asyncio.to_thread(self._ack_quiet, g, done)
                        acked = done
                    wake = min(out.next_at[s.index] for s in pending)
                    if await self._sleep_or_stop(stop_ev, wake - time.monotonic()):
                        return
            if out.dead:
                await asyncio.to_thread(self._nack_sync, g, ev, out.reason(ev))
                acked = ev.seq
            done = ev.seq
        if done > acked:
            await asyncio.to_thread(self._ack_quiet, g, done)

    # ================================================================ locks

    def lock(
        self,
        name: str,
        ttl: float = 30.0,
        *,
        holder: Optional[str] = None,
        wait: float = 0.0,
        renew_every: Optional[float] = None,
        timeout: float = 15.0,
        on_lost: Optional[Callable[[Lock], Any]] = None,
    ) -> Lock:
        """A cluster lock for a ``with`` (or ``async with``) block.

        Entering acquires it, waiting up to ``wait`` seconds while someone else
        holds it (:class:`~riftmesh.LockHeld` after that) and up to ``timeout``
        while no leader is known. It is renewed every ``ttl / 3`` in the
        background and released at the end. ``lock.token`` is the fencing
        token. ``holder`` defaults to ``<hostname>:<pid>``."""
        return Lock(
            self,
            name,
            ttl=ttl,
            holder=holder if holder is not None else f"{socket.gethostname()}:{os.getpid()}",
            wait=wait,
            renew_every=renew_every,
            timeout=timeout,
            on_lost=on_lost,
        )

    def locks(self) -> List[LockInfo]:
        """Every lock currently granted (read on the leader)."""
        v = self._http.request("GET", "/v1/locks")
        return [LockInfo.from_json(x) for x in v["locks"]]

    # ================================================================ blobs

    def blob_add(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        name: str,
        event: Optional[TypeLike] = None,
        source: Optional[str] = None,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        caused_by: Optional[Event] = None,
    ) -> BlobAdded:
        """Add a file to the agent's blob store under ``name`` and publish the
        naming event (``event``: ``BLOB_PUBLISHED`` by default, or
        ``MODEL_PROMOTED`` / ``GAME_BATCH_READY``). This process reads the
        file with its own permissions and streams the bytes to the agent
        (``POST /v1/blobs/upload``; the agent itself reads no file for a
        request unless ``blob_roots`` allows it); the caller may delete the
        file afterwards.

        ``source`` names the component (the naming event's ``source``);
        ``caused_by=event`` (or ``correlation_id`` / ``parent_id``) links
        the naming event into the run, and every host's MODEL_DISTRIBUTED /
        DATA_SYNC_* then carries the run's correlation id (:meth:`trace`)."""
        return blob_upload(self._http, path, name, event, naming_link(source, correlation_id, parent_id, caused_by))

    def blobs(self) -> Dict[str, Any]:
        """``GET /v1/blobs``: blobs held here and the names known."""
        return self._http.request("GET", "/v1/blobs")  # type: ignore[no-any-return]

    def blob_info(self, ref: str) -> BlobInfo:
        """State of a blob (by id or name) on this agent."""
        return BlobInfo.from_json(self._http.request("GET", "/v1/blob", query={"ref": ref}))

    def blob_forget(self, name: str) -> Dict[str, Any]:
        """Retract ``name`` cluster-wide (``POST /v1/blob/forget``): the agent
        publishes ``BLOB_FORGOTTEN``; no host fetches the name or retries it
        any more and it no longer resolves, until a later naming event binds
        it again. Files already placed stay where they are. Returns what was
        retracted: ``name``, ``blob``, ``size``, ``named_ms``,
        ``naming_event``, ``naming_event_id``, ``forgotten_ms``, ``event_id``.
        ``NotFound`` for a name not bound on this agent (never named, or
        forgotten already), ``BadRequest`` for an invalid name."""
        return self._http.request("POST", "/v1/blob/forget", body={"name": name})  # type: ignore[no-any-return]

    @overload
    def blob_get(
        self,
        ref: Union[str, Event],
        out: None = None,
        *,
        timeout: float = ...,
        name_wait: Optional[float] = ...,
        poll: float = ...,
    ) -> bytes: ...

    @overload
    def blob_get(
        self,
        ref: Union[str, Event],
        out: Union[str, "os.PathLike[str]"],
        *,
        timeout: float = ...,
        name_wait: Optional[float] = ...,
        poll: float = ...,
    ) -> Path: ...

    def blob_get(
        self,
        ref: Union[str, Event],
        out: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        timeout: float = 600.0,
        name_wait: Optional[float] = None,
        poll: float = 0.25,
    ) -> Union[Path, bytes]:
        """The content of a blob, fetched from peers if this agent does not hold
        it yet (waiting up to ``timeout`` seconds).

        ``ref`` is a blob id, a name, or a naming event (``BLOB_PUBLISHED``,
        ``MODEL_PROMOTED``, ``GAME_BATCH_READY``) as a handler receives it.
        The agent records names from naming events shortly *after* the events
        are in its log, so a name it does not know yet (404) is asked again
        for up to ``name_wait`` seconds: 10 by default, ``timeout`` for an
        event (its name is certain to come).

        With ``out`` the content is written there atomically (a temporary file
        in the same directory, then renamed) and the path is returned; without
        it the bytes are returned. The SHA-256 of what was read is checked
        against the blob id."""
        if isinstance(ref, Event):
            payload = ref.payload if isinstance(ref.payload, dict) else {}
            name = payload.get("name")
            if not isinstance(name, str):
                raise ValueError(f"event {ref.id} ({ref.type}) does not name a blob")
            ref = name
            grace = timeout if name_wait is None else name_wait
        else:
            grace = 10.0 if name_wait is None else name_wait
        deadline = time.monotonic() + timeout
        name_deadline = time.monotonic() + min(grace, timeout)
        while True:
            try:
                r = self._http.request("POST", "/v1/blob/fetch", body={"ref": ref})
                break
            except NotFound:
                if time.monotonic() >= name_deadline:
                    raise
                time.sleep(min(poll, 0.1))
        blob_id = str(r["blob"])
        state = str(r["state"])
        while state != "complete":
            if time.monotonic() > deadline:
                raise RiftmeshTimeout(self.address, "GET", f"/v1/blob?ref={ref} (state {state})", timeout)
            time.sleep(poll)
            info = self.blob_info(ref)
            state = info.state
            if state in ("absent", "partial") and info.last_failure:
                raise BlobFetchError(ref, str(info.last_failure.get("reason", info.last_failure)))
        h = hashlib.sha256()
        chunks: List[bytes] = []
        tmp: Optional[str] = None
        fh = None
        try:
            if out is not None:
                target = Path(os.fspath(out))
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=str(target.parent))
                fh = os.fdopen(fd, "wb")
            with self._http.stream("GET", "/v1/blob/content", query={"ref": blob_id}, timeout=max(self.timeout, 60.0)) as body:
                while True:
                    piece = body.read(1 << 20)
                    if not piece:
                        break
                    h.update(piece)
                    if fh is not None:
                        fh.write(piece)
                    else:
                        chunks.append(piece)
            if h.hexdigest() != blob_id:
                raise BlobFetchError(ref, f"content read has SHA-256 {h.hexdigest()}, not {blob_id}")
            if fh is not None and tmp is not None:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                fh = None
                os.replace(tmp, target)
                tmp = None
                return target
            return b"".join(chunks)
        finally:
            if fh is not None:
                fh.close()
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def max_wait(wait: float) -> float:
    if wait < 0:
        raise ValueError("wait must be >= 0")
    return float(wait)
