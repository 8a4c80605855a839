from __future__ import annotations

import pytest

from riftmesh import BadRequest, Client, Event, EventType, PayloadTooLarge


def test_publish_returns_id_and_duplicate(client: Client, uid: str) -> None:
    payload = {"config": "hex8_2p", "model_path": f"models/{uid}.pth"}
    first = client.publish("training.completed", payload, source="trainer")
    assert not first.duplicate
    assert first.id and first.seq > 0 and len(first.hash) == 64
    assert first.type == "TRAINING_COMPLETED"  # normalised by the agent
    assert first.idempotency_key and first.age_ms is None and first.duplicate_by is None

    # Every call has its own key: the same content published again is a new fact.
    again = client.publish(EventType.TRAINING_COMPLETED, dict(reversed(list(payload.items()))))
    assert not again.duplicate and again.id != first.id and again.hash == first.hash
    assert again.idempotency_key and again.idempotency_key != first.idempotency_key

    # Without keys, the same type and payload (key order aside) within 30 s is one fact.
    plain = {**payload, "by": "content"}
    c1 = client.publish("TRAINING_COMPLETED", plain, by_content=True)
    c2 = client.publish("training.completed", dict(reversed(list(plain.items()))), by_content=True)
    assert not c1.duplicate and c1.idempotency_key is None
    assert c2.duplicate and c2.duplicate_by == "content" and c2.idempotency_key is None
    assert (c2.id, c2.seq, c2.hash) == (c1.id, c1.seq, c1.hash)
    assert c2.age_ms is not None and 0 <= c2.age_ms < 30_000

    other = client.publish("TRAINING_COMPLETED", {**payload, "attempt": 2})
    assert not other.duplicate and other.id != first.id and other.seq > again.seq

    ev = client.event(first.id)
    assert ev.type == "TRAINING_COMPLETED"
    assert ev.payload == payload
    assert ev.source == "trainer"
    assert ev.seq == first.seq and ev.hash == first.hash
    assert ev.node == client.status()["peer_id"]
    assert ev.idempotency_key == first.idempotency_key
    assert client.event(c1.id).idempotency_key is None


def test_a_keyed_retry_with_another_payload_is_the_first_event(client: Client, uid: str) -> None:
    t = f"T{uid}_KEYED"
    key = f"retry-{uid}"
    first = client.publish(t, {"attempt": 1}, idempotency_key=key)
    assert not first.duplicate and first.idempotency_key == key
    retry = client.publish(t, {"attempt": 2}, idempotency_key=key)
    assert retry.duplicate and retry.id == first.id and retry.seq == first.seq
    assert retry.duplicate_by == "idempotency_key" and retry.idempotency_key == key
    assert retry.age_ms is not None and retry.age_ms >= 0
    # The key is per type: another type with the same key is its own fact.
    elsewhere = client.publish(f"{t}_OTHER", {"attempt": 1}, idempotency_key=key)
    assert not elsewhere.duplicate
    evs = list(client.history(t))
    assert [(e.id, e.payload, e.idempotency_key) for e in evs] == [(first.id, {"attempt": 1}, key)]
    with pytest.raises(ValueError):
        client.publish(t, {}, idempotency_key=key, by_content=True)


def test_batch_publish_in_order_with_duplicates(client: Client, uid: str) -> None:
    t = f"T{uid}_BATCH"
    results = client.publish_batch(
        [
            (t, {"n": 1}),
            {"type": t, "payload": {"n": 2}, "source": "selfplay", "correlation_id": f"run-{uid}"},
            (t, {"n": 1}),
        ],
        by_content=True,
    )
    assert [r.duplicate for r in results] == [False, False, True]
    assert results[2].id == results[0].id and results[2].duplicate_by == "content"
    assert results[0].seq < results[1].seq
    evs = list(client.history(t))
    assert [e.payload["n"] for e in evs] == [1, 2]
    assert evs[1].source == "selfplay" and evs[1].correlation_id == f"run-{uid}"


