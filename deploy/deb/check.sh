#!/usr/bin/env bash
# Checks the Debian package (run as root on Debian; .ci/run runs it after
# deploy/check.sh):
#
#   deploy/deb/check.sh
#
# 1. builds it with deploy/deb/build.sh and checks its contents: binary,
#    unit, conffile, completions, man pages, changelog, dependencies; the
#    packaged unit passes systemd-analyze verify and differs from
#    deploy/riftmesh.service only in ExecStart and Documentation; the
#    Ansible play with riftmesh_package_src, as a dry run for one host,
#    copies the package and neither the binary nor the unit;
# 2. makes a throwaway Debian root (debootstrap --variant=minbase, from the
#    mirror in this machine's apt sources) and, in it, `apt-get install
#    ./riftmesh_*.deb`: user riftmesh, /var/lib/riftmesh 0700, the unit
#    enabled, and postinst saying the agent was not started for want of a
#    swarm key;
# 3. `riftmesh --version`; `riftmesh config check` on the shipped config
#    (refused: no swarm key; valid once a key is made; every commented
#    example in it valid once uncommented);
# 4. the unit's ExecStart, read from the installed unit, run as its User=
#    in its WorkingDirectory, in a private network namespace (the shipped
#    config's own ports): /v1/health must answer on 127.0.0.1 within 30 s,
#    `riftmesh status` must work, SIGTERM must end it with status 0;
# 5. an upgrade over it keeps the edited conffile, the key and the data;
#    remove keeps config, key, data and user; purge deletes the data and the
#    key and keeps the user.
# The root lives under target/ and is deleted at exit. Needs no standard
# input; exits non-zero at the first failure.
set -euo pipefail

DEB_SRC=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$DEB_SRC/../.." && pwd)
START=$SECONDS
STEP=""
exec </dev/null
unset "${!RIFTMESH_@}"

log() { printf '%s\n' "$*"; }
die() { printf 'deb/check.sh: FAILED%s: %s\n' "${STEP:+ at $STEP}" "$*" >&2; exit 1; }
step() {
    [ -z "$STEP" ] || log "ok   $STEP ($((SECONDS - STEP_START)) s)"
    STEP=$1
    STEP_START=$SECONDS
    [ -z "$STEP" ] || log "---- $STEP"
}
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot, namespaces)"
# ansible-playbook and systemd-analyze: deploy/check.sh installs them.

mkdir -p "$REPO/target"
WORK=$(mktemp -d "$REPO/target/deb-check.XXXXXX")
ROOT=$WORK/root
cleanup() {
    local rc=$?
    # Every mount was made in a private mount namespace that is gone by now;
    # --one-file-system keeps rm out of anything still mounted.
    if [ -d "$WORK" ]; then
        if grep -q " $WORK/" /proc/mounts; then
            echo "deb/check.sh: left $WORK (still mounted)" >&2
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    [ "$rc" -eq 0 ] || printf 'deb/check.sh: FAILED%s (exit %s)\n' "${STEP:+ at $STEP}" "$rc" >&2
}
trap cleanup EXIT

# in_root CMD...: run CMD chrooted in $ROOT with a clean environment, /proc
# and /dev mounted in a private mount namespace (they vanish with it).
in_root() {
    # shellcheck disable=SC2016  # expanded by the inner shell
    unshare --mount --propagation private -- /bin/sh -c 'set -e
            root=$1; shift
            mount -t proc proc "$root/proc"
            mount --rbind /dev "$root/dev"
            exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"' \
        in_root "$ROOT" "$@"
}

# --- tools -----------------------------------------------------------------------
step "tools"
if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q --no-install-recommends debootstrap \
        >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get install debootstrap"; }
