from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List

import pytest

from harness import Agent, wait_until
from riftmesh import BadRequest, Client, EventType, NotFound

DEADLINE = 90.0


def test_blob_add_and_get(client: Client, uid: str, tmp_path: Path) -> None:
    data = os.urandom(300_000) + uid.encode()
    src = tmp_path / "model.pth"
    src.write_bytes(data)
    name = f"models/test-{uid}"
    added = client.blob_add(src, name=name, event=EventType.MODEL_PROMOTED)
    assert added.blob == hashlib.sha256(data).hexdigest()
    assert added.size == len(data) and added.name == name and added.stored == "new"
    assert added.event == "MODEL_PROMOTED" and added.event_id

    ev = client.event(added.event_id)
    assert ev.type == "MODEL_PROMOTED"
    assert ev.payload["name"] == name and ev.payload["blob"] == added.blob

    src.unlink()  # the agent keeps its own copy
    assert client.blob_get(name) == data
    out = client.blob_get(added.blob, tmp_path / "out" / "copy.pth")
    assert Path(out).read_bytes() == data
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy.pth"], "no temporary file left"
    assert client.blob_info(name).state == "complete"

    # The same content under another name is stored once.
    src.write_bytes(data)
    again = client.blob_add(str(src), name=f"models/alias-{uid}")
    assert again.blob == added.blob and again.stored == "existing" and again.event == "BLOB_PUBLISHED"


def test_blob_errors(client: Client, uid: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=f"unknown-{uid}"):
        client.blob_get(f"games/unknown-{uid}")
    with pytest.raises(BadRequest):
        client.blob_get("../etc/passwd")
    with pytest.raises(BadRequest, match="cannot open"):
        client.blob_add(tmp_path / "missing.bin", name=f"x/{uid}")
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    with pytest.raises(BadRequest, match="does not name blobs"):
        client.blob_add(f, name=f"x/{uid}", event="TRAINING_COMPLETED")


def test_blob_fetched_from_another_agent(mesh2: List[Agent], uid: str, tmp_path: Path) -> None:
    a, b = (Client(x.api, timeout=60) for x in mesh2)
    data = os.urandom(2_500_000) + uid.encode()  # several chunks
    src = tmp_path / "games.db"
    src.write_bytes(data)
    name = f"games/hex8_2p/batch-{uid}"
    added = a.blob_add(src, name=name, event="GAME_BATCH_READY")
    # b learns the name from the signed naming event, then fetches the chunks from a.
    wait_until("the naming event on b", lambda: any(e.id == added.event_id for e in b.history("GAME_BATCH_READY")), DEADLINE)
    out = b.blob_get(name, tmp_path / "fetched.db", timeout=DEADLINE)
    assert Path(out).read_bytes() == data
    assert b.blob_info(added.blob).state == "complete"
