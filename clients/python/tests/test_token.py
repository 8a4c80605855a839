"""The API token: an agent whose API is not on loopback answers only requests
carrying its token; both clients send it, given as ``token=`` or read from
the file ``RIFTMESH_API_TOKEN_FILE`` names."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.error
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness import Agent, http_json
from riftmesh import AsyncClient, Client, ClientError, Unauthorized
from riftmesh.router import Router


@pytest.fixture
def exposed(spawn_agent: Callable[..., Agent]) -> Agent:
    """An agent bound to every address (not loopback): it makes its token."""
    a = spawn_agent("py-exposed", api="0.0.0.0:0")
    assert a.token is not None and len(a.token) == 64, a.token
    return a


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("RIFTMESH_API_TOKEN_FILE", raising=False)
    yield monkeypatch


def test_the_agent_refuses_a_request_without_its_token(exposed: Agent) -> None:
    """The check the clients must pass, seen with a bare request."""
    with pytest.raises(urllib.error.HTTPError) as ei:
        http_json(exposed.api, "GET", "/v1/status")
    assert ei.value.code == 401
    # Health stays open, and says only up or not.
    assert http_json(exposed.api, "GET", "/v1/health") == {"ok": True}
    assert http_json(exposed.api, "GET", "/v1/status", token=exposed.token)["peer_id"] == exposed.peer_id


def test_the_sync_client_sends_the_token_given_or_from_the_file(
    exposed: Agent, no_token_env: pytest.MonkeyPatch, tmp_path: Path, uid: str
) -> None:
    assert exposed.token is not None
    # Without: Unauthorized (a ClientError, status 401) naming the fix.
    with pytest.raises(Unauthorized) as ei:
        Client(exposed.api, retry_for=0).status()
    assert ei.value.status == 401 and isinstance(ei.value, ClientError)
    assert "needs a token" in ei.value.message and "RIFTMESH_API_TOKEN_FILE" in ei.value.message
    with pytest.raises(Unauthorized) as ei:
        Client(exposed.api, token="0123456789abcdef-not-it", retry_for=0).status()
    assert "wrong API token" in ei.value.message

    # An upload without it: the agent answers 401 before reading the body
    # and closes; the client reads that answer instead of calling the agent
    # unreachable (a broken pipe while sending).
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    for _ in range(3):
        with pytest.raises(Unauthorized):
            Client(exposed.api, retry_for=0).blob_add(big, name=f"models/refused-{uid.lower()}")

    # token=: every kind of request carries it (JSON, upload, streamed content).
    c = Client(exposed.api, token=exposed.token, retry_for=0)
    assert c.status()["peer_id"] == exposed.peer_id
    r = c.publish(f"TOKEN_{uid}_SYNC", {"n": 1})
    assert not r.duplicate
    blob = tmp_path / "m.bin"
    data = os.urandom(300_000)
    blob.write_bytes(data)
    added = c.blob_add(blob, name=f"models/token-{uid.lower()}")
    assert added.blob == hashlib.sha256(data).hexdigest()
    out = tmp_path / "back.bin"
    c.blob_get(added.blob, out)
    assert out.read_bytes() == data

    # RIFTMESH_API_TOKEN_FILE: the agent's own file.
    no_token_env.setenv("RIFTMESH_API_TOKEN_FILE", str(exposed.dir / "api.token"))
    assert Client(exposed.api, retry_for=0).status()["peer_id"] == exposed.peer_id
    # token= wins over the file.
    with pytest.raises(Unauthorized):
        Client(exposed.api, token="0123456789abcdef-not-it", retry_for=0).status()
    # A named file that cannot be read, or is empty: refused at once, saying which.
    no_token_env.setenv("RIFTMESH_API_TOKEN_FILE", str(tmp_path / "missing.token"))
    with pytest.raises(ValueError, match="RIFTMESH_API_TOKEN_FILE"):
        Client(exposed.api)
    (tmp_path / "empty.token").write_text("\n")
    no_token_env.setenv("RIFTMESH_API_TOKEN_FILE", str(tmp_path / "empty.token"))
    with pytest.raises(ValueError, match="empty"):
        Client(exposed.api)
    with pytest.raises(ValueError, match="one line"):
        Client(exposed.api, token="two words")


def test_the_async_client_and_the_router_send_the_token(
    exposed: Agent, no_token_env: pytest.MonkeyPatch, tmp_path: Path, uid: str
) -> None:
    assert exposed.token is not None
    blob = tmp_path / "a.bin"
    data = os.urandom(200_000)
    blob.write_bytes(data)

    async def main() -> None:
        async with AsyncClient(exposed.api, retry_for=0) as bare:
            with pytest.raises(Unauthorized):
                await bare.status()
        async with AsyncClient(exposed.api, token=exposed.token, retry_for=0) as c:
            assert (await c.status())["peer_id"] == exposed.peer_id
            r = await c.publish(f"TOKEN_{uid}_AIO", {"n": 1})
            assert not r.duplicate
            # The upload runs on a blocking transport in a thread: it has the token too.
            added = await c.blob_add(blob, name=f"models/token-aio-{uid.lower()}")
            assert added.blob == hashlib.sha256(data).hexdigest()
            got = await c.blob_get(added.blob)
            assert got == data
        no_token_env.setenv("RIFTMESH_API_TOKEN_FILE", str(exposed.dir / "api.token"))
        async with AsyncClient(exposed.api, retry_for=0) as c:
            assert (await c.status())["peer_id"] == exposed.peer_id
        no_token_env.delenv("RIFTMESH_API_TOKEN_FILE")

    asyncio.run(main())

    # The router: its own client, and the blocking one fire_and_forget uses
    # outside an event loop (a 401 there would be logged and counted).
    router = Router("token-test", api=exposed.api, token=exposed.token, spool_dir=str(tmp_path / "spool"))
    assert router.fire_and_forget(f"TOKEN_{uid}_FIRE", {"n": 2}) is None
    assert router.fire_errors == 0
    assert router.client.spool.pending() == [], "sent, not spooled"

    async def via_router() -> None:
        assert (await router.client.status())["peer_id"] == exposed.peer_id
        await router.client.aclose()

    asyncio.run(via_router())
    hist = Client(exposed.api, token=exposed.token).history(f"TOKEN_{uid}_FIRE")
    assert [e.payload for e in hist] == [{"n": 2}]
