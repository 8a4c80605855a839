"""HTTP/1.1 + JSON to the local agent, with nothing but the standard library."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.parse
from contextlib import contextmanager
from typing import Any, BinaryIO, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

from .errors import AgentUnavailable, RiftmeshTimeout, error_for

DEFAULT_API = "127.0.0.1:7411"

QueryValue = Union[str, int, float, bool, None]
Query = Union[Mapping[str, QueryValue], Sequence[Tuple[str, QueryValue]]]


def resolve_address(api: Optional[str] = None) -> Tuple[str, int]:
    """``(host, port)`` from ``api``, else ``RIFTMESH_API``, else 127.0.0.1:7411.

    Accepts ``host:port``, ``[v6]:port`` and ``http://host:port``.
    """
    raw = api if api else (os.environ.get("RIFTMESH_API") or DEFAULT_API)
    text = raw.strip()
    if "://" in text:
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme != "http":
            raise ValueError(f"riftmesh API address {raw!r}: only http:// is served")
        text = parsed.netloc
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"riftmesh API address {raw!r}: expected HOST:PORT, e.g. {DEFAULT_API}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


TOKEN_FILE_ENV = "RIFTMESH_API_TOKEN_FILE"


def check_token(token: str, where: str) -> str:
    """``token`` without surrounding whitespace; ValueError unless it is one
    line of visible ASCII characters (what an HTTP header carries)."""
    t = token.strip()
    if not t:
        raise ValueError(f"riftmesh API token {where}: empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in t):
        raise ValueError(
            f"riftmesh API token {where}: must be one line of visible ASCII characters "
            "(no spaces or control characters)"
        )
    return t


def resolve_token(token: Optional[str] = None) -> Optional[str]:
    """The API token to send: ``token``, else the content of the file named by
    ``RIFTMESH_API_TOKEN_FILE`` (the agent's ``api_token_file``, or the
    ``api.token`` it made in its data directory), else none.

    A named file that cannot be read, or holds no token, is a ValueError
    at once rather than a 401 at the first request.
    """
    if token is not None:
        return check_token(token, "given as token=")
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the riftmesh API token file {path!r} (from {TOKEN_FILE_ENV}): {e}") from None
    return check_token(text, f"in {path!r} (from {TOKEN_FILE_ENV})")


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Abort:
    """Lets another thread cut an in-flight request short (used to stop long polls)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: abort() may run in a signal handler
        self._conn: Optional[http.client.HTTPConnection] = None
        self.aborted = False

    def attach(self, conn: http.client.HTTPConnection) -> bool:
        with self._lock:
            if self.aborted:
                return False
            self._conn = conn
            return True

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Aborted(Exception):
    """The request was cut short by :meth:`Abort.abort`."""


def quote(segment: str) -> str:
    """One path segment, percent-encoded (names may hold ``/`` or ``:``)."""
    return urllib.parse.quote(segment, safe="")


def build_url(path: str, query: Optional[Query]) -> str:
    """``path`` with ``query`` encoded (``None`` values left out, booleans as true/false)."""
    if not query:
        return path
    items = query.items() if isinstance(query, Mapping) else query
    pairs = []
    for k, v in items:
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        pairs.append((k, str(v)))
    return path + ("?" + urllib.parse.urlencode(pairs) if pairs else "")


