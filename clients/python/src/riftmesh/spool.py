"""A local spool of publishes the agent could not take yet.

``Client.publish_or_spool`` (and ``AsyncClient.publish_or_spool``, the
router's ``fire_and_forget``) write a publish the agent did not take, with its
idempotency key, to a file of its own in the spool directory;
``flush_spool`` sends the files again, oldest first, each with its own key,
and deletes a file once the agent has answered it (a new event or a
duplicate: either way the event is on the agent's disk). Because the key
goes with the file, sending a file twice (two flushers, a crash between the
answer and the delete) is one event.

One file per publish, written atomically: a temporary file, fsync, rename,
fsync of the directory, so a file in the spool is always whole. A file the
agent refuses with a 4xx answer (a bad type name, too large) can never be
sent: it is moved to ``rejected/`` with a ``.reason`` file beside it and
logged, never sent again. The spool is bounded (``max_files``,
``max_bytes``): beyond the bound a new publish is **refused**
(:class:`~riftmesh.errors.SpoolFull`, counted in ``Spool.refused``) and what
is spooled stays as it was. The oldest files are the facts that have waited
longest and a consumer reads them in order; dropping them would leave a hole
in the middle of the history, where refusing the newest leaves an unbroken
prefix and tells the caller at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from .errors import SpoolFull

__all__ = [
    "Spool",
    "FlushResult",
    "SpoolFull",
    "default_spool_dir",
    "service_name",
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_BYTES",
]

log = logging.getLogger("riftmesh")

DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 64 << 20
REJECTED = "rejected"
# A temporary file this old is left over from a crash mid-write.
_STALE_TMP_SECS = 600.0
_FORMAT = 1


def service_name() -> str:
    """``RIFTMESH_SERVICE``, else the script's name (the seeds run one daemon per script)."""
    env = os.environ.get("RIFTMESH_SERVICE")
    if env:
        return env
    script = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else ""))[0]
    return script if script and script not in ("-c", "-m") else "main"


def default_spool_dir(service: Optional[str] = None) -> Path:
    """``RIFTMESH_SPOOL``, else ``$XDG_STATE_HOME/riftmesh/spool/<service>``
    (``~/.local/state/...`` without ``XDG_STATE_HOME``); ``service`` defaults to
    :func:`service_name`."""
    env = os.environ.get("RIFTMESH_SPOOL")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in (service or service_name())) or "main"
    return Path(state) / "riftmesh" / "spool" / name


