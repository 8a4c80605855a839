"""HTTP/1.1 + JSON to the local agent on asyncio, with a keep-alive pool.

Standard library only. Each pooled connection is a :class:`_Proto` that
parses the answer as it arrives and hands it whole to the waiting request;
one connection carries one request at a time, and idle connections are kept
for the next request (up to ``max_connections`` requests in flight, long
polls aside). Streamed answers (blob contents) use asyncio streams on a
connection of their own. A pool belongs to one event loop: used from another
loop (a second ``asyncio.run``) it starts over with new connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Dict, List, Optional, Tuple, TypeVar

from ._transport import Query, _error_message, build_url, format_address
from .errors import AgentUnavailable, RiftmeshTimeout, error_for

__all__ = ["AsyncTransport", "AsyncReader"]

T = TypeVar("T")
_MAX_HEAD = 64 * 1024
_STREAM_LIMIT = 1 << 20


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer byte: retry on a new one."""


class _Conn:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - the loop may be closed already
            pass


class _Response:
    __slots__ = ("status", "reason", "headers", "keep_alive", "length", "chunked")

    def __init__(self, status: int, reason: str, headers: Dict[str, str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = headers.get("connection", "").lower() != "close"
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        cl = headers.get("content-length")
        self.length: Optional[int] = int(cl) if cl is not None and cl.strip().isdigit() else None
        if not self.chunked and self.length is None:
            self.keep_alive = False  # body runs to the end of the connection


def _parse_head(block: bytes) -> _Response:
    lines = block.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/") or not status_line[1].isdigit():
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return _Response(int(status_line[1]), status_line[2] if len(status_line) > 2 else "", headers)


def _parse_chunked(buf: bytearray, start: int) -> Optional[Tuple[bytes, int]]:
    """A whole chunked body at ``buf[start:]``: ``(body, end)``, or None if incomplete."""
    parts: List[bytes] = []
    i = start
    while True:
        eol = buf.find(b"\r\n", i)
        if eol < 0:
            return None
        size = int(bytes(buf[i:eol]).split(b";", 1)[0].strip() or b"0", 16)
        i = eol + 2
        if size == 0:
            while True:  # trailers, then the blank line
                eol = buf.find(b"\r\n", i)
                if eol < 0:
                    return None
                if eol == i:
                    return b"".join(parts), eol + 2
                i = eol + 2
        if len(buf) < i + size + 2:
            return None
        parts.append(bytes(buf[i : i + size]))
        i += size + 2


class _Proto(asyncio.Protocol):
    """One kept-alive connection for whole JSON answers: the answer is parsed as
    it arrives and handed to the waiting request in one step."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.waiter: Optional["asyncio.Future[Tuple[_Response, bytes]]"] = None
        self.head: Optional[_Response] = None
        self.body_at = 0
        self.closed = False
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        try:
            done = self._complete()
        except Exception as e:  # noqa: BLE001 - a malformed answer fails the request
            self.waiter = None
            w.set_exception(e)
            return
        if done is not None:
            self.waiter = None
            w.set_result(done)

    def _complete(self) -> Optional[Tuple[_Response, bytes]]:
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    raise ValueError("answer head too long")
                return None
            self.head = _parse_head(bytes(self.buf[:end]))
            self.body_at = end + 4
        head = self.head
        if head.chunked:
            r = _parse_chunked(self.buf, self.body_at)
            if r is None:
                return None
            body, used = r
        elif head.length is not None:
            used = self.body_at + head.length
            if len(self.buf) < used:
                return None
            body = bytes(self.buf[self.body_at : used])
        else:
            return None  # read to the end of the connection: connection_lost finishes it
        del self.buf[:used]
        self.head = None
        return head, body

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        w = self.waiter
        if w is None or w.done():
            return
        self.waiter = None
        if self.head is not None and not self.head.chunked and self.head.length is None:
            self.head.keep_alive = False
            w.set_result((self.head, bytes(self.buf[self.body_at :])))
        elif self.reused and not self.buf:
            w.set_exception(_Stale())
        else:
            w.set_exception(exc if exc is not None else ConnectionResetError("the agent closed the connection"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _nodelay(sock: Optional[socket.socket]) -> None:
    """Small requests go out at once (no Nagle delay behind the last one)."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class AsyncTransport:
    def __init__(
        self, host: str, port: int, timeout: float, max_connections: int = 64, token: Optional[str] = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.address = format_address(host, port)
        # Sent as ``Authorization: Bearer`` with every request.
        self.token = token
        self._auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        self.max_connections = max(1, max_connections)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._idle: List[_Proto] = []
        self._sem: Optional[asyncio.Semaphore] = None
        # Connections opened so far (a keep-alive pool opens few).
        self.connections_opened = 0
        self._host_header = self.address

    # ------------------------------------------------------------ pool

    def _bind(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._sem is None:
            for c in self._idle:
                c.close()
            self._idle = []
            self._loop = loop
            self._sem = asyncio.Semaphore(self.max_connections)
        return self._sem

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=_STREAM_LIMIT)
        except OSError as e:
            raise AgentUnavailable(self.address, e) from None
        self.connections_opened += 1
        _nodelay(writer.get_extra_info("socket"))
        return _Conn(reader, writer)

    async def _connect_proto(self) -> _Proto:
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await loop.create_connection(_Proto, self.host, self.port)
        except OSError as e:
            raise AgentUnavailable(self.address, e) from None
        self.connections_opened += 1
        _nodelay(transport.get_extra_info("socket"))
        return proto

    def _take(self) -> Optional[_Proto]:
        while self._idle:
            c = self._idle.pop()
            if c.closed or c.buf or c.transport is None or c.transport.is_closing():
                c.close()
                continue
            c.reused = True
            return c
        return None

    def _put(self, c: _Proto) -> None:
        if len(self._idle) < self.max_connections:
            self._idle.append(c)
        else:
            c.close()

    async def aclose(self) -> None:
        """Close the idle connections (requests in flight close theirs when done)."""
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        await asyncio.sleep(0)  # let the transports finish closing

    # ------------------------------------------------------------ one exchange

    def _head(self, method: str, url: str, data: Optional[bytes]) -> bytes:
        if data is None:
            return (
                f"{method} {url} HTTP/1.1\r\nHost: {self._host_header}\r\n{self._auth}"
                "Accept: application/json\r\nContent-Length: 0\r\n\r\n"
            ).encode("latin-1")
        return (
            f"{method} {url} HTTP/1.1\r\nHost: {self._host_header}\r\n{self._auth}"
            "Accept: application/json\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode("latin-1") + data

    async def _send(self, c: _Conn, wire: bytes) -> _Response:
        """Write a request and read the answer's head (the body is left to read)."""
        try:
            c.writer.write(wire)
            if len(wire) > 65536:
                await c.writer.drain()
            try:
                block = await c.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if c.reused and not e.partial:
                    raise _Stale() from None
                raise
        except (ConnectionResetError, BrokenPipeError) as e:
            if c.reused:
                raise _Stale() from e
            raise
        except asyncio.LimitOverrunError:
            raise AgentUnavailable(self.address, ValueError("answer head too long")) from None
        lines = block.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
            raise AgentUnavailable(self.address, ValueError(f"not an HTTP answer: {lines[0][:80]!r}"))
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return _Response(int(status_line[1]), status_line[2] if len(status_line) > 2 else "", headers)

    async def _body(self, c: _Conn, resp: _Response) -> bytes:
        if resp.chunked:
            parts: List[bytes] = []
            async for p in _chunks(c.reader, 1 << 20):
                parts.append(p)
            return b"".join(parts)
        if resp.length is not None:
            return await c.reader.readexactly(resp.length) if resp.length else b""
        return await c.reader.read()

    async def _open_stream(self, method: str, url: str) -> Tuple[_Conn, _Response]:
        """A new connection of its own for a streamed answer: send, read the head."""
        c = await self._connect()
        try:
            return c, await self._send(c, self._head(method, url, None))
        except BaseException:
            c.close()
            raise

    async def _request(self, method: str, path: str, url: str, data: Optional[bytes]) -> Any:
        wire = self._head(method, url, data)
        loop = asyncio.get_running_loop()
        for attempt in range(4):
            c = (self._take() if attempt < 3 else None) or await self._connect_proto()
            fut: "asyncio.Future[Tuple[_Response, bytes]]" = loop.create_future()
            c.waiter = fut
            try:
                assert c.transport is not None
                c.transport.write(wire)
                resp, raw = await fut
                break
            except _Stale:
                c.close()
                continue
            except BaseException:
                c.close()
                raise
        else:  # pragma: no cover - the fourth attempt is on a new connection
            raise AgentUnavailable(self.address, None)
        if resp.keep_alive and not c.closed:
            c.reused = False
            self._put(c)
        else:
            c.close()
        if resp.status >= 400:
            message, decoded = _error_message(raw, resp.reason)
            raise error_for(resp.status, message, method, path, decoded)
        if not raw:
            return None
        return json.loads(raw)

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Query] = None,
        body: Any = None,
        timeout: Optional[float] = None,
        pooled: bool = True,
    ) -> Any:
        """Send one request; the decoded JSON answer, or an exception.

        ``pooled=False`` (long polls) does not count against ``max_connections``."""
        t = self.timeout if timeout is None else timeout
        url = build_url(path, query)
        data = None if body is None else json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
        sem = self._bind()
        try:
            if pooled:
                async with sem:
                    return await _within(t, self._request(method, path, url, data))
            return await _within(t, self._request(method, path, url, data))
        except asyncio.TimeoutError:
            raise RiftmeshTimeout(self.address, method, path, t) from None
        except (OSError, asyncio.IncompleteReadError) as e:
            raise AgentUnavailable(self.address, e) from None

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, query: Optional[Query] = None, timeout: Optional[float] = None
    ) -> AsyncIterator["AsyncReader"]:
        """A readable body (blob contents); ``timeout`` bounds each read."""
        t = self.timeout if timeout is None else timeout
        url = build_url(path, query)
        self._bind()
        try:
            c, resp = await _within(t, self._open_stream(method, url))
        except asyncio.TimeoutError:
            raise RiftmeshTimeout(self.address, method, path, t) from None
        except (OSError, asyncio.IncompleteReadError) as e:
            raise AgentUnavailable(self.address, e) from None
        try:
            if resp.status >= 400:
                raw = await _within(t, self._body(c, resp))
                message, decoded = _error_message(raw, resp.reason)
                raise error_for(resp.status, message, method, path, decoded)
            yield AsyncReader(self, c, resp, method, path, t)
        finally:
            c.close()  # a stream's connection is its own, not kept


class AsyncReader:
    """The body of a streamed answer: ``await read()`` pieces until ``b""``."""

    def __init__(self, t: AsyncTransport, c: _Conn, resp: _Response, method: str, path: str, timeout: float) -> None:
        self._t = t
        self._c = c
        self._resp = resp
        self._method = method
        self._path = path
        self._timeout = timeout
        self.length = resp.length
        self._left = resp.length
        self._chunks: Optional[AsyncIterator[bytes]] = _chunks(c.reader, 1 << 20) if resp.chunked else None
        self.done = False

    async def read(self, n: int = 1 << 20) -> bytes:
        try:
            return await _within(self._timeout, self._read(n))
        except asyncio.TimeoutError:
            raise RiftmeshTimeout(self._t.address, self._method, self._path, self._timeout) from None
        except (OSError, asyncio.IncompleteReadError) as e:
            raise AgentUnavailable(self._t.address, e) from None

    async def _read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self._chunks is not None:
            try:
                return await self._chunks.__anext__()
            except StopAsyncIteration:
                self.done = True
                return b""
        if self._left is None:
            piece = await self._c.reader.read(n)
            if not piece:
                self.done = True
            return piece
        if self._left == 0:
            self.done = True
            return b""
        piece = await self._c.reader.read(min(n, self._left))
        if not piece:
            raise asyncio.IncompleteReadError(b"", self._left)
        self._left -= len(piece)
        return piece


async def _chunks(reader: asyncio.StreamReader, n: int) -> AsyncIterator[bytes]:
    """The pieces of a chunked body (trailers skipped)."""
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the blank line
                t = await reader.readline()
                if t in (b"\r\n", b"\n", b""):
                    return
        while size > 0:
            piece = await reader.readexactly(min(n, size))
            size -= len(piece)
            yield piece
        await reader.readexactly(2)


if sys.version_info >= (3, 11):

    async def _within(seconds: float, aw: Awaitable[T]) -> T:
        async with asyncio.timeout(seconds):
            return await aw

else:  # pragma: no cover - older Pythons

    async def _within(seconds: float, aw: Awaitable[T]) -> T:
        return await asyncio.wait_for(aw, seconds)
