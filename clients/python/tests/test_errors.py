from __future__ import annotations

import socket
import time

import pytest

from harness import Agent
from riftmesh import (
    AgentUnavailable,
    ApiError,
    BadRequest,
    Client,
    ClientError,
    NotFound,
    RiftmeshError,
    RiftmeshTimeout,
)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def test_agent_not_running_names_the_address() -> None:
    addr = f"127.0.0.1:{closed_port()}"
    c = Client(addr, timeout=10, retry_for=0)
    with pytest.raises(AgentUnavailable) as ei:
        c.publish("TRAINING_COMPLETED", {"x": 1})
    assert ei.value.address == addr
    assert addr in str(ei.value)
    assert "riftmesh agent" in str(ei.value)
    assert isinstance(ei.value, ConnectionError) and isinstance(ei.value, RiftmeshError)


def test_a_keyed_publish_is_retried_for_retry_for_and_a_keyless_one_never() -> None:
    addr = f"127.0.0.1:{closed_port()}"
    c = Client(addr, timeout=10, retry_for=0.6)
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable):
        c.publish("TRAINING_COMPLETED", {"x": 1})
    took = time.monotonic() - t0
    assert 0.6 <= took < 5, f"retried for {took:.2f} s, not the client's 0.6 s"
    # A client that would retry for a minute: the per-call value wins, and
    # nothing is retried without a key.
    patient = Client(addr, timeout=10, retry_for=60)
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable):
        patient.publish_batch([("TRAINING_COMPLETED", {"x": 1})], retry_for=0.3)
    assert 0.3 <= time.monotonic() - t0 < 5, "the per-call retry_for wins"
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable):
        patient.publish("TRAINING_COMPLETED", {"x": 1}, by_content=True)
    with pytest.raises(AgentUnavailable):
        patient.publish_batch([("TRAINING_COMPLETED", {"x": 1})], by_content=True)
    assert time.monotonic() - t0 < 5, "without a key nothing is retried"


def test_address_comes_from_riftmesh_api(monkeypatch: pytest.MonkeyPatch) -> None:
    addr = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RIFTMESH_API", addr)
    c = Client()
    assert c.address == addr
    with pytest.raises(AgentUnavailable, match=addr):
        c.health()
    monkeypatch.delenv("RIFTMESH_API")
    assert Client().address == "127.0.0.1:7411"
    assert Client("http://127.0.0.1:7402/").address == "127.0.0.1:7402"
    assert Client("[::1]:7403").address == "[::1]:7403"
    with pytest.raises(ValueError):
        Client("no-port-here")


def test_4xx_carries_the_agents_message(client: Client) -> None:
    with pytest.raises(BadRequest) as ei:
        client.publish("1abc", {})
    e = ei.value
    assert e.status == 400 and isinstance(e, ClientError) and isinstance(e, ApiError)
    assert '"1abc" is not a well-formed name' in e.message
    assert e.message in str(e)

    with pytest.raises(NotFound) as nf:
        client.fetch("no-such-consumer-here")
    assert nf.value.status == 404
    assert 'unknown consumer "no-such-consumer-here"' in nf.value.message

    with pytest.raises(NotFound, match="is retained here"):
        client.event("01a2099e-ad09-756d-99b4-842fe2707750")

    with pytest.raises(BadRequest, match="since"):
        list(client.history(since="not a time"))


def test_timeout_is_reported(client: Client, uid: str) -> None:
    name = f"timeout-{uid}"
    client.create_consumer(name, [f"T{uid}_NEVER"])
    t0 = time.monotonic()
    with pytest.raises(RiftmeshTimeout) as ei:
        client.fetch(name, wait=20, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert ei.value.timeout == 0.5
    assert client.address in str(ei.value) and isinstance(ei.value, TimeoutError)


def test_agent_killed_mid_session(spawn_agent) -> None:  # type: ignore[no-untyped-def]
    a: Agent = spawn_agent("py-gone")
    c = Client(a.api, timeout=10)
    assert c.health()
    a.kill()
    with pytest.raises(AgentUnavailable) as ei:
        c.members()
    assert ei.value.address == a.api
