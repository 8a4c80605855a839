#!/usr/bin/env bash
# Install or update riftmesh on this host (see deploy/README.md).
#
#   install.sh [options] BINARY
#
#   --config FILE        install FILE as /etc/riftmesh/riftmesh.toml (the old one,
#                        if different, is kept as riftmesh.toml.old); without it an
#                        existing file is left alone and a missing one is written
#                        from the defaults below
#   --name NAME          host name for a newly written default config [hostname]
#   --swarm-key FILE|-   install the swarm key from FILE or standard input
#                        (/etc/riftmesh/swarm.key, 0600, owner riftmesh); without
#                        it an existing key is kept
#   --generate-key       no key yet: make a new one (first host of a new cluster;
#                        copy it to every other host)
#   --writable DIR       the agent may write DIR (for a want's `place`); repeatable.
#                        Directories of `place` and a data_dir outside
#                        /var/lib/riftmesh found in the config are added too.
#   --root DIR           install into DIR instead of / (a staging root; implies
#                        --no-start)
#   --no-start           install and enable, but neither reload systemd nor
#                        (re)start the agent
#   -h, --help
#
# Idempotent: a second run with the same inputs changes nothing and does not
# restart the agent. A run that changed the binary, config, key or unit
# restarts it (SIGTERM: it leaves the cluster gracefully and comes back).
set -euo pipefail

PROG=${0##*/}
SELF_DIR=$(cd "$(dirname "$0")" && pwd)

die() { echo "$PROG: $*" >&2; exit 1; }
note() { echo "$PROG: $*"; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

ROOT=/
START=1
CONFIG=
NAME=
KEY=
GEN_KEY=0
BINARY=
WRITABLE=()

while [ $# -gt 0 ]; do
    case $1 in
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --swarm-key) KEY=${2:?--swarm-key needs a file or -}; shift 2 ;;
        --generate-key) GEN_KEY=1; shift ;;
        --writable) WRITABLE+=("${2:?--writable needs a directory}"); shift 2 ;;
        --root) ROOT=${2:?--root needs a directory}; START=0; shift 2 ;;
        --no-start) START=0; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [ -z "$BINARY" ] || die "one binary only (got $BINARY and $1)"
            BINARY=$1; shift ;;
    esac
