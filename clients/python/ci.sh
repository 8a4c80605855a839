#!/usr/bin/env bash
# The Python client's CI: a throwaway venv, `pip install` of the package and
# pytest, then the test suite against real agents started from RIFTMESH_BIN
# (default: the release build of this repository). Exits non-zero on failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RIFTMESH_BIN="${RIFTMESH_BIN:-$here/../../target/release/riftmesh}"
if [[ ! -x "$RIFTMESH_BIN" ]]; then
    echo "ci.sh: no riftmesh binary at $RIFTMESH_BIN (cargo build --release, or set RIFTMESH_BIN)" >&2
    exit 1
fi
RIFTMESH_BIN="$(cd "$(dirname "$RIFTMESH_BIN")" && pwd)/$(basename "$RIFTMESH_BIN")"

python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/riftmesh-pyclient.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
# A copy of the package, so the build leaves nothing in the source tree.
cp -r "$here/pyproject.toml" "$here/README.md" "$here/src" "$work/"
timeout 120 "${pip[@]}" install "$work" "pytest>=7,<9" </dev/null

cd "$here"
# Agents are killed by the fixtures' teardown and, failing that, when pytest dies.
timeout --kill-after=15 240 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider \
    --basetemp="$work/pytest" tests "$@" </dev/null
