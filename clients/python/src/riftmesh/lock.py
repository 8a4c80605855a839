"""A cluster lock held while a ``with`` block runs, renewed in the background."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Type

from .errors import (
    AgentUnavailable,
    Conflict,
    LockHeld,
    LockLost,
    RiftmeshTimeout,
    Unavailable,
)

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

log = logging.getLogger("riftmesh")

# A holder stops counting on its lease 5 % of the TTL early: the leader's
# monotonic clock may run slightly faster (as `riftmesh lock run`).
_DRIFT = 0.05

__all__ = ["Lock"]


class Lock:
    """A lock of the cluster's lock table (proto-notes/leader.md).

    Use it as a context manager::

        with mesh.lock("promote", ttl=30) as lock:
            do_work(fencing_token=lock.token)

    Entering acquires it (``LockHeld`` if someone else holds it and ``wait``
    runs out); while the block runs a background thread renews it every third
    of the TTL; leaving releases it. ``token`` is the fencing token: it strictly
    increases across grants, so a resource that remembers the highest token it
    saw can refuse a stale holder. If a renewal is refused or the lease runs out
    unrenewed, ``lost`` becomes true, ``on_lost`` is called, and
    :meth:`check` raises :class:`~riftmesh.LockLost`.
    """

    def __init__(
        self,
        client: "Client",
        name: str,
        *,
        ttl: float = 30.0,
        holder: Optional[str] = None,
        wait: float = 0.0,
        renew_every: Optional[float] = None,
        timeout: float = 15.0,
        on_lost: Optional[Callable[["Lock"], Any]] = None,
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
        # Acquire requests made by the last acquire() (it retries while held or leaderless).
        self.attempts = 0
        self.lost_reason: Optional[str] = None
        self._lost = threading.Event()
        self._lost_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._released = False

    # ------------------------------------------------------------ state

    @property
    def held(self) -> bool:
        """True between a grant and the release, unless the lock was lost."""
        return self.token is not None and not self._released and not self._lost.is_set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> int:
        """The fencing token, or :class:`~riftmesh.LockLost` if the lock is not held."""
        if self.token is None or self._released:
            raise LockLost(f"lock {self.name} is not held")
        if not self._lost.is_set() and self._deadline is not None and time.monotonic() >= self._deadline:
            self._mark_lost("the lease ran out before a renewal succeeded")
        if self._lost.is_set():
            raise LockLost(f"lock {self.name} (token {self.token}) was lost: {self.lost_reason}")
        return self.token

    # ------------------------------------------------------------ calls

    def _path(self, op: str) -> str:
        from ._transport import quote

        return f"/v1/locks/{quote(self.name)}/{op}"

    def acquire(self) -> "Lock":
        """Acquire the lock and start renewing it. Retries while no leader is known
        (503) for up to ``timeout`` s, and while it is held for up to ``wait`` s."""
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
                r = self.client._http.request("POST", self._path("acquire"), body=body)
                break
            except Conflict as e:
                held = LockHeld(e)
                if time.monotonic() - start >= self.wait:
                    raise held from None
                time.sleep(min(0.25, max(0.02, self.ttl / 10)))
            except (Unavailable, AgentUnavailable, RiftmeshTimeout):
                if time.monotonic() - start >= max(self.timeout, self.wait):
                    raise
                time.sleep(0.2)
        self.token = int(r["token"])
        self.expires_ms = int(r["expires_ms"])
        self._deadline = sent + self.ttl * (1 - _DRIFT)
        self.renewals = 0
        self.lost_reason = None
        self._released = False
        self._lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"riftmesh-lock-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def renew(self) -> None:
        """Renew once now (the background thread does this on its own)."""
        token = self.check()
        sent = time.monotonic()
        # No longer than the lease has left: past it, the answer no longer matters.
        left = (self._deadline - sent) if self._deadline is not None else self.ttl
        r = self.client._http.request(
            "POST",
            self._path("renew"),
            body={"token": token},
            timeout=max(0.05, min(self.client.timeout, self.ttl, left)),
        )
        self.expires_ms = int(r["expires_ms"])
        self._deadline = sent + self.ttl * (1 - _DRIFT)
        self.renewals += 1

    def release(self) -> None:
        """Stop renewing and release the lock. A lock lost by its own deadline is
        released too, briefly (a renewal in flight may have kept it at the
        agent): the release names its token, so it can't free another holder's.

        ``token`` keeps the value of the grant afterwards, for logs."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        self._thread = None
        token = self.token
        if token is None or self._released:
            return
        if not self._lost.is_set():
            try:
                self.client._http.request("POST", self._path("release"), body={"token": token})
            except Conflict:
                pass  # it expired or was taken meanwhile: nothing to release
        else:
            try:
                self.client._http.request(
                    "POST", self._path("release"), body={"token": token}, timeout=min(self.client.timeout, 2.0)
                )
            except (Conflict, Unavailable, AgentUnavailable, RiftmeshTimeout):
                pass  # taken, expired, or the agent is out of reach: nothing to do
        self._released = True

    def _mark_lost(self, reason: str) -> None:
        # Once: check() on the caller's thread and the renewer may both find
        # the lease over.
        with self._lost_lock:
            if self._lost.is_set():
                return
            self.lost_reason = reason
            self._lost.set()
        log.error("lock %s (token %s) lost: %s", self.name, self.token, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self)
            except Exception:  # noqa: BLE001 - a callback must not kill the renewer
                log.exception("on_lost callback of lock %s failed", self.name)

    def _renew_loop(self) -> None:
        interval = self.renew_every
        while not self._stop.wait(interval):
            try:
                self.renew()
                interval = self.renew_every
            except Conflict as e:
                self._mark_lost(e.message)
                return
            except (Unavailable, AgentUnavailable, RiftmeshTimeout) as e:
                # Keep trying faster until the lease would have run out.
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._mark_lost(f"could not renew before the lease ended: {e}")
                    return
                interval = max(0.05, self.renew_every / 4)
            except LockLost:
                return
            except Exception as e:  # noqa: BLE001
                self._mark_lost(f"renewal failed: {type(e).__name__}: {e}")
                return

    # ------------------------------------------------------------ protocols

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.release()

    async def __aenter__(self) -> "Lock":
        return await asyncio.to_thread(self.acquire)

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await asyncio.to_thread(self.release)

    def __repr__(self) -> str:
        state = "lost" if self.lost else "held" if self.held else "free"
        return f"<Lock {self.name} {state} token={self.token}>"
