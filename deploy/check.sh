#!/usr/bin/env bash
# Checks everything under deploy/ (run as root on Debian; see deploy/README.md):
#
#   deploy/check.sh            # agent binary: $RIFTMESH_BIN, else <repo>/target/release/riftmesh
#
# Installs what it needs from Debian (promtool from `prometheus`, shellcheck,
# ansible-core, python3-yaml, systemd-analyze), then:
#   1. shellcheck of the shell scripts (deb/ too; deb/check.sh checks the package)
#   2. systemd-analyze verify and security of the unit
#   3. install.sh into staging roots: files, modes, owners, enablement,
#      idempotence, an existing config kept, a bad key refused
#   4. ansible-playbook --syntax-check; rendering every host's config;
#      a check-mode run of site.yml on this machine for one host
#   5. promtool check config / check rules / test rules; every alert has a
#      runbook_url naming a section of README.md and a test that fires it
#   6. the Grafana dashboard: valid JSON, every panel with a query and a
#      unit, up to date with build.py
#   7. live metrics: five real agents on 127.0.0.1; every metric and label the
#      rules and the dashboard use is in their /metrics; a Prometheus on
#      127.0.0.1 with the deploy relabelling and rules runs every query and rule
#   8. example configs: the real agent starts with each (examples/, every
#      Ansible-rendered host, install.sh's default) and takes its settings
# Needs no standard input; exits non-zero on the first failure.
set -euo pipefail

DEPLOY=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$DEPLOY/.." && pwd)
BIN=${RIFTMESH_BIN:-$REPO/target/release/riftmesh}
START=$SECONDS
PASSED=0
STEP=""

exec </dev/null
unset "${!RIFTMESH_@}"