fi
for t in debootstrap unshare chroot curl ip dpkg-deb cargo systemd-analyze ansible-playbook; do command -v "$t" >/dev/null || die "$t missing"; done
# The Debian mirror this machine's apt uses.
MIRROR=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
[ -n "$MIRROR" ] || MIRROR=$(sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\(http[^[:space:]]*\/debian\)\/\{0,1\}[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
curl -fsS --max-time 20 -o /dev/null "$MIRROR/dists/bookworm/Release" || die "the Debian mirror $MIRROR is not reachable"
log "mirror $MIRROR, $(debootstrap --version)"

# --- 1. build ----------------------------------------------------------------------
step "build the package"
t0=$SECONDS
"$DEB_SRC/build.sh" >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; die "deb/build.sh"; }
DEB=$(tail -n 1 "$WORK/build.log")
[ -f "$DEB" ] || die "build.sh named no package: $DEB"
log "$(basename "$DEB"): $(stat -c %s "$DEB") bytes, built in $((SECONDS - t0)) s"
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/Cargo.toml" | head -n 1)
dpkg-deb --field "$DEB" Package Version Depends >"$WORK/fields"
cat "$WORK/fields"
grep -qx "Version: $VERSION-1" "$WORK/fields" || die "package version is not $VERSION-1"
grep -q '^Depends: .*libc6' "$WORK/fields" || die "no libc6 in Depends"
dpkg-deb --contents "$DEB" | awk '{ print $6 }' | sed 's#^\./#/#' >"$WORK/contents"
for f in /usr/bin/riftmesh /etc/riftmesh/riftmesh.toml /usr/lib/systemd/system/riftmesh.service \
    /usr/share/bash-completion/completions/riftmesh /usr/share/zsh/vendor-completions/_riftmesh \
    /usr/share/fish/vendor_completions.d/riftmesh.fish /usr/share/man/man1/riftmesh.1.gz \
    /usr/share/man/man1/riftmesh-agent.1.gz /usr/share/doc/riftmesh/copyright \
    /usr/share/doc/riftmesh/changelog.Debian.gz; do
    grep -qx "$f" "$WORK/contents" || die "$f is not in the package"
done
mkdir "$WORK/ctl"
dpkg-deb --control "$DEB" "$WORK/ctl"
grep -qx /etc/riftmesh/riftmesh.toml "$WORK/ctl/conffiles" || die "riftmesh.toml is not a conffile"
for s in postinst prerm postrm; do
    [ -x "$WORK/ctl/$s" ] || die "no $s"
    if grep -q '#DEBHELPER#' "$WORK/ctl/$s"; then die "$s still has the #DEBHELPER# token"; fi
done
grep -q 'deb-systemd-helper enable riftmesh.service' "$WORK/ctl/postinst" || die "postinst does not enable the unit"
grep -q 'deb-systemd-invoke stop riftmesh.service' "$WORK/ctl/prerm" || die "prerm does not stop the unit"
# The packaged unit passes systemd-analyze verify as deploy's does (its
# ExecStart pointed at the packaged binary, its man: link at the packaged
# pages), and only ExecStart, Documentation and the header differ from it.
mkdir "$WORK/files"
dpkg-deb --extract "$DEB" "$WORK/files"
PUNIT=$WORK/files/usr/lib/systemd/system/riftmesh.service
extra=$(diff "$REPO/deploy/riftmesh.service" "$PUNIT" | grep '^[<>]' | grep -v '^[<>] #' \
    | grep -v '^[<>] \(ExecStart\|Documentation\)=' || true)
[ -z "$extra" ] || die "the packaged unit differs from deploy/riftmesh.service beyond ExecStart and Documentation: $extra"
mkdir "$WORK/unit"
sed "s#^ExecStart=/usr/bin/riftmesh #ExecStart=$WORK/files/usr/bin/riftmesh #" "$PUNIT" >"$WORK/unit/riftmesh.service"
MANPATH=$WORK/files/usr/share/man systemd-analyze verify "$WORK/unit/riftmesh.service" >"$WORK/verify.out" 2>&1 \
    || { cat "$WORK/verify.out" >&2; die "systemd-analyze verify of the packaged unit"; }
if grep -i 'riftmesh' "$WORK/verify.out"; then die "systemd-analyze verify complained about the packaged unit"; fi

# The Ansible play in package mode, as a dry run on this machine for one
# host (deploy/check.sh runs it without the package): the package is copied,
# the binary and unit are not.
export ANSIBLE_CONFIG=$REPO/deploy/ansible/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_LOCAL_TEMP=$WORK/ansible-tmp
printf '/key/swarm/psk/1.0.0/\n/base16/\n%064d\n' 0 >"$WORK/swarm.key"
(cd "$REPO/deploy/ansible" && ansible-playbook -i inventory.example.yml site.yml --check -c local --limit gpu-07 \
    --skip-tags service -e "riftmesh_package_src=$DEB" -e "riftmesh_swarm_key_src=$WORK/swarm.key") \
    >"$WORK/site-check.out" 2>&1 || { cat "$WORK/site-check.out" >&2; die "site.yml --check with the package"; }
grep -qE '^gpu-07 .*failed=0' "$WORK/site-check.out" || { cat "$WORK/site-check.out" >&2; die "site.yml --check with the package"; }
task_result() { # TASK-NAME: the first result line after that task's header
    awk -v t="TASK [$1]" 'index($0, t) == 1 { found = 1; next } found && /^(ok|changed|skipping):/ { print $1; exit }' "$WORK/site-check.out"
}
[ "$(task_result "Copy the package to the host")" = "changed:" ] || { cat "$WORK/site-check.out" >&2; die "the play does not copy the package"; }
[ "$(task_result "Binary (without the package)")" = "skipping:" ] || die "the play copies the binary with the package"
[ "$(task_result "systemd unit (without the package)")" = "skipping:" ] || die "the play copies the unit with the package"

# --- 2. install into a throwaway root -------------------------------------------------
step "install into a debootstrap root"
t0=$SECONDS
timeout 600 debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
log "debootstrap: $((SECONDS - t0)) s"
t1=$SECONDS
mkdir -p "$ROOT/root/pkg"
cp "$DEB" "$ROOT/root/pkg/"
PKG=/root/pkg/$(basename "$DEB")
# What an operator types (README): apt installs the file and its
# dependencies (all in minbase, so no download here).
in_root apt-get install -y -q --no-install-recommends "$PKG" >"$WORK/install.log" 2>&1 \
    || { cat "$WORK/install.log" >&2; die "apt-get install $PKG"; }
log "apt-get install: $((SECONDS - t1)) s"
sed -n '/^riftmesh: /,$p' "$WORK/install.log"
grep -q '^riftmesh: the agent was NOT started' "$WORK/install.log" \
    || die "postinst did not say that the agent was not started"
grep -q 'swarm key' "$WORK/install.log" || die "postinst did not name the missing swarm key"
pw=$(in_root getent passwd riftmesh) || die "no user riftmesh"
uid=$(echo "$pw" | cut -d: -f3)
[ "$uid" -lt 1000 ] || die "riftmesh is not a system user (uid $uid)"
case $pw in *:/var/lib/riftmesh:/usr/sbin/nologin) ;; *) die "user riftmesh: $pw" ;; esac
gid=$(echo "$pw" | cut -d: -f4)
# Numeric owners: this machine's passwd does not know the root's users.
[ "$(stat -c '%a %u %g' "$ROOT/var/lib/riftmesh")" = "700 $uid $gid" ] \
    || die "/var/lib/riftmesh is $(stat -c '%a %u %g' "$ROOT/var/lib/riftmesh"), not 700 $uid $gid"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/riftmesh.service" ] || die "the unit is not enabled"
