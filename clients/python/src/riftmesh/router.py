"""A drop-in for the seeds' event router (``app.coordination.event_router``).

::

    from riftmesh.router import get_router, publish, subscribe, DataEventType

    router = get_router()
    router.subscribe(DataEventType.TRAINING_COMPLETED, on_training_completed)

    async def on_training_completed(event: dict) -> None:
        config = event.get("config")

    await publish(DataEventType.MODEL_PROMOTED, payload={"config": "hex8_2p"}, source="promoter")

Events go through the local riftmesh agent, so they reach every process on
every host. Each subscription is its own durable consumer of the agent
(``<service>.<TYPE>``), run by its own task: a handler that fails and
retries holds back nobody else's events. Handlers get a :class:`RouterEvent`,
a ``dict`` with the payload's keys at the top level, the envelope's ``type``,
``source`` (the publishing component), ``node`` (the publishing agent's peer
id), ``timestamp`` (seconds), ``event_id`` and ``payload`` over them.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import logging
import os
import re
import time
from typing import Any, Awaitable, Callable, Dict, Generator, List, Literal, Optional, Set, Union, overload

from .aio import AsyncClient, ErrorCallback
from .client import _CONSUMER_NAME, Subscription, TimeLike, _callable_name, _fire_body, _Group, _since_param, _Start
from .event_types import DataEventType
from .models import Event, HandlerFailure, Published
from .spool import FlushResult, Spool, default_spool_dir, service_name
from .patterns import TypeLike, TypePattern, normalize_pattern

__all__ = [
    "Router",
    "RouterEvent",
    "RouterSubscription",
    "DataEventType",
    "HandlerFailure",
    "get_router",
    "set_router",
    "reset_router",
    "publish",
    "fire_and_forget",
    "subscribe",
]

log = logging.getLogger("riftmesh")

RouterHandler = Callable[["RouterEvent"], Union[None, Awaitable[None], Any]]

# Keys of the envelope: at the top level of a RouterEvent, over payload keys of the same name.
ENVELOPE_KEYS = ("type", "source", "node", "timestamp", "event_id", "payload")


class RouterEvent(Dict[str, Any]):
    """An event as the seeds' handlers read it: a ``dict``.

    ``event.get("config")`` reads the payload's ``config``; ``event["type"]``
    is the canonical type name (``== DataEventType.X``); ``event["source"]``
    the component that published it (``publish(..., source=...)``),
    ``event["node"]`` the peer id of the agent it was
    published on, ``event["timestamp"]`` the publish time in seconds since the
    epoch (as ``time.time()``), ``event["event_id"]`` the cluster-wide id and
    ``event["payload"]`` the whole payload. These envelope keys win over
    payload keys of the same name (read those under ``payload``).

    Attributes: ``event`` is the :class:`~riftmesh.Event` (``None`` for an
    event this process published, in :meth:`Router.get_recent_events`), and
    ``attempt`` the handler's attempt (1, then 2 on its first retry, ...).
    """

    event: Optional[Event]
    attempt: int

    @classmethod
    def build(
        cls,
        *,
        type: str,
        payload: Any,
        source: Optional[str],
        node: Optional[str],
        timestamp: float,
        event_id: str,
        event: Optional[Event] = None,
        attempt: int = 1,
    ) -> "RouterEvent":
        d = cls(payload) if isinstance(payload, dict) else cls()
        d["type"] = type
        d["source"] = source
        d["node"] = node
        d["timestamp"] = timestamp
        d["event_id"] = event_id
        d["payload"] = payload
        d.event = event
        d.attempt = attempt
        return d

    @classmethod
    def from_event(cls, ev: Event) -> "RouterEvent":
        return cls.build(
            type=ev.type,
            payload=ev.payload,
            source=ev.source,
            node=ev.node,
            timestamp=ev.ts_ms / 1000.0,
            event_id=ev.id,
            event=ev,
            attempt=ev.attempt,
        )


_service_name = service_name


def _consumer_name(service: str, pattern: str, n: int) -> str:
    """``<service>.<TYPE>`` (``.<n>`` for the n-th handler of that type), fit for the agent."""
    text = pattern.replace("*", "ANY").replace("?", "ONE")
    name = f"{service}.{text}" + (f".{n}" if n > 1 else "")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "handler"
    if len(name) > 64:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name[:55].rstrip("._-") + "-" + digest
    return name


class RouterSubscription:
    """One ``router.subscribe(event_type, handler)``: its own durable consumer and task."""

    def __init__(
        self,
        router: "Router",
        sub: Subscription,
        handler: RouterHandler,
        pattern: str,
        start: Optional[_Start],
        auto_named: bool,
    ) -> None:
        self.router = router
        self.handler = handler
        self.auto_named = auto_named
        self.event_type = pattern
        self.consumer = sub.consumer
        self._sub = sub
        self._group = _Group(consumer=sub.consumer, subs=[sub], start=start)
        self.created_ms = int(time.time() * 1000)
        self._task: Optional["asyncio.Task[None]"] = None
        self._ready: Optional[asyncio.Event] = None
        self._stop: Optional[asyncio.Event] = None
        self.error: Optional[BaseException] = None

    def on_error(self, callback: ErrorCallback) -> ErrorCallback:
        """Call ``callback(failure)`` (sync or async) each time this handler raises;
        ``failure`` is a :class:`~riftmesh.HandlerFailure`. Usable as a decorator."""
        self._sub.on_error = callback
        return callback

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _start(self) -> None:
        if self.running:
            return
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        assert self._stop is not None and self._ready is not None
        ready = self._ready
        try:
            await self.router.client._consume(
                self._group,
                self._stop,
                since_ms=self.created_ms,
                ready=ready.set,
                extra_callbacks=lambda: self.router._on_error,
            )
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - kept for ready() and logged
            self.error = e
            log.error("router subscription %s (%s) stopped: %s: %s", self.consumer, self.event_type, type(e).__name__, e)
        finally:
            ready.set()

    async def _wait_ready(self) -> None:
        if self._ready is None:
            self._start()
        assert self._ready is not None
        await self._ready.wait()

    async def ready(self) -> None:
        """Wait until the consumer exists on the agent (events published from then on are this handler's)."""
        if self._ready is None:
            self._start()
        assert self._ready is not None
        await self._ready.wait()
        if self.error is not None:
            raise self.error

    async def stop(self) -> None:
        """Stop this subscription (a running handler finishes first); the consumer stays."""
        if self._stop is not None:
            self._stop.set()
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<RouterSubscription {self.event_type} -> {_callable_name(self.handler)} consumer={self.consumer}>"


class Router:
    """The seeds' event router over a riftmesh agent.

    ``name`` is the service name the consumers are named after
    (``<name>.<TYPE>``): by default ``RIFTMESH_SERVICE``, else the script's
    name. ``api`` is the agent's address (default ``RIFTMESH_API``, else
    127.0.0.1:7411) and ``token`` its API token (default: the file named by
    ``RIFTMESH_API_TOKEN_FILE``, if set); or pass a ``client``. ``max_attempts``, ``backoff`` and
    ``max_backoff`` are the retry defaults of the handlers. ``recent`` is how
    many events :meth:`get_recent_events` keeps. ``spool_dir`` is where
    :meth:`fire_and_forget` keeps what the agent could not take (default
    ``RIFTMESH_SPOOL``, else ``$XDG_STATE_HOME/riftmesh/spool/<name>``; with
    a ``client`` and no ``spool_dir``, the client's spool), and
    every ``flush_interval`` seconds while the router runs those files are
    sent again.

    Subscriptions start as soon as an event loop runs: at once when
    :meth:`subscribe` is called on one, else at the router's first ``await``
    (``publish``, :meth:`start`).
    """

    def __init__(
        self,
        name: Optional[str] = None,
        *,
        api: Optional[str] = None,
        token: Optional[str] = None,
        client: Optional[AsyncClient] = None,
        max_attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        recent: int = 1000,
        spool_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        flush_interval: float = 5.0,
    ) -> None:
        self.name = name if name is not None else _service_name()
        self.client = client if client is not None else AsyncClient(api, token=token)
        if spool_dir is not None or client is None:
            c = self.client
            c.spool = Spool(
                spool_dir if spool_dir is not None else default_spool_dir(self.name),
                max_files=c.spool.max_files,
                max_bytes=c.spool.max_bytes,
            )
        self.flush_interval = flush_interval
        # fire_and_forget calls that raised inside their task (logged; the spool was full, a 4xx ...).
        self.fire_errors = 0
        self._fires: Set["asyncio.Task[None]"] = set()
        self._flusher: Optional["asyncio.Task[None]"] = None
        self._kick: Optional[asyncio.Event] = None
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._subs: List[RouterSubscription] = []
        self._on_error: List[ErrorCallback] = []
        self._recent_max = max(1, recent)
        self._recent: "collections.OrderedDict[str, RouterEvent]" = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"<riftmesh.router.Router {self.name} at {self.client.address}: {len(self._subs)} subscription(s)>"

    # ------------------------------------------------------------ subscribe

    def subscribe(
        self,
        event_type: TypeLike,
        handler: Optional[RouterHandler] = None,
        *,
        consumer: Optional[str] = None,
        on_error: Optional[ErrorCallback] = None,
        max_attempts: Optional[int] = None,
        backoff: Optional[float] = None,
        max_backoff: Optional[float] = None,
        from_start: bool = False,
        since: Optional[TimeLike] = None,
    ) -> Any:
        """Call ``handler(event)`` (sync or async) for each event of ``event_type``
        (a name, an alias, a :class:`DataEventType` or a pattern such as
        ``TRAINING_*``). Returns a :class:`RouterSubscription`; without
        ``handler`` it is a decorator.

        The consumer is ``consumer`` if given, else ``<router name>.<TYPE>``
        (``.2``, ``.3`` ... for further handlers of the same type, in the
        order they subscribe). A new consumer gets the events published from
        the moment of this call on (``from_start=True`` or ``since=``: from
        the oldest retained, or from that time). A sync handler is called on
        the event loop: keep it short or make it ``async``.

        A handler that raises is run again after ``backoff`` seconds (doubling
        up to ``max_backoff``) up to ``max_attempts`` runs in all, then the
        event is dead-lettered for this consumer; ``on_error`` (and the
        router's :meth:`on_error` callbacks) hear of every failure.
        """
        if handler is None:

            def deco(fn: RouterHandler) -> RouterHandler:
                self.subscribe(
                    event_type, fn, consumer=consumer, on_error=on_error, max_attempts=max_attempts,
                    backoff=backoff, max_backoff=max_backoff, from_start=from_start, since=since,
                )
                return fn

            return deco
        if not callable(handler):
            raise TypeError(f"subscribe(event_type, handler): {handler!r} is not callable")
        if from_start and since is not None:
            raise ValueError("give at most one of from_start=, since=")
        pattern = normalize_pattern(event_type)
        if consumer is None:
            n = 1 + sum(1 for s in self._subs if s.event_type == pattern and s.auto_named)
            name = _consumer_name(self.name, pattern, n)
        else:
            name = consumer
        if not _CONSUMER_NAME.match(name):
            raise ValueError(f"consumer name {name!r}: use 1-64 of A-Z a-z 0-9 - _ .")
        if any(s.consumer == name for s in self._subs):
            raise ValueError(f"consumer {name!r} already has a handler on this router")
        start = None
        if from_start or since is not None:
            start = _Start(from_start=from_start, since=_since_param(since) if since is not None else None)
        user = handler
        is_async = inspect.iscoroutinefunction(user) or inspect.iscoroutinefunction(getattr(user, "__call__", None))
        recent = self._remember

        if is_async:

            async def call(ev: Event) -> None:
                d = RouterEvent.from_event(ev)
                recent(d)
                r = user(d)
                if inspect.isawaitable(r):
                    await r

            fn: Callable[[Event], Any] = call
        else:

            def call_sync(ev: Event) -> Any:
                d = RouterEvent.from_event(ev)
                recent(d)
                return user(d)

            fn = call_sync
        sub = Subscription(
            handler=fn,
            patterns=[TypePattern(pattern)],
            consumer=name,
            priority=0,
            max_attempts=max(1, max_attempts if max_attempts is not None else self.max_attempts),
            backoff=backoff if backoff is not None else self.backoff,
            max_backoff=max_backoff if max_backoff is not None else self.max_backoff,
            index=0,
            name=_callable_name(user),
            is_async=is_async,
            on_error=on_error,
            in_thread=False,
        )
        rs = RouterSubscription(self, sub, user, pattern, start, consumer is None)
        self._subs.append(rs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return rs  # started by the router's first await
        rs._start()
        return rs

    def on_error(self, callback: ErrorCallback) -> ErrorCallback:
        """Call ``callback(failure)`` (sync or async) each time any handler of this
        router raises, after the subscription's own ``on_error``. Usable as a decorator."""
        self._on_error.append(callback)
        return callback

    @property
    def subscriptions(self) -> List[RouterSubscription]:
        return list(self._subs)

    def get_subscription_counts(self) -> Dict[str, int]:
        """Handlers per event type (pattern) on this router."""
        out: Dict[str, int] = {}
        for s in self._subs:
            out[s.event_type] = out.get(s.event_type, 0) + 1
        return out

    def get_recent_events(self, limit: int = 100) -> List[RouterEvent]:
        """The last ``limit`` events this router published or handed to a handler,
        each once, oldest first (kept in memory: no request). For the cluster's
        retained log, use ``await router.client.history(...)``."""
        if limit <= 0:
            return []
        items = list(self._recent.values())
        return items[-limit:]

    def _remember(self, ev: RouterEvent) -> None:
        key = ev["event_id"] or f"local-{id(ev)}"
        if key in self._recent:
            return
        self._recent[key] = ev
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    # ------------------------------------------------------------ run

    async def start(self) -> None:
        """Start every subscription not running yet and wait until their consumers exist;
        send what waits in the spool and keep flushing it in the background."""
        for s in self._subs:
            if not s.running and s.error is None:
                s._start()
        await self.flush_spool()
        self._ensure_flusher()
        for s in self._subs:
            await s.ready()

    async def stop(self) -> None:
        """Stop every subscription (running handlers finish first), wait for the
        :meth:`fire_and_forget` publishes under way (each sent or spooled), stop
        the background flush and close idle connections."""
        await asyncio.gather(*(s.stop() for s in self._subs), return_exceptions=True)
        if self._fires:
            await asyncio.gather(*list(self._fires), return_exceptions=True)
        f, self._flusher = self._flusher, None
        if f is not None:
            f.cancel()
            await asyncio.gather(f, return_exceptions=True)
        await self.client.aclose()

    # ------------------------------------------------------------ spool

    async def flush_spool(self) -> FlushResult:
        """Send what waits in the spool now (:meth:`AsyncClient.flush_spool`); errors are logged."""
        try:
            r = await self.client.flush_spool()
        except Exception as e:  # noqa: BLE001 - the background flush must go on
            log.error("flushing the spool %s failed: %s: %s", self.client.spool.directory, type(e).__name__, e)
            return FlushResult(error=e)
        if r.sent or r.duplicates or r.rejected:
            log.info(
                "spool %s: %d sent, %d already there, %d rejected, %d left",
                self.client.spool.directory, r.sent, r.duplicates, r.rejected, r.pending,
            )
        return r

    def _ensure_flusher(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            return
        self._kick = asyncio.Event()
        self._flusher = asyncio.ensure_future(self._flush_loop(self._kick))

    async def _flush_loop(self, kick: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(kick.wait(), self.flush_interval)
            except asyncio.TimeoutError:
                pass
            kick.clear()
            await self.flush_spool()

    async def wait(self) -> None:
        """Run until :meth:`stop` or cancellation (for a daemon's main coroutine)."""
        await self.start()
        await asyncio.gather(*(s._task for s in self._subs if s._task is not None))

    # ------------------------------------------------------------ publish

    @overload
    def publish(
        self,
        event_type: TypeLike,
        payload: Any = None,
        source: Optional[str] = None,
        *,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
        fire_and_forget: Literal[False] = False,
    ) -> Awaitable[Published]: ...

    @overload
    def publish(
        self,
        event_type: TypeLike,
        payload: Any = None,
        source: Optional[str] = None,
        *,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        by_content: Literal[False] = False,
        retry_for: Optional[float] = None,
        fire_and_forget: Literal[True],
    ) -> Awaitable[None]: ...

    @overload
    def publish(
        self,
        event_type: TypeLike,
        payload: Any = None,
        source: Optional[str] = None,
        *,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
        fire_and_forget: bool,
    ) -> Awaitable[Optional[Published]]: ...

    def publish(
        self,
        event_type: TypeLike,
        payload: Any = None,
        source: Optional[str] = None,
        *,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
        fire_and_forget: bool = False,
    ) -> Awaitable[Optional[Published]]:
        """``await router.publish(...)``: see :meth:`_publish`.

        ``fire_and_forget=True`` is :meth:`fire_and_forget`: it acts when
        called (awaiting the result is optional and waits until the event is
        sent or spooled), takes its place in line at once and never raises."""
        if fire_and_forget:
            if by_content:
                raise ValueError("fire_and_forget=True needs an idempotency key: by_content=True cannot be spooled")
            task = self._fire_and_forget(
                event_type, payload, source, correlation_id=correlation_id, parent_id=parent_id,
                idempotency_key=idempotency_key, retry_for=retry_for,
            )
            return task if task is not None else _Done()
        return self._publish(
            event_type, payload, source, correlation_id=correlation_id, parent_id=parent_id,
            idempotency_key=idempotency_key, by_content=by_content, retry_for=retry_for,
        )

    async def _publish(
        self,
        event_type: TypeLike,
        payload: Any = None,
        source: Optional[str] = None,
        *,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        by_content: bool = False,
        retry_for: Optional[float] = None,
    ) -> Published:
        """Publish an event through the agent (to every subscriber on every host);
        returns once it is on the agent's disk. ``source`` names the publishing
        component (the router's name if not given). Subscriptions of this
        router are started first and their consumers exist before the event
        is written, so they get it. Every call is a new fact with its own
        idempotency key, retried as :meth:`AsyncClient.publish` retries
        (``idempotency_key=``, ``by_content=``, ``retry_for=`` as there)."""
        await self._subscriptions_ready(self.client.timeout)
        self._ensure_flusher()
        src = source if source is not None else self.name
        r = await self.client.publish(
            event_type,
            payload,
            source=src,
            correlation_id=correlation_id,
            parent_id=parent_id,
            idempotency_key=idempotency_key,
            by_content=by_content,
            retry_for=retry_for,
        )
        self._remember(
            RouterEvent.build(
                type=r.type, payload=payload if payload is not None else {}, source=src, node=None,
                timestamp=time.time(), event_id=r.id,
            )
        )
        return r


    async def _subscriptions_ready(self, timeout: float, quiet: bool = False) -> None:
        for s in self._subs:
            if not s.running and s.error is None:
                s._start()
        for s in self._subs:
            try:
                await asyncio.wait_for(s._wait_ready(), timeout)
            except asyncio.TimeoutError:
                if not quiet:
                    log.warning("consumer %s is not created yet (is the agent up?); publishing anyway", s.consumer)

    def fire_and_forget(
        self,
        event_type: TypeLike,
        payload: Any = None,
        source: Optional[str] = None,
        *,
        correlation_id: Optional[str] = None,
        parent_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> "Optional[asyncio.Task[None]]":
        """Publish without waiting and without ever raising: the publish runs as a
        task on the running loop (returned, for whoever wants to await it). If
        the agent does not take it at once (unreachable, no answer, 5xx), it
        goes to the local spool with its idempotency key, and the router's
        background flush sends it when the agent is back (one event however
        often it is sent). Errors (a full spool, a 4xx answer) are logged on
        the ``riftmesh`` logger and counted in :attr:`fire_errors`.

        Without a running loop the publish is made here, in this thread
        (``Client.publish_or_spool`` with no retries), and ``None`` is returned.

        Concurrent calls reach the agent, or the spool, in call order: each
        takes its place in the spool's line when called, before any request
        (see :meth:`AsyncClient.publish_or_spool`)."""
        return self._fire_and_forget(
            event_type, payload, source, correlation_id=correlation_id, parent_id=parent_id,
            idempotency_key=idempotency_key,
        )

    def _fire_and_forget(
        self,
        event_type: TypeLike,
        payload: Any,
        source: Optional[str],
        *,
        correlation_id: Optional[str],
        parent_id: Optional[str],
        idempotency_key: Optional[str],
        retry_for: Optional[float] = None,
    ) -> "Optional[asyncio.Task[None]]":
        src = source if source is not None else self.name
        kw: Dict[str, Any] = dict(
            source=src, correlation_id=correlation_id, parent_id=parent_id, idempotency_key=idempotency_key
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._fire_blocking(event_type, payload, kw, retry_for)
            return None
        self._ensure_flusher()
        try:
            body, key = _fire_body(event_type, payload, dict(kw, caused_by=None))
            place = self.client.spool.line.take()  # call order, before any request
        except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
            self.fire_errors += 1
            log.error("fire_and_forget %s failed: %s: %s", type_name_of(event_type), type(e).__name__, e)
            return None
        task = asyncio.ensure_future(self._fire(place, body, key, payload, kw, retry_for))
        self._fires.add(task)
        task.add_done_callback(self._fires.discard)
        return task

    async def _fire(
        self, place: int, body: Dict[str, Any], key: str, payload: Any, kw: Dict[str, Any], retry_for: Optional[float]
    ) -> None:
        event_type = body["type"]
        try:
            # Its own subscriptions first (a process gets what it publishes), but
            # not for long: an agent that is down means the spool.
            await self._subscriptions_ready(min(2.0, self.client.timeout), quiet=True)
            r = await self.client._publish_in_line(place, body, key, 0.0 if retry_for is None else retry_for)
        except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
            self.fire_errors += 1
            log.error("fire_and_forget %s failed: %s: %s", type_name_of(event_type), type(e).__name__, e)
            return
        finally:
            self.client.spool.line.leave(place)  # (if it did not get as far as its turn)
        if isinstance(r, Published):
            self._remember(
                RouterEvent.build(
                    type=r.type, payload=payload if payload is not None else {}, source=kw["source"], node=None,
                    timestamp=time.time(), event_id=r.id,
                )
            )

    def _fire_blocking(
        self, event_type: TypeLike, payload: Any, kw: Dict[str, Any], retry_for: Optional[float] = None
    ) -> None:
        from .client import Client

        c = Client(
            self.client.address,
            token=self.client._http.token,
            timeout=self.client.timeout,
            retry_for=retry_for or 0,
            spool_dir=self.client.spool.directory,
            spool_max_files=self.client.spool.max_files,
            spool_max_bytes=self.client.spool.max_bytes,
        )
        try:
            c.publish_or_spool(event_type, payload, **kw)
        except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
            self.fire_errors += 1
            log.error("fire_and_forget %s failed: %s: %s", type_name_of(event_type), type(e).__name__, e)


class _Done:
    """What ``publish(..., fire_and_forget=True)`` returns when it was made at
    once, without an event loop: awaiting it returns ``None`` at once."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that yields nothing


def type_name_of(t: TypeLike) -> str:
    try:
        return normalize_pattern(t)
    except Exception:  # noqa: BLE001 - only for a log line
        return repr(t)


_router: Optional[Router] = None


def get_router() -> Router:
    """The process's router (created on first use: ``Router()``)."""
    global _router
    if _router is None:
        _router = Router()
    return _router


def set_router(router: Optional[Router]) -> None:
    """Make ``router`` the one :func:`get_router` returns (``None``: a new one next time)."""
    global _router
    _router = router


def reset_router() -> None:
    """Forget the process's router (tests): the next :func:`get_router` makes a new one
    from the environment. Its subscriptions are not stopped: ``await router.stop()`` first."""
    set_router(None)


@overload
def publish(
    event_type: TypeLike,
    payload: Any = None,
    source: Optional[str] = None,
    *,
    correlation_id: Optional[str] = None,
    parent_id: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    by_content: bool = False,
    retry_for: Optional[float] = None,
    fire_and_forget: Literal[False] = False,
) -> Awaitable[Published]: ...


@overload
def publish(
    event_type: TypeLike,
    payload: Any = None,
    source: Optional[str] = None,
    *,
    correlation_id: Optional[str] = None,
    parent_id: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    by_content: Literal[False] = False,
    retry_for: Optional[float] = None,
    fire_and_forget: Literal[True],
) -> Awaitable[None]: ...


@overload
def publish(
    event_type: TypeLike,
    payload: Any = None,
    source: Optional[str] = None,
    *,
    correlation_id: Optional[str] = None,
    parent_id: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    by_content: bool = False,
    retry_for: Optional[float] = None,
    fire_and_forget: bool,
) -> Awaitable[Optional[Published]]: ...


def publish(
    event_type: TypeLike,
    payload: Any = None,
    source: Optional[str] = None,
    *,
    correlation_id: Optional[str] = None,
    parent_id: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    by_content: bool = False,
    retry_for: Optional[float] = None,
    fire_and_forget: bool = False,
) -> Awaitable[Optional[Published]]:
    """``await publish(DataEventType.X, payload={...}, source="component")`` on
    :func:`get_router` (:meth:`Router.publish`; ``fire_and_forget=True`` acts
    when called, awaited or not, and never raises)."""
    return get_router().publish(
        event_type,
        payload,
        source,
        correlation_id=correlation_id,
        parent_id=parent_id,
        idempotency_key=idempotency_key,
        by_content=by_content,
        retry_for=retry_for,
        fire_and_forget=fire_and_forget,
    )


def fire_and_forget(
    event_type: TypeLike, payload: Any = None, source: Optional[str] = None, **kw: Any
) -> "Optional[asyncio.Task[None]]":
    """``fire_and_forget(DataEventType.X, payload={...}, source="component")`` on
    :func:`get_router`: never raises; spools what the agent cannot take now."""
    return get_router().fire_and_forget(event_type, payload, source, **kw)


def subscribe(event_type: TypeLike, handler: Optional[RouterHandler] = None, **kw: Any) -> Any:
    """``subscribe(DataEventType.X, handler)`` on :func:`get_router` (or ``@subscribe(X)``)."""
    return get_router().subscribe(event_type, handler, **kw)