done
if [ $# -gt 0 ]; then
    if [ -n "$BINARY" ] || [ $# -ne 1 ]; then die "one binary only"; fi
    BINARY=$1
fi
[ -n "$BINARY" ] || { usage >&2; exit 2; }
if [ ! -f "$BINARY" ] || [ ! -x "$BINARY" ]; then die "$BINARY is not an executable file"; fi
[ "$(id -u)" -eq 0 ] || [ "$ROOT" != / ] || die "run as root"
[ -z "$KEY" ] || [ "$GEN_KEY" -eq 0 ] || die "--swarm-key and --generate-key exclude each other"
[ -d "$ROOT" ] || die "root $ROOT does not exist"
ROOT=$(cd "$ROOT" && pwd)
R=${ROOT%/}   # "" for the real root

USER_NAME=riftmesh
BIN_DST=$R/usr/local/bin/riftmesh
ETC=$R/etc/riftmesh
CONF_DST=$ETC/riftmesh.toml
KEY_DST=$ETC/swarm.key
STATE=$R/var/lib/riftmesh
UNIT_DIR=$R/etc/systemd/system
UNIT_DST=$UNIT_DIR/riftmesh.service
DROPIN_DIR=$UNIT_DIR/riftmesh.service.d
DROPIN=$DROPIN_DIR/writable.conf
DOC_DIR=$R/usr/local/share/doc/riftmesh
UNIT_SRC=$SELF_DIR/riftmesh.service
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing (keep install.sh next to riftmesh.service)"

CHANGED=0
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

# --- the system user ----------------------------------------------------------
if [ -z "$R" ]; then
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/riftmesh --no-create-home \
            --shell /usr/sbin/nologin --comment "riftmesh agent" "$USER_NAME"
        note "created system user $USER_NAME"
    fi
    OWNER=$USER_NAME:$USER_NAME
else
    # Staging root: its own passwd/group files, numeric owners.
    mkdir -p "$R/etc"
    for f in passwd group shadow gshadow; do [ -e "$R/etc/$f" ] || : >"$R/etc/$f"; done
    if ! grep -q "^$USER_NAME:" "$R/etc/passwd"; then
        useradd --prefix "$R" --system --user-group --home-dir /var/lib/riftmesh \
            --no-create-home --shell /usr/sbin/nologin --comment "riftmesh agent" "$USER_NAME"
        note "created system user $USER_NAME in $R"
    fi
    uid=$(awk -F: -v u="$USER_NAME" '$1 == u { print $3 }' "$R/etc/passwd")
    gid=$(awk -F: -v u="$USER_NAME" '$1 == u { print $4 }' "$R/etc/passwd")
    if [ -z "$uid" ] || [ -z "$gid" ]; then die "user $USER_NAME missing from $R/etc/passwd"; fi
    OWNER=$uid:$gid
fi

# --- helpers -------------------------------------------------------------------
# put SRC DST MODE OWNER: install SRC at DST atomically unless DST already has
# the same content, mode and owner. Sets CHANGED=1 when it wrote.
put() {
    local src=$1 dst=$2 mode=$3 owner=$4 tmp
    if [ -f "$dst" ] && cmp -s "$src" "$dst" \
        && [ "$(stat -c %a "$dst")" = "${mode#0}" ] \
        && [ "$(stat -c %u:%g "$dst")" = "$(owner_ids "$owner")" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$dst")"
    tmp=$(dirname "$dst")/.$(basename "$dst").new
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    sync "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$dst"
    CHANGED=1
    note "installed $dst"
}
owner_ids() {
    local u=${1%%:*} g=${1#*:}
    case $u in *[!0-9]*) u=$(id -u "$u") ;; esac
    case $g in *[!0-9]*) g=$(getent group "$g" | cut -d: -f3) ;; esac
    echo "$u:$g"
}
mkdir_owned() { # DIR MODE OWNER
    mkdir -p "$1"
    chmod "$2" "$1"
    chown "$3" "$1"
}
check_key() { # FILE: go-libp2p swarm key format
    local l1 l2 l3
    { IFS= read -r l1 || true; IFS= read -r l2 || true; IFS= read -r l3 || true; } <"$1"
    l3=${l3%%[[:space:]]*}
    if [ "$l1" != /key/swarm/psk/1.0.0/ ] || [ "$l2" != /base16/ ] \
        || ! [[ $l3 =~ ^[0-9a-fA-F]{64}$ ]]; then
        die "swarm key: expected /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits"
    fi
}

# --- directories ---------------------------------------------------------------
mkdir_owned "$ETC" 0755 0:0
mkdir_owned "$STATE" 0700 "$OWNER"

# --- binary --------------------------------------------------------------------
if [ -z "$R" ]; then
    "$BINARY" --version >/dev/null 2>&1 || die "$BINARY --version failed: not a riftmesh binary for this host?"
fi
put "$BINARY" "$BIN_DST" 0755 0:0

# --- configuration -------------------------------------------------------------
if [ -n "$CONFIG" ]; then
    [ -f "$CONFIG" ] || die "config $CONFIG not found"
    if [ -f "$CONF_DST" ] && ! cmp -s "$CONFIG" "$CONF_DST"; then
        cp -p "$CONF_DST" "$CONF_DST.old"
        note "previous config kept as $CONF_DST.old"
    fi
    put "$CONFIG" "$CONF_DST" 0644 0:0
elif [ ! -f "$CONF_DST" ]; then
    host=${NAME:-$(hostname -s 2>/dev/null || hostname)}
    cat >"$TMPD/riftmesh.toml" <<EOF
# Written by install.sh; see deploy/examples/ for a cluster configuration.
name = "$host"
data_dir = "/var/lib/riftmesh"
swarm_key = "/etc/riftmesh/swarm.key"
listen = ["/ip4/0.0.0.0/tcp/4001"]
api = "127.0.0.1:7411"
metrics = "0.0.0.0:9464"
log_format = "json"
EOF
    put "$TMPD/riftmesh.toml" "$CONF_DST" 0644 0:0
else
    note "keeping existing $CONF_DST"
fi

# --- swarm key -----------------------------------------------------------------
if [ -n "$KEY" ]; then
    if [ "$KEY" = - ]; then
        cat >"$TMPD/swarm.key"
    else
        [ -f "$KEY" ] || die "swarm key $KEY not found"
        cat "$KEY" >"$TMPD/swarm.key"
    fi
    check_key "$TMPD/swarm.key"
    put "$TMPD/swarm.key" "$KEY_DST" 0600 "$OWNER"
elif [ -f "$KEY_DST" ]; then
    check_key "$KEY_DST"
    # Keep it, but make sure of its mode and owner.
    if [ "$(stat -c %a "$KEY_DST")" != 600 ] \
        || [ "$(stat -c %u:%g "$KEY_DST")" != "$(owner_ids "$OWNER")" ]; then
        chmod 0600 "$KEY_DST"
        chown "$OWNER" "$KEY_DST"
        CHANGED=1
        note "fixed the mode and owner of $KEY_DST"
    fi
elif [ "$GEN_KEY" -eq 1 ]; then
    "$BINARY" keygen --out "$TMPD/swarm.key" >/dev/null 2>&1 || die "$BINARY keygen failed"
    check_key "$TMPD/swarm.key"
    put "$TMPD/swarm.key" "$KEY_DST" 0600 "$OWNER"
    note "generated a new swarm key: copy $KEY_DST to every other host (install.sh --swarm-key)"
elif grep -Eq '^[[:space:]]*swarm_key[[:space:]]*=' "$CONF_DST"; then
    die "no swarm key: give --swarm-key FILE (or - for standard input), or --generate-key for the first host"
fi

# --- writable directories (ProtectSystem=strict) -------------------------------
# From the config: every `place` directory (up to its first {placeholder}) and
# a data_dir outside the StateDirectory.
while IFS= read -r p; do
    p=${p%%\{*}
    case $p in */) p=${p%/} ;; *) p=$(dirname "$p") ;; esac
    [ -n "$p" ] && [ "$p" != / ] && WRITABLE+=("$p")
done < <(sed -nE 's/^[[:space:]]*place[[:space:]]*=[[:space:]]*"([^"]*)".*/\1/p' "$CONF_DST")
data_dir=$(sed -nE 's/^[[:space:]]*data_dir[[:space:]]*=[[:space:]]*"([^"]*)".*/\1/p' "$CONF_DST" | tail -n 1)
case $data_dir in
    "" | /var/lib/riftmesh | /var/lib/riftmesh/) ;;
    /*) WRITABLE+=("${data_dir%/}") ;;
    *) note "warning: data_dir \"$data_dir\" is relative: it lands under /var/lib/riftmesh" ;;
esac

{
    echo "# Written by install.sh: directories the agent may write besides /var/lib/riftmesh."
    echo "[Service]"
    if [ ${#WRITABLE[@]} -gt 0 ]; then
        printf '%s\n' "${WRITABLE[@]}" | sort -u | while IFS= read -r d; do
            echo "ReadWritePaths=$d"
        done
    fi
} >"$TMPD/writable.conf"
if [ ${#WRITABLE[@]} -gt 0 ]; then
    while IFS= read -r d; do
        case $d in /*) ;; *) die "--writable $d: use an absolute path" ;; esac
        if [ ! -d "$R$d" ]; then
            mkdir_owned "$R$d" 0755 "$OWNER"
            note "created $R$d (owner $USER_NAME)"
        fi
    done < <(printf '%s\n' "${WRITABLE[@]}" | sort -u)
    put "$TMPD/writable.conf" "$DROPIN" 0644 0:0
elif [ -f "$DROPIN" ]; then
    rm -f "$DROPIN"
    rmdir "$DROPIN_DIR" 2>/dev/null || true
    CHANGED=1
    note "removed $DROPIN"
fi

# --- unit and docs -------------------------------------------------------------
put "$UNIT_SRC" "$UNIT_DST" 0644 0:0
if [ -f "$SELF_DIR/README.md" ]; then
    saved=$CHANGED
    put "$SELF_DIR/README.md" "$DOC_DIR/README.md" 0644 0:0 >/dev/null
    CHANGED=$saved
fi

# --- enable / start ------------------------------------------------------------
if [ -n "$R" ]; then
    systemctl --root="$R" enable riftmesh.service >/dev/null 2>&1 \
        || { mkdir -p "$UNIT_DIR/multi-user.target.wants"
             ln -sfn /etc/systemd/system/riftmesh.service "$UNIT_DIR/multi-user.target.wants/riftmesh.service"; }
    note "staged in $R (not started)"
    exit 0
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable riftmesh.service >/dev/null 2>&1
    if [ "$START" -eq 0 ]; then
        note "enabled; not started (--no-start)"
    elif ! systemctl is-active --quiet riftmesh.service; then
        systemctl start riftmesh.service
        note "started"
    elif [ "$CHANGED" -eq 1 ]; then
        systemctl restart riftmesh.service
        note "restarted (something changed)"
    else
        note "unchanged; agent left running"
    fi
else
    systemctl enable riftmesh.service >/dev/null 2>&1 \
        || { mkdir -p "$UNIT_DIR/multi-user.target.wants"
             ln -sfn /etc/systemd/system/riftmesh.service "$UNIT_DIR/multi-user.target.wants/riftmesh.service"; }
    note "systemd is not running here: enabled for the next boot, not started"
fi
