"""Fixtures: real agents started for the test session, killed at the end."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from harness import Agent, keygen, riftmesh_bin, wait_until
from riftmesh import Client


@pytest.fixture(scope="session")
def bin_path() -> Path:
    p = riftmesh_bin()
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"no riftmesh binary at {p}: build it (cargo build --release) or set RIFTMESH_BIN", pytrace=False)
    return p


@pytest.fixture(scope="session")
def swarm_key(tmp_path_factory: pytest.TempPathFactory, bin_path: Path) -> Path:
    return keygen(tmp_path_factory.mktemp("key") / "swarm.key")


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory, swarm_key: Path) -> Iterator[Agent]:
    """One agent for most tests. It is its own single voter, so locks work."""
    a = Agent(tmp_path_factory.mktemp("agents"), "py-main", swarm_key, config='voters = ["py-main"]\n')
    a.start()
    try:
        yield a
    finally:
        a.kill()


@pytest.fixture
def spawn_agent(tmp_path: Path, swarm_key: Path) -> Iterator[Callable[..., Agent]]:
    """Start agents of this test alone (killed when it ends)."""
    started: List[Agent] = []

    def spawn(name: str, **kw: object) -> Agent:
        a = Agent(tmp_path, name, swarm_key, **kw)  # type: ignore[arg-type]
        started.append(a)
        return a.start()

    try:
        yield spawn
    finally:
        for a in started:
            a.kill()


@pytest.fixture(scope="session")
def mesh2(tmp_path_factory: pytest.TempPathFactory, swarm_key: Path) -> Iterator[List[Agent]]:
    """Two agents; the second bootstraps to the first."""
    root = tmp_path_factory.mktemp("mesh")
    started: List[Agent] = []
    try:
        a = Agent(root, "py-m1", swarm_key)
        started.append(a)
        a.start()
        b = Agent(root, "py-m2", swarm_key, bootstrap=[a.p2p_addr()])
        started.append(b)
        b.start()
        wait_until("the two agents to connect and subscribe to gossip",
                   lambda: a.connected_to(b) and b.connected_to(a), 90)
        yield [a, b]
    finally:
        for x in started:
            x.kill()


@pytest.fixture
def client(agent: Agent) -> Iterator[Client]:
    c = Client(agent.api, timeout=60)
    try:
        yield c
    finally:
        try:
            c.stop(30)
        except Exception:  # noqa: BLE001 - the test already reported it
            pass


@pytest.fixture
def uid() -> str:
    """A unique suffix: payloads and type names differ between tests (dedup is by content)."""
    return uuid.uuid4().hex[:12].upper()
