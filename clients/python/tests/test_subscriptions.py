from __future__ import annotations

import asyncio
from typing import List

from harness import Agent, wait_until
from riftmesh import Client
from riftmesh.aio import AsyncClient

DEADLINE = 60.0


def test_subscription_counts_across_the_cluster(mesh2: List[Agent], uid: str) -> None:
    a, b = mesh2
    ca, cb = Client(a.api, timeout=60), Client(b.api, timeout=60)
    pattern = f"SUBS_{uid}_*"
    cb.create_consumer(f"subs-{uid}-1", pattern)
    cb.create_consumer(f"subs-{uid}-2", pattern)
    ca.create_consumer(f"subs-{uid}-3", pattern)
    try:
        wait_until("b's consumers counted on a",
                   lambda: ca.subscription_counts().get(pattern) == 3, DEADLINE)
        assert ca.subscription_counts(by_host=True)[pattern] == {a.name: 1, b.name: 2}
        assert ca.subscription_counts(cluster=False)[pattern] == 1

        async def aio() -> int:
            async with AsyncClient(a.api) as c:
                return (await c.subscription_counts())[pattern]

        assert asyncio.run(aio()) == 3
    finally:
        for c, n in ((cb, 1), (cb, 2), (ca, 3)):
            c.delete_consumer(f"subs-{uid}-{n}")
