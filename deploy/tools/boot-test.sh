#!/usr/bin/env bash
# Opt-in test of install.sh and the unit under a real systemd (not part of
# check.sh: it needs debootstrap, systemd-nspawn and ~2 minutes).
#
#   deploy/tools/boot-test.sh [BINARY]     # default: $RIFTMESH_BIN, else target/release/riftmesh
#
# Builds a minimal Debian bookworm root with debootstrap, boots it with
# systemd-nspawn (sharing this machine's network; the agent listens on
# 127.0.0.1 only and dials nobody), and inside it: runs install.sh for real,
# then checks that the hardened unit runs the agent (health, leader, a blob
# placed under ProtectSystem=strict through the drop-in), that a second
# install.sh changes nothing, that kill -9 is restarted, that systemctl stop
# is a clean graceful leave (exit 0) and that `riftmesh leave` is not
# restarted. Everything is removed afterwards.
set -euo pipefail

DEPLOY=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-${RIFTMESH_BIN:-$DEPLOY/../target/release/riftmesh}}
[ -x "$BIN" ] || { echo "boot-test.sh: no binary at $BIN" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "boot-test.sh: run as root" >&2; exit 1; }
exec </dev/null

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

ROOT=$(mktemp -d /var/tmp/riftmesh-boot.XXXXXX)
chmod 0755 "$ROOT"   # it becomes the container's /
NSPAWN_PID=
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill "$NSPAWN_PID" 2>/dev/null || true
        sleep 2
        kill -9 "$NSPAWN_PID" 2>/dev/null || true
    fi
    if ! mount | grep -q " $ROOT/"; then rm -rf --one-file-system "$ROOT"; else echo "left $ROOT (still mounted)" >&2; fi
}
trap cleanup EXIT

echo "debootstrap into $ROOT"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl bookworm "$ROOT" \
    http://deb.debian.org/debian >"$ROOT.debootstrap.log" 2>&1 \
    || { tail -n 20 "$ROOT.debootstrap.log" >&2; exit 1; }
rm -f "$ROOT.debootstrap.log"
echo riftmesh-boot-test >"$ROOT/etc/hostname"
mkdir -p "$ROOT/root/rm"
cp -a "$DEPLOY" "$ROOT/root/rm/deploy"
cp "$BIN" "$ROOT/root/rm/riftmesh"
"$BIN" keygen --out "$ROOT/root/rm/swarm.key" >/dev/null 2>&1
cat >"$ROOT/root/rm/test.toml" <<'EOF'
name = "boot1"
data_dir = "/var/lib/riftmesh"
swarm_key = "/etc/riftmesh/swarm.key"
listen = ["/ip4/127.0.0.1/tcp/4791"]
api = "127.0.0.1:7791"
metrics = "127.0.0.1:9791"
mdns = false
voters = ["boot1"]
tags = { role = "training" }
[[want]]
names = "models/*"
place = "/data/models/{name}.pth"
EOF
cat >"$ROOT/root/rm/inside.sh" <<'EOF'
#!/bin/bash
set -euo pipefail
export RIFTMESH_API=127.0.0.1:7791
cd /root/rm
fail() {
    echo "FAIL: $*" >&2
    systemctl status riftmesh --no-pager >&2 || true
    journalctl -u riftmesh --no-pager -n 30 >&2 || true
    exit 1
}
wait_health() { for _ in $(seq 1 50); do curl -sf "http://$RIFTMESH_API/v1/health" >/dev/null && return 0; sleep 0.2; done; return 1; }
./deploy/install.sh --config test.toml --swarm-key - ./riftmesh <swarm.key || fail "install.sh"
wait_health || fail "no /v1/health after install"
systemctl is-enabled --quiet riftmesh || fail "not enabled"
[ "$(stat -c '%a %U' /etc/riftmesh/swarm.key)" = "600 riftmesh" ] || fail "swarm key mode"
for _ in $(seq 1 50); do curl -s "http://$RIFTMESH_API/v1/leader" | grep -q '"leader":"boot1"' && break; sleep 0.2; done
curl -s "http://$RIFTMESH_API/v1/leader" | grep -q '"leader":"boot1"' || fail "no leader"
echo "ok: agent running under the hardened unit, leader known"
head -c 3000000 /dev/urandom >/srv/model.bin
chmod 0644 /srv/model.bin
riftmesh blob add /srv/model.bin --name models/m1 >/dev/null
for _ in $(seq 1 50); do [ -f /data/models/m1.pth ] && break; sleep 0.2; done
[ "$(stat -c '%a %U' /data/models/m1.pth)" = "644 riftmesh" ] || fail "blob not placed in /data/models"
cmp -s /srv/model.bin /data/models/m1.pth || fail "placed file differs"
echo "ok: blob placed in /data/models (ReadWritePaths drop-in, UMask 0022)"
./deploy/install.sh --config test.toml ./riftmesh | grep -q 'unchanged; agent left running' || fail "second install changed something"
echo "ok: second install.sh left the agent running"
pid=$(systemctl show -p MainPID --value riftmesh)
kill -9 "$pid"
sleep 7
wait_health || fail "not restarted after kill -9"
[ "$(systemctl show -p NRestarts --value riftmesh)" = 1 ] || fail "NRestarts"
echo "ok: restarted after kill -9"
start=$(date +%s%N)
systemctl stop riftmesh
ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$(systemctl show -p Result --value riftmesh)" = success ] || fail "stop result"
[ "$(systemctl show -p ExecMainStatus --value riftmesh)" = 0 ] || fail "stop exit status"
journalctl -u riftmesh --no-pager | grep -q 'left the cluster' || fail "no graceful leave on stop"
echo "ok: systemctl stop = graceful leave, exit 0, ${ms} ms"
systemctl start riftmesh
wait_health || fail "no health after start"
restarts=$(systemctl show -p NRestarts --value riftmesh)
riftmesh leave >/dev/null
sleep 7
[ "$(systemctl show -p ActiveState --value riftmesh)" = inactive ] || fail "running again after riftmesh leave"
[ "$(systemctl show -p NRestarts --value riftmesh)" = "$restarts" ] || fail "restarted after riftmesh leave"
echo "ok: riftmesh leave stops the agent for good"
systemd-analyze security riftmesh | tail -n 1
EOF
chmod +x "$ROOT/root/rm/inside.sh"

echo "booting the container"
timeout 600 systemd-nspawn -D "$ROOT" --boot --register=no --keep-unit --console=pipe >"$ROOT.nspawn.log" 2>&1 &
NSPAWN_PID=$!
inner=
for _ in $(seq 1 100); do
    inner=$(pgrep -P "$(pgrep -P "$NSPAWN_PID" -x systemd-nspawn || echo "$NSPAWN_PID")" -x systemd || true)
    if [ -n "$inner" ]; then
        state=$(nsenter -t "$inner" -a /bin/systemctl is-system-running 2>/dev/null || true)
        case $state in running | degraded) break ;; esac
    fi
    sleep 0.3
done
[ -n "$inner" ] || { cat "$ROOT.nspawn.log" >&2; rm -f "$ROOT.nspawn.log"; exit 1; }
rc=0
nsenter -t "$inner" -a /root/rm/inside.sh || rc=$?
nsenter -t "$inner" -a /bin/systemctl poweroff || true
for _ in $(seq 1 50); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
rm -f "$ROOT.nspawn.log"
if [ "$rc" -eq 0 ]; then echo "boot-test: passed"; else echo "boot-test: FAILED" >&2; fi
exit "$rc"
