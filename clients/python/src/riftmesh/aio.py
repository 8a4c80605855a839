"""The asyncio client of the local riftmesh agent: :class:`AsyncClient`.

Every call is a coroutine on the running event loop; nothing blocks it. The
HTTP layer is the standard library's asyncio streams with a small keep-alive
pool (``_aio_transport``), so the package stays dependency-free. Models and
errors are those of the synchronous :class:`~riftmesh.Client`.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
    overload,
)

from ._aio_transport import AsyncTransport
from .lock import _DRIFT
from ._transport import Transport, format_address, quote, resolve_address, resolve_token
from .client import (
    _BACKLOG_PEEK,
    blob_upload,
    naming_link,
    _CONSUMER_NAME,
    MAX_REASON,
    MAX_WAIT,
    H,
    Subscription,
    TimeLike,
    _backlog_warning,
    _callable_name,
    _default_consumer,
    _batch_bodies,
    _Group,
    _Outcome,
    _latest_query,
    _patterns,
    _publish_body,
    _Retry,
    _flush_outcome,
    _fire_body,
    _fire_failed,
    FireResult,
    _spool_for,
    SPOOL_ON,
    _same_types,
    _since_param,
    _Start,
    _truncate_utf8,
    _where,
    max_wait,
)
from .errors import (
    AgentUnavailable,
    BlobFetchError,
    ClientError,
    Conflict,
    LockHeld,
    LockLost,
    NotFound,
    RiftmeshError,
    RiftmeshTimeout,
    ServerError,
    Unavailable,
)
from .models import (
    Batch,
    BlobAdded,
    BlobInfo,
    ConsumerInfo,
    DeadLetter,
    Event,
    HandlerFailure,
    HistoryPage,
    LeaderInfo,
    LockInfo,
    Member,
    Published,
    Spooled,
    Trace,
)
from .patterns import TypeLike, TypePattern, type_name
from .spool import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, FlushResult

__all__ = ["AsyncClient", "AsyncLock", "ErrorCallback"]

log = logging.getLogger("riftmesh")

ErrorCallback = Callable[[HandlerFailure], Union[None, Awaitable[None], Any]]
"""``on_error`` callback: ``def cb(failure)`` or ``async def cb(failure)``."""


async def _maybe_await(r: Any) -> Any:
    if inspect.isawaitable(r):
        return await r
    return r


async def _call_callbacks(cbs: Sequence[Optional[ErrorCallback]], failure: HandlerFailure) -> None:
    for cb in cbs:
        if cb is None:
            continue
        try:
            await _maybe_await(cb(failure))
        except Exception:  # noqa: BLE001 - a callback must not stop the consumer
            log.exception("on_error callback %s failed", _callable_name(cb))


async def _until(stop: asyncio.Event, aw: Awaitable[Any]) -> Tuple[bool, Any]:
    """Await ``aw`` unless ``stop`` is set first (then ``aw`` is cancelled): ``(stopped, result)``."""
    if stop.is_set():
        if inspect.iscoroutine(aw):
            aw.close()
        return True, None
    task = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        waiter.cancel()
        raise
    if task.done():
        waiter.cancel()
        return False, task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled on purpose
        pass
    return True, None


class AsyncClient:
    """An asyncio client of the local riftmesh agent.

    The same arguments as :class:`~riftmesh.Client` (``token`` included), plus ``max_connections``:
    the most requests in flight at once (long polls of the consumers aside);
    more wait for a free connection. Use one client per event loop; it may be
    used again from a later loop (its idle connections are then dropped).
    ``await client.aclose()`` (or ``async with AsyncClient() as client``)
    closes the idle connections.
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
        max_connections: int = 64,
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
        self._http = AsyncTransport(host, port, timeout, max_connections, token)
        self._subs: List[Subscription] = []
        self._starts: Dict[str, _Start] = {}
        self._on_error: List[ErrorCallback] = []
        self._stop: Optional[asyncio.Event] = None
        self._running = False

    def __repr__(self) -> str:
        return f"<riftmesh.AsyncClient {self.address}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()
        await self.aclose()

    # ================================================================ agent

    async def health(self) -> bool:
        return bool((await self._http.request("GET", "/v1/health")).get("ok"))

    async def status(self) -> Dict[str, Any]:
        return await self._http.request("GET", "/v1/status")  # type: ignore[no-any-return]

    async def peers(self) -> List[Dict[str, Any]]:
        return list((await self._http.request("GET", "/v1/peers"))["peers"])

    async def members(self) -> List[Member]:
        v = await self._http.request("GET", "/v1/members")
        return [Member.from_json(m) for m in v["members"]]

    async def leader(self) -> LeaderInfo:
        return LeaderInfo.from_json(await self._http.request("GET", "/v1/leader"))

    async def types(self) -> List[Dict[str, Any]]:
        return list((await self._http.request("GET", "/v1/types"))["types"])

    async def report_jobs(
        self, jobs: Mapping[str, Optional[float]], *, ttl: Optional[float] = None
    ) -> Dict[str, float]:
        body: Dict[str, Any] = {"jobs": dict(jobs)}
        if ttl is not None:
            body["ttl_secs"] = max(1, math.ceil(ttl))
        return dict((await self._http.request("POST", "/v1/jobs", body=body))["jobs"])

    # ================================================================ publish

    @overload
    async def publish(
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
    async def publish(
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
    async def publish(
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

    async def publish(
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
        """Publish one event (as :meth:`Client.publish`: a new idempotency key per
        call, retried with it for ``retry_for`` seconds while the agent is
        unreachable or answers 503); returns once it is on the agent's disk.

        ``fire_and_forget=True`` as with :meth:`Client.publish`: tried once
        (``retry_for`` defaults to 0), spooled if the agent does not take it,
        never raises (errors are logged and counted in :attr:`fire_errors`);
        the call's place in line is taken when the coroutine starts, so
        ``asyncio.gather`` of such publishes keeps their order."""
        if fire_and_forget:
            kw: Dict[str, Any] = dict(
                source=source, correlation_id=correlation_id, parent_id=parent_id, caused_by=caused_by,
                idempotency_key=idempotency_key, by_content=by_content,
            )
            try:
                fbody, fkey = _fire_body(type, payload, kw)
                place = self.spool.line.take()
            except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
                if by_content:
                    raise
                self.fire_errors += 1
                _fire_failed(type, e)
                return None
            try:
                return await self._publish_in_line(place, fbody, fkey, 0.0 if retry_for is None else retry_for)
            except Exception as e:  # noqa: BLE001 - fire and forget: log, count, never raise
                self.fire_errors += 1
                _fire_failed(fbody["type"], e)
                return None
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
        v = await self._post_retrying("/v1/events", body, key is not None, retry_for)
        return Published.from_json(v, key)

    async def publish_batch(
        self,
        events: Iterable[Union[Mapping[str, Any], Tuple[TypeLike, Any]]],
        *,
        by_content: bool = False,
        retry_for: Optional[float] = None,
    ) -> List[Published]:
        """Publish many events in one request (as :meth:`Client.publish_batch`)."""
        items, keys = _batch_bodies(events, by_content)
        v = await self._post_retrying("/v1/events/batch", {"events": items}, not by_content, retry_for)
        return [Published.from_json(r, k) for r, k in zip(v["results"], keys)]

    async def _post_retrying(self, path: str, body: Dict[str, Any], keyed: bool, retry_for: Optional[float]) -> Any:
        retry = _Retry(self.retry_for if retry_for is None else retry_for, keyed)
        while True:
            try:
                return await self._http.request("POST", path, body=body)
            except RiftmeshError as e:
                wait = retry.wait_after(e)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    # ================================================================ spool

    async def publish_or_spool(
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
        """As :meth:`Client.publish_or_spool`: a :class:`Published`, or a
        :class:`Spooled` when the agent did not take it within ``retry_for``
        (the spool's file I/O runs in a worker thread)."""
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
        return await self._publish_in_line(self.spool.line.take(), body, key, retry_for)

    async def _publish_in_line(
        self, place: int, body: Dict[str, Any], key: str, retry_for: Optional[float]
    ) -> Union[Published, Spooled]:
        """Send or spool ``body`` when ``place``'s turn in the spool's line comes
        (as :meth:`Client.publish_or_spool`: call order holds)."""
        sp = self.spool
        try:
            await sp.line.wait_async(place)
            if await asyncio.to_thread(sp.has_pending) and (await self.flush_spool()).error is not None:
                return Spooled(key=key, path=str(await asyncio.to_thread(sp.put, body)), type=body["type"])
            try:
                v = await self._post_retrying("/v1/events", body, True, retry_for)
            except SPOOL_ON as e:
                path = await asyncio.to_thread(sp.put, body)
                log.warning("the agent did not take a %s publish (%s); spooled as %s", body["type"], e, path)
                return Spooled(key=key, path=str(path), type=body["type"])
            return Published.from_json(v, key)
        finally:
            sp.line.leave(place)

    async def flush_spool(self) -> FlushResult:
        """As :meth:`Client.flush_spool` (file I/O in a worker thread)."""
        res = FlushResult()
        sp = self.spool
        await asyncio.to_thread(sp.clean_tmp)
        for path in await asyncio.to_thread(sp.pending):
            try:
                body = await asyncio.to_thread(sp.load, path)
            except FileNotFoundError:
                continue  # another flusher sent it meanwhile
            except (OSError, ValueError) as e:
                await asyncio.to_thread(sp.reject, path, f"unreadable spool file: {e}")
                res.rejected += 1
                continue
            try:
                v = await self._http.request("POST", "/v1/events", body=body)
            except ClientError as e:
                await asyncio.to_thread(sp.reject, path, str(e))
                res.rejected += 1
                continue
            except RiftmeshError as e:
                res.error = e
                break
            await asyncio.to_thread(sp.done, path)
            _flush_outcome(res, v)
        res.pending = len(await asyncio.to_thread(sp.pending))
        return res

    # ================================================================ history

    async def event(self, id: str) -> Event:
        return Event.from_json(await self._http.request("GET", f"/v1/events/{quote(id)}"))

    async def trace(self, id: str) -> Trace:
        v = await self._http.request("GET", f"/v1/trace/{quote(id)}")
        return Trace(
            correlation_id=str(v["correlation_id"]),
            events=[(int(x["depth"]), Event.from_json(x["event"])) for x in v["events"]],
        )

    async def history_page(
        self,
        types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None,
        *,
        since: Optional[TimeLike] = None,
        after: Optional[int] = None,
        limit: int = 100,
    ) -> HistoryPage:
        q: Dict[str, Any] = {"limit": limit}
        if types is not None:
            pats = _patterns([types])
            if pats:
                q["types"] = ",".join(pats)
        if after is not None:
            q["after"] = after
        elif since is not None:
            q["since"] = _since_param(since)
        v = await self._http.request("GET", "/v1/events", query=q)
        return HistoryPage(
            events=[Event.from_json(e) for e in v["events"]], next_after=int(v["next_after"]), head=int(v["head"])
        )

    async def latest(self, types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None, n: int = 10) -> List[Event]:
        """The newest ``n`` retained events matching ``types``, oldest first (as :meth:`Client.latest`)."""
        out: List[Event] = []
        before: Optional[int] = None
        while len(out) < n:
            v = await self._http.request("GET", "/v1/events", query=_latest_query(types, n - len(out), before))
            out.extend(Event.from_json(e) for e in v["events"])
            if v.get("done", True):
                break
            before = int(v["next_before"])
        return out[:n][::-1]

    async def history(
        self,
        types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None,
        *,
        since: Optional[TimeLike] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
        page_size: int = 100,
    ) -> AsyncIterator[Event]:
        """``async for ev in client.history(...)``: as :meth:`Client.history`."""
        count = 0
        page = await self.history_page(types, since=since, after=after, limit=page_size)
        while True:
            for ev in page.events:
                if limit is not None and count >= limit:
                    return
                yield ev
                count += 1
            if page.next_after >= page.head:
                return
            page = await self.history_page(types, after=page.next_after, limit=page_size)

    # ================================================================ consumers

    async def subscription_counts(self, *, cluster: bool = True, by_host: bool = False) -> Dict[str, Any]:
        """As ``Client.subscription_counts``."""
        from .client import subscription_counts_of

        return subscription_counts_of(await self._http.request("GET", "/v1/subscriptions"), cluster, by_host)

    async def consumers(self) -> List[ConsumerInfo]:
        return [ConsumerInfo.from_json(c) for c in await self._http.request("GET", "/v1/consumers")]

    async def consumer(self, name: str) -> Optional[ConsumerInfo]:
        for c in await self.consumers():
            if c.name == name:
                return c
        return None

    async def create_consumer(
        self,
        name: str,
        types: Optional[Union[TypeLike, Iterable[TypeLike]]] = None,
        *,
        from_start: bool = False,
        since: Optional[TimeLike] = None,
        after_seq: Optional[int] = None,
        from_now: bool = False,
    ) -> ConsumerInfo:
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
        return ConsumerInfo.from_json(await self._http.request("PUT", f"/v1/consumers/{quote(name)}", body=body))

    async def replay(
        self,
        consumer: str,
        *,
        since: Optional[TimeLike] = None,
        after_seq: Optional[int] = None,
        from_start: bool = False,
    ) -> ConsumerInfo:
        if sum(x is not None and x is not False for x in (since, after_seq, from_start or None)) != 1:
            raise ValueError("replay() takes exactly one of since=, after_seq=, from_start=True")
        return await self.create_consumer(consumer, since=since, after_seq=after_seq, from_start=from_start)

    async def delete_consumer(self, name: str) -> ConsumerInfo:
        return ConsumerInfo.from_json(await self._http.request("DELETE", f"/v1/consumers/{quote(name)}"))

    async def fetch(
        self, consumer: str, *, max: int = 100, wait: float = 0.0, timeout: Optional[float] = None
    ) -> Batch:
        """Events after the consumer's cursor (fetching does not move it); ``wait``
        long-polls up to that many seconds (at most 60). Cancelling the call
        closes its connection."""
        wait = min(max_wait(wait), MAX_WAIT)
        t = timeout if timeout is not None else self.timeout + wait
        v = await self._http.request(
            "GET",
            f"/v1/consumers/{quote(consumer)}/events",
            query={"max": max, "wait_ms": int(wait * 1000)},
            timeout=t,
            pooled=wait <= 0,
        )
        return Batch(
            consumer=str(v["consumer"]),
            events=[Event.from_json(e) for e in v["events"]],
            missed=int(v.get("missed", 0)),
            cursor=int(v["cursor"]),
            head=int(v["head"]),
        )

    async def ack(self, consumer: str, seq: int) -> ConsumerInfo:
        v = await self._http.request("POST", f"/v1/consumers/{quote(consumer)}/ack", body={"seq": seq})
        return ConsumerInfo.from_json(v)

    async def nack(self, consumer: str, seq: int, reason: str) -> ConsumerInfo:
        v = await self._http.request(
            "POST",
            f"/v1/consumers/{quote(consumer)}/nack",
            body={"seq": seq, "reason": _truncate_utf8(reason or "failed", MAX_REASON)},
        )
        return ConsumerInfo.from_json(v)

    async def dead_letters(self, consumer: str) -> List[DeadLetter]:
        v = await self._http.request("GET", f"/v1/consumers/{quote(consumer)}/dead-letters")
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
        on_error: Optional[ErrorCallback] = None,
        in_thread: bool = True,
    ) -> Callable[[H], H]:
        """Register a handler, as :meth:`Client.subscribe`, for :meth:`run`.

        ``on_error(failure)`` is called (sync or async) with a
        :class:`~riftmesh.HandlerFailure` each time this handler raises,
        before the client-wide callbacks of :meth:`on_error`. Plain (non-async) handlers run in a worker thread unless ``in_thread=False``."""
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
            self._subs.append(
                Subscription(
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
                    on_error=on_error,
                    in_thread=in_thread,
                )
            )
            return fn

        return register

    def on_error(self, callback: ErrorCallback) -> ErrorCallback:
        """Add a client-wide callback, called with a :class:`~riftmesh.HandlerFailure`
        each time any handler raises (after the subscription's own). Usable as
        a decorator."""
        self._on_error.append(callback)
        return callback

    @property
    def subscriptions(self) -> List[Subscription]:
        return list(self._subs)

    async def run(self) -> None:
        """Run the subscriptions on this loop (one task per consumer) until
        :meth:`stop` or cancellation. An event whose handlers are running is
        finished first; a long poll is cut short."""
        if self._running:
            raise RuntimeError("this client is already running its subscriptions")
        groups: Dict[str, _Group] = {}
        for s in self._subs:
            g = groups.get(s.consumer)
            if g is None:
                g = groups[s.consumer] = _Group(consumer=s.consumer, start=self._starts.get(s.consumer))
            g.subs.append(s)
        if not groups:
            raise RuntimeError("nothing to run: register handlers with @client.subscribe(...) first")
        self._running = True
        stop = self._stop = asyncio.Event()
        tasks = [asyncio.ensure_future(self._consume(g, stop)) for g in groups.values()]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._running = False
            self._stop = None

    def stop(self) -> None:
        """Ask :meth:`run` to end (safe from a handler or a signal handler on the loop)."""
        if self._stop is not None:
            self._stop.set()

    # ---------------------------------------------------------------- runner

    async def _ensure_consumer(self, g: _Group, since_ms: Optional[int] = None) -> bool:
        """Create or update the group's consumer; True if it was new.

        ``since_ms`` is where a new consumer without a start option begins
        (events received from then on); without it, at the head."""
        infos = await self.consumers()
        exists = any(c.name == g.consumer for c in infos)
        body: Dict[str, Any] = {"types": g.types()}
        if not exists:
            if g.start is not None:
                body.update(g.start.body())
            else:
                await self._warn_backlog(g.consumer, body["types"], infos)
                if since_ms is not None:
                    body["since"] = str(since_ms)
        await self._http.request("PUT", f"/v1/consumers/{quote(g.consumer)}", body=body)
        log.info("consumer %s: types %s%s", g.consumer, body["types"] or "all", "" if exists else " (new)")
        return not exists

    async def _warn_backlog(self, name: str, types: List[str], infos: Sequence[ConsumerInfo]) -> None:
        found: List[Tuple[ConsumerInfo, int]] = []
        for c in _same_types(infos, name, types):
            try:
                n = len((await self.fetch(c.name, max=_BACKLOG_PEEK)).events)
            except RiftmeshError:
                continue
            if n:
                found.append((c, n))
        if found:
            log.warning("%s", _backlog_warning(name, found))

    @staticmethod
    def _retry_wait(failures: int) -> float:
        return float(min(10.0, 0.2 * 2.0 ** min(failures, 6)))

    async def _consume(
        self,
        g: _Group,
        stop: asyncio.Event,
        *,
        since_ms: Optional[int] = None,
        ready: Optional[Callable[[], None]] = None,
        extra_callbacks: Optional[Callable[[], Sequence[ErrorCallback]]] = None,
    ) -> None:
        """One consumer's loop: fetch, run the handlers, ack or dead-letter, until ``stop``."""
        failures = 0
        ensured = False
        while not stop.is_set():
            try:
                if not ensured:
                    await self._ensure_consumer(g, since_ms)
                    ensured = True
                    if ready is not None:
                        ready()
                stopped, batch = await _until(
                    stop, self.fetch(g.consumer, max=self.batch_size, wait=self.poll_wait)
                )
                if stopped:
                    return
                failures = 0
            except NotFound:
                log.warning("consumer %s disappeared; creating it again", g.consumer)
                ensured = False
                continue
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                wait = self._retry_wait(failures)
                log.warning("consumer %s: %s; retrying in %.1f s", g.consumer, e, wait)
                if (await _until(stop, asyncio.sleep(wait)))[0]:
                    return
                continue
            if batch.missed:
                log.warning(
                    "consumer %s: %d event(s) were removed by retention before they were acknowledged",
                    g.consumer,
                    batch.missed,
                )
            await self._process(g, batch, stop, extra_callbacks)

    async def _call(self, s: Subscription, ev: Event) -> None:
        if s.is_async:
            await s.handler(ev)
            return
        if s.in_thread:
            r = await asyncio.to_thread(s.handler, ev)
        else:
            r = s.handler(ev)
        if inspect.isawaitable(r):
            await r

    async def _process(
        self,
        g: _Group,
        batch: Batch,
        stop: asyncio.Event,
        extra_callbacks: Optional[Callable[[], Sequence[ErrorCallback]]],
    ) -> None:
        done = batch.cursor
        acked = batch.cursor
        for ev in batch.events:
            if stop.is_set():
                break
            out = _Outcome()
            pending = list(g.handlers_for(ev))
            if not pending:
                out.unhandled = True
                log.warning("consumer %s: no handler matches %s seq %d; dead-lettering it", g.consumer, ev.type, ev.seq)
            while pending:
                now = time.monotonic()
                for s in [s for s in pending if out.next_at.get(s.index, 0.0) <= now]:
                    ev.attempt = out.failures.get(s.index, 0) + 1
                    try:
                        await self._call(s, ev)
                        pending.remove(s)
                    except Exception as e:  # noqa: BLE001 - a handler's error is data
                        await self._failed(g, s, ev, e, out, pending, extra_callbacks)
                if pending:
                    if done > acked:
                        await self._ack_quiet(g, done, stop)
                        acked = done
                    wake = min(out.next_at[s.index] for s in pending)
                    if (await _until(stop, asyncio.sleep(max(0.0, wake - time.monotonic()))))[0]:
                        return  # not acknowledged: delivered again next time
            if out.dead:
                await self._nack_quiet(g, ev, out.reason(ev), stop)
                acked = ev.seq
            done = ev.seq
        if done > acked:
            await self._ack_quiet(g, done, stop)

    async def _failed(
        self,
        g: _Group,
        s: Subscription,
        ev: Event,
        e: BaseException,
        out: _Outcome,
        pending: List[Subscription],
        extra_callbacks: Optional[Callable[[], Sequence[ErrorCallback]]],
    ) -> None:
        n = out.failures.get(s.index, 0) + 1
        out.failures[s.index] = n
        out.errors[s.index] = e
        final = n >= s.max_attempts
        delay: Optional[float] = None
        if final:
            pending.remove(s)
            out.given_up.append(s)
            log.error(
                "consumer %s: handler %s failed %d time(s) on %s seq %d: %s: %s%s; dead-lettering it",
                g.consumer, s.name, n, ev.type, ev.seq, type(e).__name__, e, _where(e),
            )
        else:
            delay = s.delay(n)
            out.next_at[s.index] = time.monotonic() + delay
            log.warning(
                "consumer %s: handler %s failed on %s seq %d (attempt %d of %d): %s: %s; retrying in %.2f s",
                g.consumer, s.name, ev.type, ev.seq, n, s.max_attempts, type(e).__name__, e, delay,
            )
        failure = HandlerFailure(
            consumer=g.consumer,
            handler=s.name,
            event=ev,
            error=e,
            attempt=n,
            max_attempts=s.max_attempts,
            final=final,
            retry_in=delay,
        )
        cbs: List[Optional[ErrorCallback]] = [s.on_error]
        cbs.extend(self._on_error)
        if extra_callbacks is not None:
            cbs.extend(extra_callbacks())
        await _call_callbacks(cbs, failure)

    async def _ack_quiet(self, g: _Group, seq: int, stop: asyncio.Event) -> None:
        failures = 0
        while True:
            try:
                await self.ack(g.consumer, seq)
                return
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                if stop.is_set() or failures > 20:
                    log.warning("consumer %s: ack of %d failed: %s; it will be delivered again", g.consumer, seq, e)
                    return
                await asyncio.sleep(self._retry_wait(failures))

    async def _nack_quiet(self, g: _Group, ev: Event, reason: str, stop: asyncio.Event) -> None:
        failures = 0
        while True:
            try:
                await self.nack(g.consumer, ev.seq, reason)
                return
            except NotFound:
                log.warning("consumer %s: seq %d is no longer retained; acknowledging it", g.consumer, ev.seq)
                await self._ack_quiet(g, ev.seq, stop)
                return
            except (AgentUnavailable, RiftmeshTimeout, ServerError) as e:
                failures += 1
                if stop.is_set() or failures > 20:
                    raise RiftmeshError(f"could not dead-letter seq {ev.seq} of consumer {g.consumer}: {e}") from e
                await asyncio.sleep(self._retry_wait(failures))

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
        on_lost: Optional[Callable[["AsyncLock"], Any]] = None,
    ) -> "AsyncLock":
        """A cluster lock for ``async with``, renewed by a task on this loop
        (as :meth:`Client.lock`)."""
        return AsyncLock(
            self,
            name,
            ttl=ttl,
            holder=holder if holder is not None else f"{socket.gethostname()}:{os.getpid()}",
            wait=wait,
            renew_every=renew_every,
            timeout=timeout,
            on_lost=on_lost,
        )

    async def locks(self) -> List[LockInfo]:
        v = await self._http.request("GET", "/v1/locks")
        return [LockInfo.from_json(x) for x in v["locks"]]

    # ================================================================ blobs

    async def blob_add(
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
        """Stream a local file (read with this process's permissions) to the
        agent as a blob; the blocking file upload runs in a worker thread.
        The naming event's links as in :meth:`riftmesh.Client.blob_add`."""
        sync = Transport(self._http.host, self._http.port, self._http.timeout, self._http.token)
        link = naming_link(source, correlation_id, parent_id, caused_by)
        return await asyncio.to_thread(blob_upload, sync, path, name, event, link)

    async def blobs(self) -> Dict[str, Any]:
        return await self._http.request("GET", "/v1/blobs")  # type: ignore[no-any-return]

    async def blob_info(self, ref: str) -> BlobInfo:
        return BlobInfo.from_json(await self._http.request("GET", "/v1/blob", query={"ref": ref}))

    async def blob_forget(self, name: str) -> Dict[str, Any]:
        """Retract ``name`` cluster-wide (see ``Client.blob_forget``)."""
        return await self._http.request("POST", "/v1/blob/forget", body={"name": name})  # type: ignore[no-any-return]

    @overload
    async def blob_get(
        self,
        ref: Union[str, Event],
        out: None = None,
        *,
        timeout: float = ...,
        name_wait: Optional[float] = ...,
        poll: float = ...,
    ) -> bytes: ...

    @overload
    async def blob_get(
        self,
        ref: Union[str, Event],
        out: Union[str, "os.PathLike[str]"],
        *,
        timeout: float = ...,
        name_wait: Optional[float] = ...,
        poll: float = ...,
    ) -> Path: ...

    async def blob_get(
        self,
        ref: Union[str, Event],
        out: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        timeout: float = 600.0,
        name_wait: Optional[float] = None,
        poll: float = 0.25,
    ) -> Union[Path, bytes]:
        """As :meth:`Client.blob_get`; the waits are ``asyncio.sleep`` and the
        file is written in a worker thread."""
        if isinstance(ref, Event):
            payload = ref.payload if isinstance(ref.payload, dict) else {}
            bname = payload.get("name")
            if not isinstance(bname, str):
                raise ValueError(f"event {ref.id} ({ref.type}) does not name a blob")
            ref = bname
            grace = timeout if name_wait is None else name_wait
        else:
            grace = 10.0 if name_wait is None else name_wait
        deadline = time.monotonic() + timeout
        name_deadline = time.monotonic() + min(grace, timeout)
        while True:
            try:
                r = await self._http.request("POST", "/v1/blob/fetch", body={"ref": ref})
                break
            except NotFound:
                if time.monotonic() >= name_deadline:
                    raise
                await asyncio.sleep(min(poll, 0.1))
        blob_id = str(r["blob"])
        state = str(r["state"])
        while state != "complete":
            if time.monotonic() > deadline:
                raise RiftmeshTimeout(self.address, "GET", f"/v1/blob?ref={ref} (state {state})", timeout)
            await asyncio.sleep(poll)
            info = await self.blob_info(ref)
            state = info.state
            if state in ("absent", "partial") and info.last_failure:
                raise BlobFetchError(ref, str(info.last_failure.get("reason", info.last_failure)))
        h = hashlib.sha256()
        chunks: List[bytes] = []
        tmp: Optional[str] = None
        fh: Any = None
        target: Optional[Path] = None
        try:
            if out is not None:
                target = Path(os.fspath(out))
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=str(target.parent))
                fh = os.fdopen(fd, "wb")
            async with self._http.stream(
                "GET", "/v1/blob/content", query={"ref": blob_id}, timeout=max(self.timeout, 60.0)
            ) as body:
                while True:
                    piece = await body.read(1 << 20)
                    if not piece:
                        break
                    h.update(piece)
                    if fh is not None:
                        await asyncio.to_thread(fh.write, piece)
                    else:
                        chunks.append(piece)
            if h.hexdigest() != blob_id:
                raise BlobFetchError(ref, f"content read has SHA-256 {h.hexdigest()}, not {blob_id}")
            if fh is not None and tmp is not None and target is not None:
                f = fh

                def finish() -> None:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()

                await asyncio.to_thread(finish)
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


class AsyncLock:
    """A cluster lock held while an ``async with`` block runs, renewed by a task.

    As :class:`~riftmesh.Lock`: ``token`` is the fencing token, ``lost`` turns
    true (and ``on_lost(lock)`` is called) if a renewal is refused or the lease
    runs out unrenewed, and :meth:`check` raises :class:`~riftmesh.LockLost`.
    """

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        ttl: float = 30.0,
        holder: Optional[str] = None,
        wait: float = 0.0,
        renew_every: Optional[float] = None,
        timeout: float = 15.0,
        on_lost: Optional[Callable[["AsyncLock"], Any]] = None,
    ) -> None:
        if not 0.1 <= ttl <= 86400:
            raise ValueError("ttl must be between 0.1 and 86400 seconds")
        self.client = client
        self.name = name
        self.ttl = float(ttl)
        self.holder = holder
        self.wait = wait
        self.timeout = timeout
        self.renew_every = renew_every if renew_every is not None else self.ttl / 3.0
        self.on_lost = on_lost
        self.token: Optional[int] = None
        self.expires_ms: Optional[int] = None
        # When this holder stops counting on the lock, on time.monotonic():
        # the send time of the last successful acquire or renewal plus the
        # TTL less a 5 % margin for clock-rate drift. The agent's
        # ``expires_ms`` is for display (proto-notes/leader.md, "Lock lifetimes").
        self._deadline: Optional[float] = None
        self.renewals = 0
        self.attempts = 0
        self.lost_reason: Optional[str] = None
        self._lost = False
        self._released = False
        self._task: Optional["asyncio.Task[None]"] = None

    @property
    def held(self) -> bool:
        return self.token is not None and not self._released and not self._lost

    @property
    def lost(self) -> bool:
        return self._lost

    def check(self) -> int:
        if self.token is None or self._released:
            raise LockLost(f"lock {self.name} is not held")
        if not self._lost and self._deadline is not None and time.monotonic() >= self._deadline:
            self._mark_lost("the lease ran out before a renewal succeeded")
        if self._lost:
            raise LockLost(f"lock {self.name} (token {self.token}) was lost: {self.lost_reason}")
        return self.token

    def _path(self, op: str) -> str:
        return f"/v1/locks/{quote(self.name)}/{op}"

    async def acquire(self) -> "AsyncLock":
        if self.held:
            raise RuntimeError(f"lock {self.name} is already held by this object")
        body: Dict[str, Any] = {"ttl_secs": self.ttl}
        if self.holder is not None:
            body["holder"] = self.holder
        start = time.monotonic()
        self.attempts = 0
        while True:
            self.attempts += 1
            sent = time.monotonic()
            try:
                r = await self.client._http.request("POST", self._path("acquire"), body=body)
                break
            except Conflict as e:
                held = LockHeld(e)
                if time.monotonic() - start >= self.wait:
                    raise held from None
                await asyncio.sleep(min(0.25, max(0.02, self.ttl / 10)))
            except (Unavailable, AgentUnavailable, RiftmeshTimeout):
                if time.monotonic() - start >= max(self.timeout, self.wait):
                    raise
                await asyncio.sleep(0.2)
        self.token = int(r["token"])
        self.expires_ms = int(r["expires_ms"])
        self._deadline = sent + self.ttl * (1 - _DRIFT)
        self.renewals = 0
        self.lost_reason = None
        self._released = False
        self._lost = False
        self._task = asyncio.ensure_future(self._renew_loop())
        return self

    async def renew(self) -> None:
        token = self.check()
        sent = time.monotonic()
        # No longer than the lease has left: past it, the answer no longer matters.
        left = (self._deadline - sent) if self._deadline is not None else self.ttl
        r = await self.client._http.request(
            "POST",
            self._path("renew"),
            body={"token": token},
            timeout=max(0.05, min(self.client.timeout, self.ttl, left)),
        )
        self.expires_ms = int(r["expires_ms"])
        self._deadline = sent + self.ttl * (1 - _DRIFT)
        self.renewals += 1

    async def release(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass
        token = self.token
        if token is None or self._released:
            return
        if not self._lost:
            try:
                await self.client._http.request("POST", self._path("release"), body={"token": token})
            except Conflict:
                pass
        else:
            # Lost by its own deadline: a renewal in flight may have kept it
            # at the agent; the release names its token.
            try:
                await self.client._http.request(
                    "POST", self._path("release"), body={"token": token}, timeout=min(self.client.timeout, 2.0)
                )
            except (Conflict, Unavailable, AgentUnavailable, RiftmeshTimeout):
                pass
        self._released = True

    def _mark_lost(self, reason: str) -> None:
        if self._lost:
            return
        self.lost_reason = reason
        self._lost = True
        log.error("lock %s (token %s) lost: %s", self.name, self.token, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self)
            except Exception:  # noqa: BLE001
                log.exception("on_lost callback of lock %s failed", self.name)

    async def _renew_loop(self) -> None:
        interval = self.renew_every
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
                interval = self.renew_every
            except Conflict as e:
                self._mark_lost(e.message)
                return
            except (Unavailable, AgentUnavailable, RiftmeshTimeout) as e:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._mark_lost(f"could not renew before the lease ended: {e}")
                    return
                interval = max(0.05, self.renew_every / 4)
            except LockLost:
                return
            except Exception as e:  # noqa: BLE001
                self._mark_lost(f"renewal failed: {type(e).__name__}: {e}")
                return

    async def __aenter__(self) -> "AsyncLock":
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.release()

    def __repr__(self) -> str:
        state = "lost" if self.lost else "held" if self.held else "free"
        return f"<AsyncLock {self.name} {state} token={self.token}>"
