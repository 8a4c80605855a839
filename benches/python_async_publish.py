#!/usr/bin/env python3
"""Publish throughput: the Python AsyncClient against wrk, on one agent in one run.

    RIFTMESH_BIN=target/release/riftmesh python3 benches/python_async_publish.py [--seconds 10] [--rounds 2]

Starts one `riftmesh agent` on loopback (temporary data directory, ports
chosen by the OS), then alternates, --rounds times:

- wrk: `wrk -t2 -c32 -d<seconds>s` POSTing /v1/events, a Lua script giving
  every request its own JSON body (unique payloads: the agent deduplicates by
  content, and a duplicate is not a write);
- python: one asyncio task keeping 32 `await client.publish(...)` in flight
  for <seconds> (riftmesh.AsyncClient, stdlib keep-alive pool), unique
  payloads too;
- with --compare aiohttp httpx: the same loop on a bare aiohttp / httpx
  session POSTing the same bodies (the alternatives to the stdlib pool).

Prints events/s for each run and the ratio of the best Python run to the best
wrk run (target: at least 0.60). Needs `wrk` (Debian: apt-get install wrk)
and the riftmesh Python client importable (pip install ./clients/python, or
it is taken from clients/python/src). Sends traffic to 127.0.0.1 only; every
loop is bounded by --seconds. Not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))

from riftmesh import AsyncClient  # noqa: E402

LUA = r"""
local counter = 0
local threads = 0
local prefix = ""

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  prefix = args[1] .. "-" .. tostring(tid)
end

function request()
  counter = counter + 1
  local body = '{"type":"BENCH_WRK","payload":{"run":"' .. prefix .. '","n":' .. counter .. '}}'
  return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, body)