# shellcheck disable=SC2016  # a dpkg-query format
in_root dpkg-query --showformat='${Conffiles}\n' --show riftmesh | grep -q '/etc/riftmesh/riftmesh.toml' \
    || die "dpkg does not list the conffile"
[ -s "$ROOT/usr/share/bash-completion/completions/riftmesh" ] || die "bash completion missing"
gzip -dc "$ROOT/usr/share/man/man1/riftmesh.1.gz" | grep -q '^\.TH' || die "riftmesh.1 is not a man page"

# --- 3. the binary and the shipped config -----------------------------------------------
step "riftmesh --version, config check"
v=$(in_root riftmesh --version) || die "riftmesh --version"
[ "$v" = "riftmesh $VERSION" ] || die "riftmesh --version said: $v"
log "$v"
CONF=/etc/riftmesh/riftmesh.toml
if in_root riftmesh config check "$CONF" >"$WORK/cc.out" 2>&1; then
    cat "$WORK/cc.out" >&2; die "config check passed without a swarm key"
fi
grep -q 'swarm key at /etc/riftmesh/swarm.key' "$WORK/cc.out" || { cat "$WORK/cc.out" >&2; die "config check did not name the key"; }
in_root riftmesh keygen --out /etc/riftmesh/swarm.key >/dev/null 2>&1 || die "keygen"
in_root chown riftmesh:riftmesh /etc/riftmesh/swarm.key
[ "$(stat -c %a "$ROOT/etc/riftmesh/swarm.key")" = 600 ] || die "keygen did not write 0600"
in_root setpriv --reuid=riftmesh --regid=riftmesh --init-groups riftmesh config check "$CONF" >"$WORK/cc.out" 2>&1 \
    || { cat "$WORK/cc.out" >&2; die "config check of the shipped config with a key"; }
