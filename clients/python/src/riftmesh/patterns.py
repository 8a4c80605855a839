"""Event type names and type patterns, normalised as the agent does (events.md §2).

``training.completed``, ``training_complete`` and ``TRAINING_COMPLETED`` are all
``TRAINING_COMPLETED``; a pattern such as ``training.*`` is ``TRAINING_*``, where
``*`` matches any run of characters and ``?`` exactly one.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Iterable, List, Pattern, Union

from .event_types import ALIASES

__all__ = ["normalize_type", "normalize_pattern", "TypePattern", "type_name"]

MAX_TYPE_LEN = 128

TypeLike = Union[str, Enum]


def type_name(t: TypeLike) -> str:
    """The string of a type given as a string or an :class:`~riftmesh.EventType`."""
    if isinstance(t, Enum):
        return str(t.value)
    if not isinstance(t, str):
        raise TypeError(f"an event type is a str or EventType, not {type(t).__name__}")
    return t


def normalize_type(raw: TypeLike) -> str:
    """The canonical UPPER_SNAKE name of a type; ``ValueError`` if it is malformed."""
    text = type_name(raw)
    s = text.strip()
    if not s or len(s.encode("utf-8")) > MAX_TYPE_LEN or not (s[0].isascii() and s[0].isalpha()):
        raise ValueError(f"bad event type {text!r}")
    out: List[str] = []
    prev_sep = False
    for c in s:
        if c.isascii() and c.isalnum():
            out.append(c.upper())
            prev_sep = False
        elif c in "_.-":
            if prev_sep:
                raise ValueError(f"bad event type {text!r}: two separators in a row")
            out.append("_")
            prev_sep = True
        else:
            raise ValueError(f"bad event type {text!r}: {c!r} is not allowed")
    if prev_sep:
        raise ValueError(f"bad event type {text!r}: trailing separator")
    name = "".join(out)
    return ALIASES.get(name, name)


def normalize_pattern(raw: TypeLike) -> str:
    """A type pattern in the agent's normal form (``training.*`` → ``TRAINING_*``)."""
    text = type_name(raw)
    s = text.strip()
    if not s or len(s.encode("utf-8")) > MAX_TYPE_LEN:
        raise ValueError(f"bad type pattern {text!r}")
    if "*" not in s and "?" not in s:
        return normalize_type(s)
    out: List[str] = []
    for c in s:
        if (c.isascii() and c.isalnum()) or c in "*?":
            out.append(c.upper())
        elif c in "_.-":
            out.append("_")
        else:
            raise ValueError(f"bad type pattern {text!r}: {c!r} is not allowed")
    return "".join(out)


class TypePattern:
    """A normalised type pattern that matches canonical type names."""

    def __init__(self, raw: TypeLike) -> None:
        self.text = normalize_pattern(raw)
        body = "".join(
            ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in self.text
        )
        self._re: Pattern[str] = re.compile(body, re.DOTALL)
        # Catalog names matched through one of their aliases (``cluster.*``
        # matches HOST_ONLINE, alias CLUSTER_NODE_JOINED), as the agent does.
        self._by_alias = frozenset(
            name for alias, name in ALIASES.items()
            if self._re.fullmatch(alias) is not None and self._re.fullmatch(name) is None
        )

    def matches(self, canonical: str) -> bool:
        return self._re.fullmatch(canonical) is not None or canonical in self._by_alias

    def __repr__(self) -> str:
        return f"TypePattern({self.text!r})"


def matches_any(patterns: Iterable[TypePattern], canonical: str) -> bool:
    """True when ``patterns`` is empty or one of them matches."""
    ps = list(patterns)
    return not ps or any(p.matches(canonical) for p in ps)
