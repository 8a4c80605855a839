#!/usr/bin/env bash
# Builds the Debian package of riftmesh (see deploy/README.md, "The Debian
# package"):
#
#   deploy/deb/build.sh          # -> target/debian/riftmesh_<version>-1_<arch>.deb
#
# 1. cargo build --release --locked (the binary the tests use);
# 2. from that binary, into target/deb-assets/: the man pages (one per
#    command), bash/zsh/fish completions, and the packaged unit: deploy's
#    riftmesh.service with the package's paths (/usr/bin/riftmesh, the docs
#    in /usr/share/doc/riftmesh);
# 3. cargo deb (cargo-deb, pinned below, installed into target/tools/ if
#    missing), which reads [package.metadata.deb] in Cargo.toml: assets,
#    conffile, deploy/deb/scripts/ (postinst, prerm, postrm) and the unit's
#    enable/start snippets; it strips the binary.
# Prints the path of the .deb as its last line. Needs no standard input.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CARGO_DEB_VERSION=3.8.0
cd "$REPO"
exec </dev/null

die() { echo "deb/build.sh: $*" >&2; exit 1; }

TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET/release/riftmesh
ASSETS=$REPO/target/deb-assets
TOOLS=$REPO/target/tools/cargo-deb-$CARGO_DEB_VERSION

cargo build --release --locked
[ -x "$BIN" ] || die "no binary at $BIN after cargo build"

rm -rf "$ASSETS"
mkdir -p "$ASSETS/completions" "$ASSETS/unit"
"$BIN" man --out-dir "$ASSETS/man"
ls "$ASSETS"/man/riftmesh.1 "$ASSETS"/man/riftmesh-agent.1 >/dev/null || die "man pages missing"
"$BIN" completion bash >"$ASSETS/completions/riftmesh.bash"
"$BIN" completion zsh >"$ASSETS/completions/_riftmesh"
"$BIN" completion fish >"$ASSETS/completions/riftmesh.fish"
for f in "$ASSETS"/completions/*; do [ -s "$f" ] || die "empty completion $f"; done

# The unit: the one in deploy/, with the package's paths.
UNIT_IN=$REPO/deploy/riftmesh.service
UNIT=$ASSETS/unit/riftmesh.service
[ "$(sed -n 1p "$UNIT_IN")" = "# riftmesh agent: one per host. Installed by deploy/install.sh or the Ansible" ] \
    || die "the first line of $UNIT_IN changed: update the header below"
{
    echo "# riftmesh agent: one per host. Installed by the riftmesh Debian package"
    echo "# (deploy/deb/build.sh); see /usr/share/doc/riftmesh/deploy.md."
    sed -e '1,2d' \
        -e 's#^ExecStart=/usr/local/bin/riftmesh #ExecStart=/usr/bin/riftmesh #' \
        -e 's#^Documentation=.*#Documentation=man:riftmesh(1) file:///usr/share/doc/riftmesh/deploy.md#' \
        -e 's#^\# Paths: binary /usr/local/bin/riftmesh,#\# Paths: binary /usr/bin/riftmesh,#' \
        "$UNIT_IN"
} >"$UNIT"
grep -q '^ExecStart=/usr/bin/riftmesh agent --config /etc/riftmesh/riftmesh.toml$' "$UNIT" \
    || die "ExecStart of $UNIT_IN is not the expected one: update the sed above"
if grep -n '/usr/local' "$UNIT"; then die "$UNIT still names /usr/local"; fi

# A changelog entry for this version (dated by the last commit, so the same
# tree gives the same package).
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
MAINTAINER=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
if [ -z "$VERSION" ] || [ -z "$MAINTAINER" ]; then die "no version or maintainer in Cargo.toml"; fi
when=$(git log -1 --format=%ct 2>/dev/null || date +%s)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cat >"$ASSETS/changelog" <<CHANGELOG
riftmesh ($VERSION-1) stable; urgency=medium

  * riftmesh $VERSION, built from commit $commit.

 -- $MAINTAINER  $(LC_ALL=C date -u -R -d "@$when")
CHANGELOG

# cargo-deb, pinned; kept in target/ (nothing installed outside the repo).
CARGO_DEB=$TOOLS/bin/cargo-deb
if ! [ -x "$CARGO_DEB" ]; then
    t0=$SECONDS
    cargo install cargo-deb --locked --version "=$CARGO_DEB_VERSION" --root "$TOOLS" --quiet
    echo "deb/build.sh: installed cargo-deb $CARGO_DEB_VERSION in $((SECONDS - t0)) s"
fi

mkdir -p "$TARGET/debian"
out=$(PATH=$TOOLS/bin:$PATH cargo deb --no-build --locked --strip --output "$TARGET/debian/" | tail -n 1)
[ -f "$out" ] || die "cargo deb reported no package ($out)"
echo "$out"
