"""riftmesh: the Python client of the local riftmesh agent.

::

    from riftmesh import Client
    mesh = Client()                 # RIFTMESH_API, else 127.0.0.1:7411
    mesh.publish("TRAINING_COMPLETED", {"config": "hex8_2p"}, source="trainer")

    @mesh.subscribe("TRAINING_*", consumer="evaluator")
    def on_training(event): ...

    mesh.run()

Only the standard library is used. See README.md for the whole interface.
"""

from .aio import AsyncClient, AsyncLock, ErrorCallback
from .client import Client, Handler, Subscription, TimeLike
from .errors import (
    AgentUnavailable,
    ApiError,
    BadRequest,
    BlobFetchError,
    ClientError,
    Conflict,
    LockHeld,
    LockLost,
    NotFound,
    PayloadTooLarge,
    RiftmeshError,
    RiftmeshTimeout,
    ServerError,
    SpoolFull,
    Unauthorized,
    Unavailable,
)
from .event_types import ALIASES, CATEGORIES, DESCRIPTIONS, DataEventType, EventType
from .fold import MemberFact, MemberFold
from .lock import Lock
from .models import (
    Batch,
    BlobAdded,
    BlobInfo,
    ConsumerInfo,
    DeadLetter,
    Event,
    HandlerFailure,
    HistoryPage,
    LeaderInfo,
    LockInfo,
    Member,
    Published,
    Spooled,
    Trace,
)
from .patterns import TypePattern, normalize_pattern, normalize_type
from .spool import FlushResult, Spool

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "AsyncLock",
    "ErrorCallback",
    "HandlerFailure",
    "Handler",
    "Subscription",
    "TimeLike",
    "EventType",
    "DataEventType",
    "ALIASES",
    "CATEGORIES",
    "DESCRIPTIONS",
    "Lock",
    "Event",
    "Published",
    "Spooled",
    "Spool",
    "FlushResult",
    "HistoryPage",
    "Batch",
    "ConsumerInfo",
    "DeadLetter",
    "Trace",
    "Member",
    "MemberFold",
    "MemberFact",
    "LeaderInfo",
    "LockInfo",
    "BlobAdded",
    "BlobInfo",
    "TypePattern",
    "normalize_type",
    "normalize_pattern",
    "RiftmeshError",
    "AgentUnavailable",
    "RiftmeshTimeout",
    "ApiError",
    "ClientError",
    "BadRequest",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "ServerError",
    "Unavailable",
    "LockHeld",
    "LockLost",
    "BlobFetchError",
    "SpoolFull",
]