def test_batch_items_get_their_own_keys(client: Client, uid: str) -> None:
    t = f"T{uid}_BATCHKEYS"
    results = client.publish_batch(
        [(t, {"n": 1}), (t, {"n": 1}), {"type": t, "payload": {"n": 9}, "idempotency_key": f"k-{uid}"}]
    )
    assert [r.duplicate for r in results] == [False, False, False], "equal content, different keys: two facts"
    keys = [r.idempotency_key for r in results]
    assert keys[0] and keys[1] and keys[0] != keys[1] and keys[2] == f"k-{uid}"
    again = client.publish_batch([{"type": t, "payload": {"n": 10}, "idempotency_key": f"k-{uid}"}])
    assert again[0].duplicate and again[0].id == results[2].id and again[0].duplicate_by == "idempotency_key"
    assert [e.idempotency_key for e in client.history(t)] == keys


def test_bad_batch_item_fails_the_whole_batch(client: Client, uid: str) -> None:
    t = f"T{uid}_BADBATCH"
    with pytest.raises(BadRequest) as ei:
        client.publish_batch([(t, {"n": 1}), ("1abc", {"n": 2})])
    assert ei.value.status == 400
    assert "events[1]" in ei.value.message and "1abc" in ei.value.message
    assert list(client.history(t)) == [], "nothing of a refused batch is written"


def test_correlation_and_parent_ids_form_a_trace(client: Client, uid: str) -> None:
    root = client.publish("TRAINING_COMPLETED", {"model": uid}, source="trainer")
    root_ev = client.event(root.id)
    child = client.publish("EVALUATION_COMPLETED", {"model": uid, "elo": 1502.5}, caused_by=root_ev)
    child_ev = client.event(child.id)
    assert child_ev.parent_id == root.id
    assert child_ev.correlation_id == root.id, "the root has no correlation id: its id names the chain"
    grand = client.publish("MODEL_PROMOTED", {"model": uid}, caused_by=child_ev)
    grand_ev = client.event(grand.id)
    assert grand_ev.parent_id == child.id and grand_ev.correlation_id == root.id

    explicit = client.publish(
        "EVALUATION_STARTED", {"model": uid}, correlation_id=f"run-{uid}", parent_id=root.id
    )
    ev = client.event(explicit.id)
    assert (ev.correlation_id, ev.parent_id) == (f"run-{uid}", root.id)

    tr = client.trace(grand.id)
    assert tr.correlation_id == root.id
    by_id = {e.id: depth for depth, e in tr.events}
    assert set(by_id) == {root.id, child.id, grand.id}
    assert by_id[root.id] < by_id[child.id] < by_id[grand.id]


def test_too_large_event_is_refused_with_the_agents_message(client: Client, uid: str) -> None:
    limit = client.status()["max_event_payload_bytes"]
    with pytest.raises(PayloadTooLarge) as ei:
        client.publish(f"T{uid}_BIG", {"blob": "x" * (limit + 10)})
    assert ei.value.status == 413
    assert "send large data as a blob" in ei.value.message


def test_a_promotion_without_a_blob_reference_warns(client: Client, uid: str, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    with caplog.at_level(logging.WARNING, logger="riftmesh"):
        r = client.publish("MODEL_PROMOTED", {"model_id": f"v3-{uid}", "elo": 1850})
    assert not r.duplicate and r.warning and "no blob reference" in r.warning
    assert any("no blob reference" in m for m in caplog.messages)
    assert client.publish("TRAINING_COMPLETED", {"model_id": uid}).warning is None


def test_an_older_agents_event_maps_to_source_and_node() -> None:
    # An agent older than `node` answered the peer id as `source` and the
    # component as `origin`; a current agent answers both names itself.
    base = {"seq": 1, "id": "e-1", "type": "TRAINING_COMPLETED", "payload": {}}
    old = Event.from_json({**base, "source": "12D3KooWpeer", "origin": "trainer"})
    assert (old.source, old.node, old.origin) == ("trainer", "12D3KooWpeer", "trainer")
    new = Event.from_json({**base, "source": "trainer", "node": "12D3KooWpeer", "origin": "trainer"})
    assert (new.source, new.node) == ("trainer", "12D3KooWpeer")
    anonymous = Event.from_json({**base, "source": "", "node": "12D3KooWpeer", "origin": None})
    assert (anonymous.source, anonymous.origin) == ("", None)