end
"""


def start_agent(binary: str, root: Path) -> "tuple[subprocess.Popen[bytes], str]":
    key = root / "swarm.key"
    subprocess.run([binary, "keygen", "--out", str(key)], check=True, capture_output=True, timeout=60)
    data = root / "agent"
    data.mkdir()
    log = open(root / "agent.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIFTMESH_")}
    proc = subprocess.Popen(
        [binary, "agent", "--name", "bench", "--data-dir", str(data), "--listen", "/ip4/127.0.0.1/tcp/0",
         "--api", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--no-mdns", "--swarm-key", str(key)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agent exited with {proc.returncode}; see {root / 'agent.log'}")
        try:
            info = json.loads((data / "agent.json").read_text())
            if info.get("pid") == proc.pid:
                return proc, str(info["api"])
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("agent did not start within 90 s")


def run_wrk(wrk: str, api: str, seconds: float, connections: int, script: Path) -> Dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    out = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script),
         f"http://{api}/v1/events", "--", run_id],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    ).stdout
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    return {
        "rate": float(m.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else "",
        "p50": p50.group(1) if p50 else "?",
        "p99": p99.group(1) if p99 else "?",
    }


class Publisher:
    """What the Python runs publish with: riftmesh.AsyncClient, or for comparison
    a bare aiohttp or httpx session doing the same POST /v1/events."""

    def __init__(self, kind: str, api: str, inflight: int) -> None:
        self.kind = kind
        self.api = api
        self.url = f"http://{api}/v1/events"
        self.client: Any = None
        if kind == "riftmesh":
            self.client = AsyncClient(api, max_connections=inflight)
        elif kind == "aiohttp":
            import aiohttp

            self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight))
        elif kind == "httpx":
            import httpx

            self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=inflight), trust_env=False)
        else:
            raise ValueError(kind)

    async def publish(self, payload: Dict[str, Any]) -> bool:
        """Publish; True if the agent took it as new."""
        if self.kind == "riftmesh":
            return not (await self.client.publish("BENCH_PY", payload)).duplicate
        body = {"type": "BENCH_PY", "payload": payload}
        if self.kind == "aiohttp":
            async with self.client.post(self.url, json=body) as r:
                r.raise_for_status()
                return not (await r.json())["duplicate"]
        r = await self.client.post(self.url, json=body)
        r.raise_for_status()
        return not r.json()["duplicate"]

    def connections(self) -> Any:
        return self.client._http.connections_opened if self.kind == "riftmesh" else "-"

    async def close(self) -> None:
        if self.kind == "riftmesh":
            await self.client.aclose()
        elif self.kind == "aiohttp":
            await self.client.close()
        else:
            await self.client.aclose()


async def run_python(api: str, seconds: float, inflight: int, kind: str = "riftmesh") -> Dict[str, Any]:
    """One task keeps `inflight` publishes in flight until `seconds` have passed."""
    client = Publisher(kind, api, inflight)
    run_id = uuid.uuid4().hex[:12]
    # Warm the pool so the timed part measures steady state, as wrk's does.
    await asyncio.gather(*(client.publish({"run": run_id, "warm": i}) for i in range(inflight)))
    n = 0
    done = 0
    lat: List[float] = []
    pending: Set["asyncio.Task[Any]"] = set()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    end = t0 + seconds

    async def one(i: int) -> float:
        s = time.monotonic()
        if not await client.publish({"run": run_id, "n": i}):
            raise RuntimeError("a bench payload was a duplicate")
        return time.monotonic() - s

    # This task starts a publish whenever fewer than `inflight` are under way.
    slots = asyncio.Semaphore(inflight)
    loop = asyncio.get_running_loop()
    errors: List[BaseException] = []

    def finished(t: "asyncio.Task[float]") -> None:
        nonlocal done
        slots.release()
        pending.discard(t)
        if t.cancelled() or t.exception() is not None:
            errors.append(t.exception() or RuntimeError("cancelled"))
        else:
            lat.append(t.result())
            done += 1

    while time.monotonic() < end and not errors:
        await slots.acquire()
        t = loop.create_task(one(n))
        n += 1
        pending.add(t)
        t.add_done_callback(finished)
    if pending:
        await asyncio.wait(set(pending))
    if errors:
        raise errors[0]
    took = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await client.close()
    lat.sort()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "rate": done / took,
        "events": done,
        "connections": client.connections(),
        "p50": f"{lat[len(lat) // 2] * 1000:.2f}ms",
        "p99": f"{lat[int(len(lat) * 0.99)] * 1000:.2f}ms",
        "cpu_per_event_us": cpu / max(1, done) * 1e6,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default=os.environ.get("RIFTMESH_BIN") or str(REPO / "target" / "release" / "riftmesh"))
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--inflight", type=int, default=32, help="publishes in flight (Python) and wrk connections")
    p.add_argument(
        "--compare", nargs="*", default=[], choices=["aiohttp", "httpx"],
        help="also run the same loop on these libraries (if installed), for the choice of HTTP layer",
    )
    args = p.parse_args(argv)
    if not shutil.which(args.wrk):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    root = Path(tempfile.mkdtemp(prefix="riftmesh-pybench."))
    script = root / "publish.lua"
    script.write_text(LUA)
    proc, api = start_agent(args.bin, root)
    rows: List[Dict[str, Any]] = []
    try:
        print(f"agent {args.bin} at {api}; {args.rounds} round(s) of {args.seconds:g} s, {args.inflight} in flight", flush=True)
        for r in range(args.rounds):
            w = run_wrk(args.wrk, api, args.seconds, args.inflight, script)
            w.update(kind="wrk", round=r + 1)
            rows.append(w)
            print(f"round {r + 1} wrk    {w['rate']:9.0f} events/s  p50 {w['p50']}  p99 {w['p99']}  non-2xx {w['non2xx']} {w['socket_errors']}", flush=True)
            for lib in ["riftmesh"] + list(args.compare):
                py = asyncio.run(run_python(api, args.seconds, args.inflight, lib))
                py.update(kind="python" if lib == "riftmesh" else lib, round=r + 1)
                rows.append(py)
                label = "python" if lib == "riftmesh" else lib
                print(
                    f"round {r + 1} {label:6} {py['rate']:9.0f} events/s  p50 {py['p50']}  p99 {py['p99']}  "
                    f"connections {py['connections']}  client CPU {py['cpu_per_event_us']:.0f} us/event",
                    flush=True,
                )
    finally:
        proc.kill()
        proc.wait(timeout=30)
    for r in range(args.rounds):
        w = next(x["rate"] for x in rows if x["kind"] == "wrk" and x["round"] == r + 1)
        py_rate = next(x["rate"] for x in rows if x["kind"] == "python" and x["round"] == r + 1)
        print(f"round {r + 1}: python at {py_rate / w:.0%} of wrk")
    best_wrk = max(x["rate"] for x in rows if x["kind"] == "wrk")
    best_py = max(x["rate"] for x in rows if x["kind"] == "python")
    ratio = best_py / best_wrk
    print(f"best: python {best_py:.0f} events/s, wrk {best_wrk:.0f} events/s: {ratio:.0%} of wrk (target 60 %)")
    for lib in args.compare:
        best = max(x["rate"] for x in rows if x["kind"] == lib)
        print(f"best: {lib} {best:.0f} events/s: {best / best_wrk:.0%} of wrk")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if ratio >= 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
