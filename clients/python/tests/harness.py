"""Real `riftmesh agent` processes for the tests: own data dir, ports chosen by
the OS (read back from agent.json), --no-mdns, a shared generated swarm key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

T = TypeVar("T")

# Generous: the test machine is a loaded 2-core box.
START_DEADLINE = 90.0


def riftmesh_bin() -> Path:
    return Path(os.environ.get("RIFTMESH_BIN") or REPO / "target" / "release" / "riftmesh")


def wait_until(what: str, fn: Callable[[], Optional[T]], timeout: float = 60.0, interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_exc = e
        if time.monotonic() > deadline:
            extra = f" (last error: {type(last_exc).__name__}: {last_exc})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """Child side: get SIGKILL if the test process dies (Linux), so no agent outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - best effort, teardown kills it anyway
        pass


def keygen(path: Path) -> Path:
    subprocess.run(
        [str(riftmesh_bin()), "keygen", "--out", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    return path


def http_json(
    api: str, method: str, path: str, body: Any = None, timeout: float = 10.0, token: Optional[str] = None
) -> Any:
    """A bare stdlib request, independent of the client under test."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{api}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


class Agent:
    def __init__(
        self,
        root: Path,
        name: str,
        swarm_key: Path,
        *,
        bootstrap: Sequence[str] = (),
        config: Optional[str] = None,
        extra: Sequence[str] = (),
        api: str = "127.0.0.1:0",
    ) -> None:
        self.name = name
        self.api_arg = api
        self.dir = root / name
        self.swarm_key = swarm_key
        self.bootstrap = list(bootstrap)
        self.config_text = config
        self.extra = list(extra)
        self.proc: Optional[subprocess.Popen] = None
        self.api = ""
        self.peer_id = ""
        # The API token the helpers send: --api-token-file, else the
        # api.token the agent made (an API not on loopback).
        self.token: Optional[str] = None

    # ---------------------------------------------------------- life

    def start(self) -> "Agent":
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "agent.json"
        try:
            info.unlink()
        except FileNotFoundError:
            pass
        cmd: List[str] = [
            str(riftmesh_bin()),
            "agent",
            "--name", self.name,
            "--data-dir", str(self.dir),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--api", self.api_arg,
            "--metrics", "127.0.0.1:0",
            "--no-mdns",
            "--swarm-key", str(self.swarm_key),
        ]
        if self.config_text is not None:
            cfg = self.dir.parent / f"{self.name}.toml"
            cfg.write_text(self.config_text)
            cmd += ["--config", str(cfg)]
        for b in self.bootstrap:
            cmd += ["--bootstrap", b]
        cmd += self.extra
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIFTMESH_")}
        env.setdefault("RUST_LOG", "info")
        log = open(self.dir / "agent.log", "ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        pid = self.proc.pid

        def ready() -> Optional[Dict[str, Any]]:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                v = json.loads(info.read_text())
            except (OSError, ValueError):
                return None
            return v if v.get("pid") == pid else None

        try:
            v = wait_until(f"agent {self.name} to write agent.json", ready, START_DEADLINE)
            self.api = str(v["api"])
            self.peer_id = str(v["peer_id"])
            self.token = self._token()
            wait_until(
                f"agent {self.name} to answer GET /v1/health",
                lambda: http_json(self.api, "GET", "/v1/health").get("ok") is True,
                START_DEADLINE,
            )
        except BaseException:
            tail = self.log_tail()
            self.kill()
            raise AssertionError(f"agent {self.name} did not start; log tail:\n{tail}")
        return self

    def _token(self) -> Optional[str]:
        if "--api-token-file" in self.extra:
            f = Path(self.extra[self.extra.index("--api-token-file") + 1])
        else:
            f = self.dir / "api.token"
        try:
            return f.read_text().strip()
        except FileNotFoundError:
            return None

    def kill(self) -> None:
        """SIGKILL and reap (a crash, as far as the agent can tell)."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def restart(self) -> "Agent":
        self.kill()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------- views

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = (self.dir / "agent.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def get(self, path: str) -> Any:
        return http_json(self.api, "GET", path, token=self.token)

    def p2p_addr(self) -> str:
        def addrs() -> Optional[List[str]]:
            a = [x for x in self.get("/v1/status").get("listen_addrs", []) if "/tcp/" in x]
            return a or None

        a = wait_until(f"{self.name}'s listen address", addrs, 30)
        first = a[0]
        return first if "/p2p/" in first else f"{first}/p2p/{self.peer_id}"

    def connected_to(self, other: "Agent") -> bool:
        peers = self.get("/v1/peers")["peers"]
        return any(p["peer_id"] == other.peer_id and p.get("gossip_subscribed") for p in peers)
