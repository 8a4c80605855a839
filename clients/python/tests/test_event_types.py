from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import riftmesh
from harness import HERE, wait_until
from riftmesh import ALIASES, CATEGORIES, Client, EventType, normalize_type

GENERATOR = HERE.parent / "src" / "riftmesh" / "_generate_types.py"
COMMITTED = HERE.parent / "src" / "riftmesh" / "event_types.py"


def load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("riftmesh_generate_types", GENERATOR)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_module_matches_the_binary(bin_path: Path) -> None:
    gen = load_generator()
    expected = gen.render(gen.catalog_from_binary(str(bin_path)))
    assert COMMITTED.read_text(encoding="utf-8") == expected, (
        "src/riftmesh/event_types.py is stale: run "
        "`python clients/python/src/riftmesh/_generate_types.py` and commit it"
    )
    assert gen.main(["--bin", str(bin_path), "--check", "--out", str(COMMITTED)]) == 0


def test_installed_module_is_the_committed_one() -> None:
    installed = Path(sys.modules["riftmesh.event_types"].__file__ or "")
    assert installed.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")
    assert riftmesh.EventType is EventType


def test_enum_names_and_aliases_agree_with_the_agent(client: Client) -> None:
    catalog = {t["name"]: t for t in client.types()}
    assert [e.value for e in EventType] == list(catalog)
    assert EventType.TRAINING_COMPLETED == "TRAINING_COMPLETED"
    assert str(EventType.MODEL_PROMOTED) == "MODEL_PROMOTED"
    assert sum(len(v) for v in CATEGORIES.values()) == len(EventType)
    for alias, name in ALIASES.items():
        assert alias in catalog[name]["aliases"]
        assert normalize_type(alias.lower().replace("_", ".")) == name
    # The agent normalises the same spellings to the same names.
    spellings = [a.lower().replace("_", ".") for a in ALIASES] + [e.value.lower() for e in EventType]
    info = client.create_consumer("enum-check", spellings)
    assert info.types == [normalize_type(s) for s in spellings]


def test_cluster_patterns_match_through_aliases_as_the_agent_does(client: Client) -> None:
    from riftmesh.patterns import TypePattern

    p = TypePattern("cluster.*")
    for name in CATEGORIES["cluster"]:
        assert p.matches(name), name
    assert not p.matches("TRAINING_COMPLETED")
    assert normalize_type("cluster.node_joined") == "HOST_ONLINE"
    # The agent's own HOST_ONLINE is matched by cluster.* there too.
    evs = wait_until(
        "the agent's HOST_ONLINE under cluster.*",
        lambda: [e for e in client.latest("cluster.*", 50) if e.type == "HOST_ONLINE"] or None,
        30,
    )
    assert all(p.matches(e.type) for e in evs)


def test_latest_gives_the_newest_matches_oldest_first(client: Client, uid: str) -> None:
    t = f"CUSTOM_LATEST_{uid}".upper().replace("-", "_")
    for n in range(5):
        client.publish(t, {"n": n})
        client.publish(f"{t}_NOISE", {"n": n})
    for n in range(20):
        client.publish(f"{t}_NOISE", {"n": n + 5})
    got = [e.payload["n"] for e in client.latest(t, 3)]
    assert got == [2, 3, 4]
    assert [e.payload["n"] for e in client.latest(t, 10)] == [0, 1, 2, 3, 4]