cat "$WORK/cc.out"
grep -q '^warning .*no bootstrap' "$WORK/cc.out" || die "config check did not warn about the missing bootstrap"
grep -q '^mdns  *off' "$WORK/cc.out" || die "the shipped config has mDNS on"
grep -q '^api  *127\.0\.0\.1:7411  *metrics 127\.0\.0\.1:' "$WORK/cc.out" || die "API or metrics off loopback"
# Every commented example of the shipped file, uncommented, is valid.
sed -E 's/^#(name|bootstrap|voters|tags|\[\[want\]\]|names|place) /\1 /; s/^#\[\[want\]\]$/[[want]]/' \
    "$ROOT$CONF" >"$ROOT/root/pkg/uncommented.toml"
n=$(diff "$ROOT$CONF" "$ROOT/root/pkg/uncommented.toml" | grep -c '^>' || true)
[ "$n" -ge 7 ] || die "only $n commented examples found in $CONF"
in_root riftmesh config check /root/pkg/uncommented.toml >"$WORK/cc2.out" 2>&1 \
    || { cat "$WORK/cc2.out" >&2; die "the commented examples of $CONF are not valid"; }

# --- 4. the unit's ExecStart -------------------------------------------------------------
step "the unit's ExecStart as its user"
UNIT=$ROOT/usr/lib/systemd/system/riftmesh.service
exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
user=$(sed -n 's/^User=//p' "$UNIT")
group=$(sed -n 's/^Group=//p' "$UNIT")
wd=$(sed -n 's/^WorkingDirectory=//p' "$UNIT")
if [ -z "$exec_start" ] || [ -z "$user" ] || [ -z "$group" ] || [ -z "$wd" ]; then
    die "the unit lacks ExecStart, User, Group or WorkingDirectory"
