#!/usr/bin/env bash
# render.sh HOST: print the riftmesh.toml of HOST (hosts/HOST.toml, then cluster.toml).
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
host=${1:?usage: render.sh HOST}
[ -f "$dir/hosts/$host.toml" ] || { echo "render.sh: no $dir/hosts/$host.toml" >&2; exit 1; }
if grep -Eq '^[[:space:]]*\[' "$dir/hosts/$host.toml"; then
    echo "render.sh: hosts/$host.toml has a [table]: host files hold top-level keys only" >&2
    exit 1
fi
echo "# riftmesh.toml of $host: rendered from deploy/examples/hosts/$host.toml and cluster.toml"
cat "$dir/hosts/$host.toml"
echo
cat "$dir/cluster.toml"