@dataclass
class FlushResult:
    """What one :meth:`Client.flush_spool` did.

    ``sent`` files were new events, ``duplicates`` were already on the agent
    (sent before, by this or another flusher), ``rejected`` were refused with
    a 4xx answer and moved to ``rejected/``; ``pending`` files are left.
    ``error`` is what stopped the flush early (the agent unreachable, 5xx),
    else ``None``.
    """

    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    pending: int = 0
    error: Optional[BaseException] = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Line:
    """The order of one spool directory's publishes in this process.

    A publish that may end in the spool takes its place in line when it is
    called (:meth:`take`, before any request), and makes its attempt (send,
    or write its file) only when every earlier place is done (:meth:`wait`
    from a thread, :meth:`wait_async` from a task), then gives its turn on
    (:meth:`leave`). So concurrent calls, from threads or tasks, reach the
    spool and the agent in the order they were made, whichever of them the
    agent answers first. One line per directory: every :class:`Spool` of that
    directory in this process shares it.
    """

    def __init__(self) -> None:
        # Guards the line's own counters only: taken on an event loop's
        # thread too, so nothing slow (file I/O, fsync) runs under it.
        self.lock = threading.Lock()
        # Serializes this process's writes to the spool directory (put): a
        # thread may hold it across a write and an fsync, so an event
        # loop's thread never takes it.
        self.io_lock = threading.Lock()
        self._next = 0
        self._turn = 0
        self._left: Set[int] = set()
        self._wake: Dict[int, Callable[[], None]] = {}
        # The last spool file's time stamp: names strictly increase.
        self.last_ns = 0

    @property
    def waiting(self) -> int:
        """Places taken and not yet done (the one whose turn it is included)."""
        with self.lock:
            return self._next - self._turn - len(self._left)

    def take(self) -> int:
        with self.lock:
            n = self._next
            self._next += 1
            return n

    def _register(self, place: int, wake: Callable[[], None]) -> bool:
        """True if it is ``place``'s turn now; else ``wake`` is called when it is."""
        with self.lock:
            if self._turn == place:
                return True
            self._wake[place] = wake
            return False

    def wait(self, place: int) -> None:
        """Block this thread until ``place``'s turn. On a thread that runs an
        event loop it does not wait: the turn may belong to a task of that
        very loop, which could then never give it on; the call goes out of
        line (its order is not kept) rather than hang."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            log.warning("a spooling publish made with the blocking Client on an event loop's thread does not wait its turn")
            return
        ev = threading.Event()
        if not self._register(place, ev.set):
            ev.wait()

    async def wait_async(self, place: int) -> None:
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[None]" = loop.create_future()

        def set_fut() -> None:
            if not fut.done():
                fut.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(set_fut)

        if not self._register(place, wake):
            await fut

    def leave(self, place: int) -> None:
        """``place`` is done (or given up before its turn): the next one may go."""
        wake: Optional[Callable[[], None]] = None
        with self.lock:
            self._wake.pop(place, None)
            if place < self._turn:
                return  # done already
            if place != self._turn:
                self._left.add(place)  # skipped when its turn comes
                return
            self._turn += 1
            while self._turn in self._left:
                self._left.discard(self._turn)
                self._turn += 1
            turn = self._turn
            wake = self._wake.pop(turn, None)
        if wake is not None:
            try:
                wake()
            except RuntimeError:
                # Its loop is closed: nobody will take that turn.
                self.leave(turn)


_lines: Dict[str, Line] = {}
_lines_lock = threading.Lock()


def _forget_lines_in_child() -> None:
    # A forked child inherits the parent's lines, perhaps with a turn held
    # by a parent thread that will never give it on in the child (or a lock
    # held at the fork): the child starts lines of its own.
    global _lines_lock
    _lines.clear()
    _lines_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lines_in_child)


def _line_for(directory: Path) -> Line:
    key = os.path.abspath(str(directory))
    with _lines_lock:
        line = _lines.get(key)
        if line is None:
            line = _lines[key] = Line()
        return line


class Spool:
    """The spool directory of one service (see the module's text)."""

    def __init__(
        self,
        directory: Union[str, "os.PathLike[str]"],
        *,
        max_files: int = DEFAULT_MAX_FILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self.rejected_dir = self.directory / REJECTED
        self.max_files = max_files
        self.max_bytes = max_bytes
        # Publishes refused because the spool was full (this process).
        self.refused = 0
        # Files moved to rejected/ (this process).
        self.rejected = 0

    @property
    def line(self) -> Line:
        """The order of this directory's publishes in this process (shared by
        its Spools; a forked child has its own)."""
        return _line_for(self.directory)

    def __repr__(self) -> str:
        return f"<riftmesh.Spool {self.directory}>"

    # ---------------------------------------------------------- files

    def pending(self) -> List[Path]:
        """The spooled files, oldest first."""
        try:
            names = [
                e.name
                for e in os.scandir(self.directory)
                if e.name.endswith(".json") and not e.name.startswith(".") and e.is_file()
            ]
        except FileNotFoundError:
            return []
        return [self.directory / n for n in sorted(names)]

    def has_pending(self) -> bool:
        try:
            with os.scandir(self.directory) as it:
                return any(e.name.endswith(".json") and not e.name.startswith(".") for e in it)
        except FileNotFoundError:
            return False

    def usage(self) -> Tuple[int, int]:
        """``(files, bytes)`` pending."""
        files = size = 0
        for p in self.pending():
            try:
                size += p.stat().st_size
                files += 1
            except FileNotFoundError:
                pass
        return files, size

    def put(self, body: Dict[str, Any]) -> Path:
        """Write one publish request (with its ``idempotency_key``) atomically; its path.

        Raises :class:`SpoolFull` when it would go beyond ``max_files`` or ``max_bytes``."""
        key = body.get("idempotency_key")
        if not isinstance(key, str) or not key:
            raise ValueError("only a publish with an idempotency key can be spooled")
        data = json.dumps(
            {"format": _FORMAT, "spooled_ms": int(time.time() * 1000), "body": body},
            separators=(",", ":"),
            allow_nan=False,
        ).encode("utf-8")
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        line = self.line
        with line.io_lock:
            files, size = self.usage()
            if files + 1 > self.max_files or size + len(data) > self.max_bytes:
                self.refused += 1
                raise SpoolFull(str(self.directory), files, size, self.max_files, self.max_bytes)
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Names sort by time, strictly increasing in this process: a
            # flush sends the oldest first.
            ns = max(time.time_ns(), line.last_ns + 1)
            line.last_ns = ns
            name = f"{ns:020d}-{os.getpid()}-{digest}.json"
            tmp = self.directory / f".tmp-{name}"
            final = self.directory / name
            fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        return final

    def load(self, path: Path) -> Dict[str, Any]:
        """The request body in a spooled file (``ValueError`` if it is not one;
        ``FileNotFoundError`` if another flusher took it meanwhile)."""
        raw = path.read_bytes()
        try:
            v = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from None
        body = v.get("body") if isinstance(v, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not body.get("idempotency_key"):
            raise ValueError("not a spooled publish (no body with a type and an idempotency_key)")
        return body

    def done(self, path: Path) -> None:
        """The agent has it: forget the file (a lost delete only means a duplicate later)."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def reject(self, path: Path, reason: str) -> None:
        """Move a file the agent will never take to ``rejected/``, with its reason beside it."""
        self.rejected_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dest = self.rejected_dir / path.name
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return
        try:
            (self.rejected_dir / (path.name + ".reason")).write_text(reason + "\n", encoding="utf-8")
        except OSError:
            pass
        _fsync_dir(self.rejected_dir)
        self.rejected += 1
        log.error("spooled publish %s was refused by the agent and moved to %s: %s", path.name, dest, reason)

    def clean_tmp(self) -> None:
        """Remove temporary files left by a crash mid-write."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        now = time.time()
        for e in entries:
            if e.name.startswith(".tmp-"):
                try:
                    if now - e.stat().st_mtime > _STALE_TMP_SECS:
                        os.unlink(e.path)
                except OSError:
                    pass