class Transport:
    def __init__(self, host: str, port: int, timeout: float, token: Optional[str] = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.address = format_address(host, port)
        # Sent as ``Authorization: Bearer`` with every request.
        self.token = token

    def _url(self, path: str, query: Optional[Query]) -> str:
        return build_url(path, query)

    @contextmanager
    def _exchange(
        self,
        method: str,
        path: str,
        query: Optional[Query],
        body: Any,
        timeout: Optional[float],
        abort: Optional[Abort],
        upload: Optional[Tuple[BinaryIO, int]] = None,
    ) -> Iterator[http.client.HTTPResponse]:
        t = self.timeout if timeout is None else timeout
        url = self._url(path, query)
        headers: Dict[str, str] = {"Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data: Union[None, bytes, BinaryIO] = None
        if body is not None:
            data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif upload is not None:
            # A file object: http.client streams it in blocks.
            data = upload[0]
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(upload[1])
        conn = http.client.HTTPConnection(self.host, self.port, timeout=t)
        if abort is not None and not abort.attach(conn):
            raise Aborted()
        try:
            try:
                try:
                    conn.request(method, url, body=data, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    # The agent may answer before it has read the whole body
                    # (a refused upload: 401, 403, 413) and close: its answer
                    # is still there to read; failing that, the error stands.
                    if upload is None:
                        raise
                resp = conn.getresponse()
            except (socket.timeout, TimeoutError):
                if abort is not None and abort.aborted:
                    raise Aborted() from None
                raise RiftmeshTimeout(self.address, method, path, t) from None
            except (OSError, http.client.HTTPException) as e:
                if abort is not None and abort.aborted:
                    raise Aborted() from None
                raise AgentUnavailable(self.address, e) from None
            if resp.status >= 400:
                raw = self._read(resp, method, path, t, abort)
                message, decoded = _error_message(raw, resp.reason)
                raise error_for(resp.status, message, method, path, decoded)
            yield resp
        finally:
            if abort is not None:
                abort.detach()
            conn.close()

    def _read(
        self,
        resp: http.client.HTTPResponse,
        method: str,
        path: str,
        timeout: float,
        abort: Optional[Abort],
    ) -> bytes:
        try:
            return resp.read()
        except (socket.timeout, TimeoutError):
            if abort is not None and abort.aborted:
                raise Aborted() from None
            raise RiftmeshTimeout(self.address, method, path, timeout) from None
        except (OSError, http.client.HTTPException) as e:
            if abort is not None and abort.aborted:
                raise Aborted() from None
            raise AgentUnavailable(self.address, e) from None

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Query] = None,
        body: Any = None,
        timeout: Optional[float] = None,
        abort: Optional[Abort] = None,
    ) -> Any:
        """Send one request; the decoded JSON answer, or an exception."""
        t = self.timeout if timeout is None else timeout
        with self._exchange(method, path, query, body, timeout, abort) as resp:
            raw = self._read(resp, method, path, t, abort)
        if not raw:
            return None
        return json.loads(raw)

    def upload(
        self,
        path: str,
        fileobj: BinaryIO,
        length: int,
        *,
        query: Optional[Query] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """POST ``length`` bytes read from ``fileobj`` (streamed); the decoded JSON answer."""
        t = self.timeout if timeout is None else timeout
        with self._exchange("POST", path, query, None, timeout, None, upload=(fileobj, length)) as resp:
            raw = self._read(resp, "POST", path, t, None)
        return json.loads(raw) if raw else None

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Query] = None,
        timeout: Optional[float] = None,
    ) -> Iterator["Reader"]:
        """A readable body (for blob contents), errors mapped like :meth:`request`."""
        t = self.timeout if timeout is None else timeout
        with self._exchange(method, path, query, None, timeout, None) as resp:
            yield Reader(self, resp, method, path, t)


class Reader:
    def __init__(
        self,
        transport: Transport,
        resp: http.client.HTTPResponse,
        method: str,
        path: str,
        timeout: float,
    ) -> None:
        self._t = transport
        self._resp = resp
        self._method = method
        self._path = path
        self._timeout = timeout
        length = resp.getheader("Content-Length")
        self.length: Optional[int] = int(length) if length and length.isdigit() else None

    def read(self, n: int) -> bytes:
        try:
            return self._resp.read(n)
        except (socket.timeout, TimeoutError):
            raise RiftmeshTimeout(self._t.address, self._method, self._path, self._timeout) from None
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnavailable(self._t.address, e) from None


def _error_message(raw: bytes, reason: str) -> Tuple[str, Optional[Dict[str, Any]]]:
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        msg = decoded.get("error")
        if isinstance(msg, str) and msg:
            return msg, decoded
        return raw.decode("utf-8", "replace") or reason, decoded
    return raw.decode("utf-8", "replace").strip() or reason, None