log() { printf '%s\n' "$*"; }
die() { printf 'check.sh: FAILED%s: %s\n' "${STEP:+ at $STEP}" "$*" >&2; exit 1; }
step() {
    if [ -n "$STEP" ]; then
        PASSED=$((PASSED + 1))
        log "ok   $STEP ($((SECONDS - STEP_START)) s)"
    fi
    STEP=$1
    STEP_START=$SECONDS
    [ -z "$STEP" ] || log "---- $STEP"
}
[ -x "$BIN" ] || die "no agent binary at $BIN (build it, or set RIFTMESH_BIN)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
WORK=$(mktemp -d /tmp/riftmesh-deploy-check.XXXXXX)
POLICY_RC_CREATED=0
cleanup() {
    [ "$POLICY_RC_CREATED" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
    rm -rf "$WORK"
}
on_exit() {
    local rc=$?
    cleanup
    [ "$rc" -eq 0 ] || printf 'check.sh: FAILED%s (exit %s)\n' "${STEP:+ at $STEP}" "$rc" >&2
}
trap on_exit EXIT

# --- tools -------------------------------------------------------------------------
step "tools"
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v ansible-playbook >/dev/null || need+=(ansible-core)
command -v systemd-analyze >/dev/null || need+=(systemd)
if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then need+=(python3 python3-yaml); fi
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${need[*]} and not root to install them"
    log "installing ${need[*]}"
    # The prometheus package would start a Prometheus service: keep it from
    # starting (policy-rc.d) and disable it afterwards.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >"$WORK/apt.log" 2>&1 \
        || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install ${need[*]}"; }
    if printf '%s\n' "${need[@]}" | grep -qx prometheus; then
        systemctl disable prometheus.service >/dev/null 2>&1 || true
        if [ -d /run/systemd/system ]; then systemctl stop prometheus.service >/dev/null 2>&1 || true; fi
    fi
    if [ "$POLICY_RC_CREATED" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
fi
if ! command -v ansible-playbook >/dev/null; then
    log "ansible-core not in apt: installing it from PyPI"
    /usr/bin/python3 -m pip install -q ansible-core >"$WORK/pip.log" 2>&1 \
        || /usr/bin/python3 -m pip install -q --break-system-packages ansible-core >>"$WORK/pip.log" 2>&1 \
        || { tail -n 20 "$WORK/pip.log" >&2; die "pip install ansible-core"; }
fi
PY=/usr/bin/python3
for t in promtool shellcheck ansible-playbook systemd-analyze; do command -v "$t" >/dev/null || die "$t missing"; done
PROMETHEUS=$(command -v prometheus || true)
[ -n "$PROMETHEUS" ] || die "prometheus (server binary) missing"
log "promtool $(promtool --version 2>&1 | sed -n '1s/^promtool, version \([^ ]*\).*/\1/p'), $(ansible-playbook --version | sed -n 1p), shellcheck $(shellcheck --version | sed -n 's/^version: //p'), $(systemd-analyze --version | sed -n 1p)"
"$BIN" --version

# --- 1. shellcheck ------------------------------------------------------------------
step "shellcheck"
shellcheck "$DEPLOY/install.sh" "$DEPLOY/check.sh" "$DEPLOY/examples/render.sh" "$DEPLOY/tools/boot-test.sh" \
    "$DEPLOY/deb/build.sh" "$DEPLOY/deb/check.sh" "$DEPLOY"/deb/scripts/*

# --- 2. systemd unit ----------------------------------------------------------------
step "systemd-analyze verify"
UNIT=$DEPLOY/riftmesh.service
grep -q '^ExecStart=/usr/local/bin/riftmesh agent --config /etc/riftmesh/riftmesh.toml$' "$UNIT" \
    || die "unexpected ExecStart in $UNIT"
mkdir -p "$WORK/unit"
# verify wants the ExecStart binary to exist: point a copy at the real one.
sed "s#^ExecStart=/usr/local/bin/riftmesh #ExecStart=$BIN #" "$UNIT" >"$WORK/unit/riftmesh.service"
systemd-analyze verify "$WORK/unit/riftmesh.service" >"$WORK/verify.out" 2>&1 || { cat "$WORK/verify.out" >&2; die "verify"; }
if grep -i 'riftmesh' "$WORK/verify.out"; then die "systemd-analyze verify complained about the unit"; fi
# A unit with a mistake must be caught by the same check.
sed 's/^KillMode=mixed$/KillMode=mixed\nNoSuchSetting=1/' "$WORK/unit/riftmesh.service" >"$WORK/unit/bad.service"
systemd-analyze verify "$WORK/unit/bad.service" >"$WORK/verify-bad.out" 2>&1 || true
grep -q 'NoSuchSetting' "$WORK/verify-bad.out" || die "the verify check does not catch an unknown key"
systemd-analyze security --offline=yes --threshold=25 "$WORK/unit/riftmesh.service" >"$WORK/security.out" 2>&1 \
    || { tail -n 25 "$WORK/security.out" >&2; die "exposure above 2.5"; }
grep -o 'Overall exposure level.*' "$WORK/security.out" || true

# --- 3. install.sh --------------------------------------------------------------------
step "install.sh into a staging root"
"$BIN" keygen --out "$WORK/swarm.key" >/dev/null
"$DEPLOY/examples/render.sh" gpu-07 >"$WORK/gpu-07.toml"
R=$WORK/root
mkdir -p "$R"
"$DEPLOY/install.sh" --root "$R" --config "$WORK/gpu-07.toml" --swarm-key - "$BIN" <"$WORK/swarm.key" >"$WORK/install1.out"
cat "$WORK/install1.out"
uid=$(awk -F: '$1 == "riftmesh" { print $3 }' "$R/etc/passwd")
gid=$(awk -F: '$1 == "riftmesh" { print $4 }' "$R/etc/passwd")
if [ -z "$uid" ] || [ -z "$gid" ]; then die "no riftmesh user in $R/etc/passwd"; fi
grep -q '^riftmesh:.*:/var/lib/riftmesh:/usr/sbin/nologin$' "$R/etc/passwd" || die "riftmesh user entry"
expect() { # PATH MODE OWNER
    [ -e "$R$1" ] || die "$1 missing"
    got="$(stat -c '%a %u:%g' "$R$1")"
    [ "$got" = "$2 $3" ] || die "$1: mode/owner $got, expected $2 $3"
}
expect /usr/local/bin/riftmesh 755 0:0
expect /etc/riftmesh 755 0:0
expect /etc/riftmesh/riftmesh.toml 644 0:0
expect /etc/riftmesh/swarm.key 600 "$uid:$gid"
expect /var/lib/riftmesh 700 "$uid:$gid"
expect /etc/systemd/system/riftmesh.service 644 0:0
expect /etc/systemd/system/riftmesh.service.d/writable.conf 644 0:0
expect /data/models 755 "$uid:$gid"
cmp -s "$BIN" "$R/usr/local/bin/riftmesh" || die "binary differs"
cmp -s "$WORK/gpu-07.toml" "$R/etc/riftmesh/riftmesh.toml" || die "config differs"
cmp -s "$WORK/swarm.key" "$R/etc/riftmesh/swarm.key" || die "swarm key differs"
cmp -s "$UNIT" "$R/etc/systemd/system/riftmesh.service" || die "unit differs"
[ "$(readlink "$R/etc/systemd/system/multi-user.target.wants/riftmesh.service")" = /etc/systemd/system/riftmesh.service ] \
    || die "unit not enabled"
for d in /data/models /data/games /data/baselines; do
    grep -qx "ReadWritePaths=$d" "$R/etc/systemd/system/riftmesh.service.d/writable.conf" || die "drop-in lacks $d"
done
# Idempotent: a second run writes nothing.
snapshot() { (cd "$R" && find . -printf '%p %m %u %g %s %T@ %l\n' | sort); }
before=$(snapshot)
"$DEPLOY/install.sh" --root "$R" --config "$WORK/gpu-07.toml" --swarm-key "$WORK/swarm.key" "$BIN" >"$WORK/install2.out"
if grep -E 'installed|created|removed|fixed' "$WORK/install2.out"; then die "second run changed something"; fi
[ "$before" = "$(snapshot)" ] || { diff <(echo "$before") <(snapshot) >&2 || true; die "second run changed files"; }
# Without --config an existing config is kept, even if edited by hand.
echo '# local edit' >>"$R/etc/riftmesh/riftmesh.toml"
"$DEPLOY/install.sh" --root "$R" "$BIN" >"$WORK/install3.out"
grep -q 'keeping existing' "$WORK/install3.out" || die "existing config not reported as kept"
tail -n 1 "$R/etc/riftmesh/riftmesh.toml" | grep -qx '# local edit' || die "existing config overwritten"
# A wrong mode on the key is repaired.
chmod 0644 "$R/etc/riftmesh/swarm.key"
"$DEPLOY/install.sh" --root "$R" "$BIN" >/dev/null
expect /etc/riftmesh/swarm.key 600 "$uid:$gid"
# A malformed key is refused and leaves the old one.
if printf 'not a key\n' | "$DEPLOY/install.sh" --root "$R" --swarm-key - "$BIN" >/dev/null 2>"$WORK/badkey.err"; then
    die "a malformed swarm key was accepted"
fi
grep -q 'swarm key' "$WORK/badkey.err" || die "no message for a malformed key"
cmp -s "$WORK/swarm.key" "$R/etc/riftmesh/swarm.key" || die "old key lost"
# A fresh root without config or key: default config, generated key.
R2=$WORK/root2
mkdir -p "$R2"
"$DEPLOY/install.sh" --root "$R2" --name gpu-99 --generate-key "$BIN" >/dev/null
grep -qx 'name = "gpu-99"' "$R2/etc/riftmesh/riftmesh.toml" || die "default config lacks the name"
sed -n 1p "$R2/etc/riftmesh/swarm.key" | grep -qx '/key/swarm/psk/1.0.0/' || die "generated key"
[ ! -e "$R2/etc/systemd/system/riftmesh.service.d/writable.conf" ] || die "drop-in without writable dirs"
# No key at all is an error.
mkdir -p "$WORK/root3"
if "$DEPLOY/install.sh" --root "$WORK/root3" "$BIN" >/dev/null 2>&1; then die "installed without a swarm key"; fi

# --- 4. Ansible -----------------------------------------------------------------------
step "ansible"
cd "$DEPLOY/ansible"
export ANSIBLE_CONFIG=$DEPLOY/ansible/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_LOCAL_TEMP=$WORK/ansible-tmp
ansible-playbook -i inventory.example.yml site.yml --syntax-check
ansible-playbook -i inventory.example.yml render.yml --syntax-check
mkdir -p "$WORK/rendered"
ansible-playbook -i inventory.example.yml render.yml -e "out_dir=$WORK/rendered" >"$WORK/render.out" \
    || { cat "$WORK/render.out" >&2; die "render.yml"; }
"$PY" - "$WORK/rendered" <<'EOF'
import json, os, sys
d = sys.argv[1]
files = json.load(open(os.path.join(d, "rendered.json")))
for name, text in files.items():
    with open(os.path.join(d, name), "w") as f:
        f.write(text)
hosts = [n for n in files if n.endswith(".toml")]
assert len(hosts) >= 20, hosts
print(f"rendered {len(hosts)} host configs, writable.conf, targets.yml")
EOF
grep -qx 'ReadWritePaths=/data/models' "$WORK/rendered/writable.conf" || die "rendered drop-in"
# Dry run of the real playbook for one host on this machine: every task up to
# the service ones, in check mode (nothing is changed here).
ansible-playbook -i inventory.example.yml site.yml --check -c local --limit gpu-07 --skip-tags service \
    -e "riftmesh_binary_src=$BIN" -e "riftmesh_swarm_key_src=$WORK/swarm.key" >"$WORK/site-check.out" \
    || { cat "$WORK/site-check.out" >&2; die "site.yml --check"; }
grep -E '^gpu-07 .*failed=0' "$WORK/site-check.out" || { cat "$WORK/site-check.out" >&2; die "site.yml --check"; }
cd "$REPO"

# --- 5. Prometheus ----------------------------------------------------------------------
step "promtool"
P=$DEPLOY/prometheus
mkdir -p "$WORK/prom"
cp "$P/riftmesh-rules.yml" "$WORK/prom/"
# The deploy config, with file_sd pointing at the example targets and at the
# targets file Ansible rendered, so promtool checks those files too.
mkdir -p "$WORK/prom/targets"
cp "$P/targets/riftmesh.yml" "$WORK/prom/targets/example.yml"
cp "$WORK/rendered/targets.yml" "$WORK/prom/targets/ansible.yml"
sed "s#- /etc/prometheus/riftmesh-targets/\*.yml#- $WORK/prom/targets/*.yml#" "$P/prometheus.yml" >"$WORK/prom/prometheus.yml"
grep -q "$WORK/prom/targets" "$WORK/prom/prometheus.yml" || die "file_sd path not found in prometheus.yml"
promtool check config "$WORK/prom/prometheus.yml" 2>&1 | tee "$WORK/promtool-config.out"
if grep -q WARNING "$WORK/promtool-config.out"; then die "promtool warnings"; fi
promtool check config "$P/prometheus.yml" >/dev/null 2>&1 || die "the shipped prometheus.yml"
promtool check rules "$P/riftmesh-rules.yml"
(cd "$P/tests" && promtool test rules riftmesh-rules.test.yml)
# Every alert: a runbook_url naming a section of deploy/README.md, and at
# least one unit test that expects it to fire.
"$PY" - "$P/riftmesh-rules.yml" "$P/tests/riftmesh-rules.test.yml" "$DEPLOY/README.md" <<'EOF2'
import re, sys, yaml
rules, tests, readme = sys.argv[1:4]
alerts = [r for g in yaml.safe_load(open(rules))["groups"] for r in g["rules"] if "alert" in r]
heads = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
         for h in re.findall(r"^#+ (.*)$", open(readme).read(), re.M)}
fired = {a["alertname"] for t in yaml.safe_load(open(tests))["tests"]
         for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
bad = []
for r in alerts:
    url = r.get("annotations", {}).get("runbook_url", "")
    m = re.fullmatch(r"deploy/README\.md#([a-z0-9_-]+)", url)
    if not m or m.group(1) not in heads:
        bad.append(f"{r['alert']}: runbook_url {url!r} names no section of deploy/README.md")
    if r["alert"] not in fired:
        bad.append(f"{r['alert']}: no test in riftmesh-rules.test.yml expects it to fire")
if bad:
    sys.exit("\n".join(bad))
print(f"{len(alerts)} alerts: each has a runbook section and a firing test")
EOF2

# --- 6. Grafana dashboard -----------------------------------------------------------------
step "dashboard"
"$PY" - "$DEPLOY/grafana/riftmesh.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ids, n = set(), 0
def walk(ps):
    global n
    for p in ps:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        if p["type"] != "row":
            n += 1
            assert p.get("targets"), f"panel {p['title']} has no query"
            unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
            assert isinstance(unit, str) and unit.strip(), \
                f"panel {p['title']} has no unit (fieldConfig.defaults.unit: bytes, s, percentunit, ops, short...)"
            for t in p["targets"]:
                assert t["expr"].strip() and 'job="riftmesh"' in t["expr"], f"{p['title']}: {t['expr']}"
        walk(p.get("panels", []))
walk(d["panels"])
assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
print(f"{n} panels, {len(d['templating']['list'])} variables")
EOF
"$PY" "$DEPLOY/grafana/build.py" --check

# --- 7. live metrics ------------------------------------------------------------------------
step "metric names and queries against real agents"
"$PY" "$DEPLOY/tools/livecheck.py" --time-limit 180 metrics --bin "$BIN" --work "$WORK/live" \
    --rules "$P/riftmesh-rules.yml" --dashboard "$DEPLOY/grafana/riftmesh.json" \
    --prom-config "$P/prometheus.yml" --prometheus "$PROMETHEUS" --metrics-rs "$REPO/src/metrics.rs"

# --- 8. example configs ------------------------------------------------------------------------
step "example configs on the real agent"
mkdir -p "$WORK/examples"
for f in "$DEPLOY"/examples/hosts/*.toml; do
    h=$(basename "$f" .toml)
    "$DEPLOY/examples/render.sh" "$h" >"$WORK/examples/$h.toml"
done
cp "$R2/etc/riftmesh/riftmesh.toml" "$WORK/examples/install-default.toml"
"$PY" "$DEPLOY/tools/livecheck.py" --time-limit 180 configs --bin "$BIN" --work "$WORK/cfg" \
    "$WORK"/examples/*.toml "$WORK"/rendered/*.toml

step ""
log "deploy: $PASSED passed, 0 failed ($((SECONDS - START)) s)"
