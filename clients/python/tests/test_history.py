from __future__ import annotations

import time
from typing import List
from datetime import datetime, timedelta, timezone

from harness import wait_until

from riftmesh import Client, Published


def test_history_by_type_sequence_and_time(client: Client, uid: str) -> None:
    t = f"T{uid}_HIST"
    other = f"T{uid}_NOISE"
    ps: List[Published] = []
    for n in range(5):
        if n == 3:
            # A clean time boundary before n=3 (times have millisecond resolution).
            before = client.event(ps[2].id).received_ms
            wait_until("the clock to move on", lambda: time.time() * 1000 > before + 2, 10, 0.001)
        ps.append(client.publish(t, {"n": n}))
        client.publish(other, {"n": n})

    evs = list(client.history(t))
    assert [e.id for e in evs] == [p.id for p in ps]
    assert all(e.type == t for e in evs)

    # Several patterns, lower-case dotted spelling.
    both = list(client.history([t.lower().replace("_", "."), other]))
    assert len(both) == 10 and [e.seq for e in both] == sorted(e.seq for e in both)

    # After a local sequence number.
    assert [e.payload["n"] for e in client.history(t, after=ps[1].seq)] == [2, 3, 4]

    # Paging: one per page still yields everything, in order; limit caps the total.
    assert [e.id for e in client.history(t, page_size=1)] == [p.id for p in ps]
    assert [e.payload["n"] for e in client.history(t, limit=2)] == [0, 1]

    page = client.history_page(t, after=ps[0].seq, limit=2)
    assert [e.payload["n"] for e in page.events] == [1, 2]
    assert page.next_after == ps[2].seq and page.head >= ps[-1].seq

    # Since a time (when this agent received them): a datetime, a number, a string.
    third = client.event(ps[3].id)
    assert [e.payload["n"] for e in client.history(t, since=third.received)] == [3, 4]
    assert [e.payload["n"] for e in client.history(t, since=third.received_ms / 1000)] == [3, 4]
    assert len(list(client.history(t, since="1h"))) == 5
    assert len(list(client.history(t, since=timedelta(hours=1)))) == 5
    assert list(client.history(t, since=datetime.now(timezone.utc) + timedelta(minutes=5))) == []
    iso = third.received.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert [e.payload["n"] for e in client.history(t, since=iso)] == [3, 4]

    ev = client.event(ps[0].id)
    assert ev.time.tzinfo is not None and abs((ev.time - ev.received).total_seconds()) < 60
