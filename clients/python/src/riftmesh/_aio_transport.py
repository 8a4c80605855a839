"""HTTP/1.1 + JSON to the local agent on asyncio streams, with a keep-alive pool.

Standard library only. One connection carries one request at a time; idle
connections are kept for the next request (up to ``max_connections`` requests
in flight, long polls aside). A pool belongs to one event loop: used from
another loop (a second ``asyncio.run``) it starts over with new connections.
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


class AsyncTransport:
    def __init__(self, host: str, port: int, timeout: float, max_connections: int = 64) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.address = format_address(host, port)
        self.max_connections = max(1, max_connections)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._idle: List[_Conn] = []
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
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return _Conn(reader, writer)

    def _take(self) -> Optional[_Conn]:
        while self._idle:
            c = self._idle.pop()
            if c.reader.at_eof() or c.writer.is_closing():
                c.close()
                continue
            c.reused = True
            return c
        return None

    def _put(self, c: _Conn) -> None:
        if len(self._idle) < self.max_connections:
            self._idle.append(c)
        else:
            c.close()

    async def aclose(self) -> None:
        """Close the idle connections (requests in flight close theirs when done)."""
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        for c in idle:
            try:
                await c.writer.wait_closed()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------ one exchange

    def _head(self, method: str, url: str, data: Optional[bytes]) -> bytes:
        if data is None:
            return (
                f"{method} {url} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                "Accept: application/json\r\nContent-Length: 0\r\n\r\n"
            ).encode("latin-1")
        return (
            f"{method} {url} HTTP/1.1\r\nHost: {self._host_header}\r\n"
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

    async def _exchange(self, method: str, url: str, data: Optional[bytes]) -> Tuple[_Conn, _Response]:
        """Send on a kept connection (once more on a new one if it was stale)."""
        for _ in range(3):
            c = self._take() or await self._connect()
            try:
                return c, await self._send(c, self._head(method, url, data))
            except _Stale:
                c.close()
                continue
            except BaseException:
                c.close()
                raise
        c = await self._connect()
        try:
            return c, await self._send(c, self._head(method, url, data))
        except BaseException:
            c.close()
            raise

    async def _request(self, method: str, path: str, url: str, data: Optional[bytes]) -> Any:
        c, resp = await self._exchange(method, url, data)
        try:
            raw = await self._body(c, resp)
        except BaseException:
            c.close()
            raise
        if resp.keep_alive:
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
            c, resp = await _within(t, self._exchange(method, url, None))
        except asyncio.TimeoutError:
            raise RiftmeshTimeout(self.address, method, path, t) from None
        except (OSError, asyncio.IncompleteReadError) as e:
            raise AgentUnavailable(self.address, e) from None
        ok = False
        try:
            if resp.status >= 400:
                raw = await _within(t, self._body(c, resp))
                message, decoded = _error_message(raw, resp.reason)
                raise error_for(resp.status, message, method, path, decoded)
            reader = AsyncReader(self, c, resp, method, path, t)
            yield reader
            ok = reader.done and resp.keep_alive
        finally:
            if ok:
                self._put(c)
            else:
                c.close()


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
