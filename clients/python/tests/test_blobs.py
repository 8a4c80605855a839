from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import List

import pytest

from harness import Agent, wait_until
from riftmesh import BadRequest, Client, Event, EventType, NotFound

DEADLINE = 90.0


def test_blob_add_links_its_naming_event_into_the_run(client: Client, uid: str, tmp_path: Path) -> None:
    trained = client.publish("TRAINING_COMPLETED", {"config": "hex8_2p"}, source="trainer", correlation_id=f"run-{uid}")
    src = tmp_path / "model.pth"
    src.write_bytes(os.urandom(1000) + uid.encode())
    cause = client.event(trained.id)
    added = client.blob_add(src, name=f"models/linked-{uid}", event=EventType.MODEL_PROMOTED, source="promoter", caused_by=cause)
    ev = client.event(added.event_id)
    assert (ev.source, ev.correlation_id, ev.parent_id) == ("promoter", f"run-{uid}", trained.id)
    plain = client.blob_add(src, name=f"models/plain-{uid}")
    ev = client.event(plain.event_id)
    assert (ev.source, ev.correlation_id, ev.parent_id) == ("riftmesh/blob", None, None)
    with pytest.raises(BadRequest, match="correlation_id"):
        client.blob_add(src, name=f"models/long-{uid}", correlation_id="x" * 129)


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
    assert out.read_bytes() == data
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy.pth"], "no temporary file left"
    assert client.blob_info(name).state == "complete"

    # The same content under another name is stored once.
    src.write_bytes(data)
    again = client.blob_add(str(src), name=f"models/alias-{uid}")
    assert again.blob == added.blob and again.stored == "existing" and again.event == "BLOB_PUBLISHED"


def test_blob_errors(client: Client, uid: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=f"unknown-{uid}"):
        client.blob_get(f"games/unknown-{uid}", name_wait=0)
    t0 = time.monotonic()
    with pytest.raises(NotFound):
        client.blob_get(f"games/unknown-{uid}", name_wait=0.5)
    assert time.monotonic() - t0 >= 0.5
    with pytest.raises(BadRequest):
        client.blob_get("../etc/passwd")
    # The client reads the file itself: a missing one is Python's own error.
    with pytest.raises(FileNotFoundError):
        client.blob_add(tmp_path / "missing.bin", name=f"x/{uid}")
    with pytest.raises(ValueError, match="not a regular file"):
        client.blob_add(tmp_path, name=f"x/{uid}")
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
    fetched: List[Path] = []

    # The usual flow: a consumer on the other host gets the naming event and fetches the blob.
    @b.subscribe(EventType.GAME_BATCH_READY, consumer=f"games-{uid}")
    def on_batch(ev: Event) -> None:
        if ev.payload["name"] == name:
            fetched.append(b.blob_get(ev, tmp_path / "fetched.db", timeout=DEADLINE))

    b.start()
    try:
        wait_until("the consumer on b", lambda: b.consumer(f"games-{uid}"), DEADLINE)
        added = a.blob_add(src, name=name, event="GAME_BATCH_READY")
        wait_until("the blob on b", lambda: fetched, DEADLINE)
    finally:
        b.stop()
    assert fetched[0].read_bytes() == data
    assert b.blob_info(added.blob).state == "complete"
    assert b.blob_get(name) == data


def test_blob_forget(client: Client, uid: str, tmp_path: Path) -> None:
    src = tmp_path / "forget.pth"
    src.write_bytes(os.urandom(100_000) + uid.encode())
    name = f"models/forget-{uid}"
    added = client.blob_add(src, name=name, event=EventType.MODEL_PROMOTED)
    r = client.blob_forget(name)
    assert r["name"] == name and r["blob"] == added.blob and r["naming_event_id"] == added.event_id
    assert r["forgotten_ms"] >= r["named_ms"] and r["event"] == "BLOB_FORGOTTEN"
    ev = client.event(r["event_id"])
    assert ev.type == "BLOB_FORGOTTEN" and ev.payload["name"] == name and ev.parent_id == added.event_id
    # Applied on the agent before it answered: the name no longer resolves.
    with pytest.raises(NotFound):
        client.blob_info(name)
    assert name not in [n["name"] for n in client.blobs()["names"]]
    with pytest.raises(NotFound, match="forgotten"):
        client.blob_forget(name)
    with pytest.raises(NotFound, match="never bound"):
        client.blob_forget(f"models/never-{uid}")
    with pytest.raises(BadRequest):
        client.blob_forget("../etc/passwd")
    # Named again: bound again.
    again = client.blob_add(src, name=name)
    assert client.blob_info(name).blob == again.blob == added.blob