fi
log "ExecStart=$exec_start (User=$user, WorkingDirectory=$wd)"
api=$(sed -n 's/^api = "\(.*\)"$/\1/p' "$ROOT$CONF")
[ -n "$api" ] || die "no api = in $CONF"
# The agent, as the unit would run it: chroot, then its user and directory.
cat >"$ROOT/root/pkg/run-unit.sh" <<RUN
#!/bin/sh
cd "$wd" || exit 90
exec setpriv --reuid=$user --regid=$group --init-groups $exec_start
RUN
chmod +x "$ROOT/root/pkg/run-unit.sh"
# A private network namespace (only loopback) and mount namespace: the agent
# binds the shipped config's own ports, nothing else can collide with them,
# and it dials nobody. curl on this machine's side waits for /v1/health
# (deadline 30 s); the CLI in the root asks `riftmesh status`; SIGTERM must
# end the agent with status 0 within 30 s (the unit's TimeoutStopSec).
cat >"$WORK/run-in-ns.sh" <<'NS'
# ROOT API WORK: run in fresh mount and network namespaces.
set -u
root=$1 api=$2 work=$3
ip link set lo up
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    /root/pkg/run-unit.sh >"$work/agent.log" 2>&1 &
agent=$!
t0=$(date +%s%3N)
deadline=$(( $(date +%s) + 30 ))
up=
while [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$agent" 2>/dev/null; do
    if curl -fsS --max-time 2 "http://$api/v1/health" >"$work/health.json" 2>/dev/null \
        && grep -q "\"ok\":true" "$work/health.json"; then up=1; break; fi
    sleep 0.2
done
if [ -z "$up" ]; then
    if kill -0 "$agent" 2>/dev/null; then
        echo "no healthy /v1/health at $api within 30 s" >"$work/why"
        kill -KILL "$agent"
        wait "$agent"
    else
        wait "$agent"
        echo "the agent exited (status $?) before /v1/health answered at $api" >"$work/why"
    fi
    exit 1
fi
echo "$(( $(date +%s%3N) - t0 ))" >"$work/health.ms"
# The agent (the exec chain ends in it) runs as the unit's user.
awk '/^Uid:/ { print $2 }' "/proc/$agent/status" >"$work/agent.uid"
chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin riftmesh --json status --api "$api" >"$work/status.json" 2>&1 \
    || { { echo "riftmesh status failed:"; cat "$work/status.json"; } >"$work/why"; kill -KILL "$agent"; wait "$agent"; exit 1; }
kill -TERM "$agent"
deadline=$(( $(date +%s) + 30 ))
while kill -0 "$agent" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
if kill -0 "$agent" 2>/dev/null; then echo "still running 30 s after SIGTERM" >"$work/why"; kill -KILL "$agent"; wait "$agent"; exit 1; fi
wait "$agent"
rc=$?
[ "$rc" -eq 0 ] || { echo "exit status $rc after SIGTERM" >"$work/why"; exit 1; }
NS
unshare --mount --propagation private --net -- /bin/sh "$WORK/run-in-ns.sh" "$ROOT" "$api" "$WORK" || { tail -n 20 "$WORK/agent.log" >&2; die "$(cat "$WORK/why" 2>/dev/null || echo "the unit's ExecStart run failed")"; }
log "healthy after $(cat "$WORK/health.ms") ms; riftmesh status: $(tr -d ' \n' <"$WORK/status.json" | head -c 100)…; SIGTERM: exit 0"
grep -q "\"version\": \"$VERSION\"" "$WORK/status.json" || die "riftmesh status: $(head -c 300 "$WORK/status.json")"
[ "$(cat "$WORK/agent.uid")" = "$uid" ] || die "the agent ran as uid $(cat "$WORK/agent.uid"), not riftmesh ($uid)"
[ "$(stat -c %u "$ROOT/var/lib/riftmesh/identity.key")" = "$uid" ] || die "identity.key is not owned by riftmesh"

# --- 5. upgrade, remove, purge -------------------------------------------------------------
step "upgrade, remove, purge"
# An upgrade: the same files as version $VERSION-2 (repacked, fast gzip).
dpkg-deb --raw-extract "$DEB" "$WORK/up"
sed -i "s/^Version: .*/Version: $VERSION-2/" "$WORK/up/DEBIAN/control"
dpkg-deb --root-owner-group -Zgzip -z1 --build "$WORK/up" "$ROOT/root/pkg/riftmesh_up.deb" >/dev/null
rm -rf "$WORK/up"
echo 'name = "edited-by-hand"' >>"$ROOT$CONF"
ident=$(sha256sum <"$ROOT/var/lib/riftmesh/identity.key") || die "the agent left no identity.key"
key=$(sha256sum <"$ROOT/etc/riftmesh/swarm.key")
in_root apt-get install -y -q /root/pkg/riftmesh_up.deb >"$WORK/upgrade.log" 2>&1 \
    || { cat "$WORK/upgrade.log" >&2; die "upgrade"; }
# shellcheck disable=SC2016  # a dpkg-query format
[ "$(in_root dpkg-query --showformat='${Version}' --show riftmesh)" = "$VERSION-2" ] || die "not upgraded"
grep -qx 'name = "edited-by-hand"' "$ROOT$CONF" || die "the upgrade lost the edited conffile"
[ "$(sha256sum <"$ROOT/etc/riftmesh/swarm.key")" = "$key" ] || die "the upgrade changed the swarm key"
[ "$(sha256sum <"$ROOT/var/lib/riftmesh/identity.key")" = "$ident" ] || die "the upgrade changed the identity"
if grep -q 'NOT started' "$WORK/upgrade.log"; then cat "$WORK/upgrade.log" >&2; die "postinst refused a valid config on upgrade"; fi
in_root apt-get remove -y -q riftmesh >"$WORK/remove.log" 2>&1 || { cat "$WORK/remove.log" >&2; die "remove"; }
[ ! -e "$ROOT/usr/bin/riftmesh" ] || die "remove left /usr/bin/riftmesh"
for f in /etc/riftmesh/riftmesh.toml /etc/riftmesh/swarm.key /var/lib/riftmesh/identity.key; do
    [ -e "$ROOT$f" ] || die "remove deleted $f"
done
in_root getent passwd riftmesh >/dev/null || die "remove deleted user riftmesh"
in_root apt-get purge -y -q riftmesh >"$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log" >&2; die "purge"; }
for f in /etc/riftmesh /var/lib/riftmesh /etc/systemd/system/multi-user.target.wants/riftmesh.service; do
    [ ! -e "$ROOT$f" ] || die "purge left $f"
done
in_root getent passwd riftmesh >/dev/null || die "purge deleted user riftmesh"

step ""
log "deb: $(basename "$DEB") ($(( $(stat -c %s "$DEB") / 1024 )) KiB) built, installed, run, upgraded and purged ($((SECONDS - START)) s)"
