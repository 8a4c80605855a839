"""Small helpers: logging, subprocess with timeouts, HTTP JSON calls, deadlines."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

VERBOSE = False


class TestnetError(Exception):
    """A failure the command reports and exits non-zero on."""


class Interrupted(BaseException):
    """Raised from the signal handlers (SIGINT, SIGTERM, SIGALRM) so every
    try/finally on the way out runs its cleanup."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def debug(msg):
    if VERBOSE:
        log(msg)


def run(cmd, timeout=30, check=True, input=None):
    """Run a command (list), return CompletedProcess; raise TestnetError on
    failure when check is set."""
    debug("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TestnetError(f"command timed out after {timeout}s: {' '.join(cmd)}")
    except FileNotFoundError:
        raise TestnetError(f"command not found: {cmd[0]}")
    if check and p.returncode != 0:
        raise TestnetError(f"command failed ({p.returncode}): {' '.join(cmd)}: "
                           f"{p.stderr.strip() or p.stdout.strip()}")
    return p


class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def http(method, url, body=None, timeout=10, raw=False, token=None):
    """One request; with `token`, as `Authorization: Bearer` (the agents'
    APIs listen on namespace addresses and want the testnet's token)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            content = resp.read()
            if raw:
                return content
            return json.loads(content) if content else None
    except urllib.error.HTTPError as e:
        content = e.read()
        try:
            message = json.loads(content)
        except ValueError:
            message = content.decode("utf-8", "replace") or e.reason
        raise ApiError(e.code, message) from None


def wait_for(cond, deadline, interval=0.5, what="condition"):
    """Poll cond() until it returns a truthy value or the monotonic deadline
    passes; returns the value or raises TestnetError. cond may raise
    ApiError/OSError, which count as 'not yet'."""
    last_err = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except (ApiError, OSError, ValueError) as e:
            last_err = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_err})" if last_err else ""
            raise TestnetError(f"timed out waiting for {what}{extra}")
        time.sleep(interval)


def parse_duration(s):
    """'90', '90s', '5m', '1h', '500ms' -> seconds (float)."""
    s = str(s).strip()
    for suf, mul in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if s.endswith(suf) and s[: -len(suf)].replace(".", "", 1).isdigit():
            return float(s[: -len(suf)]) * mul
    return float(s)


def parse_size(s):
    s = str(s).strip()
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20,
             "G": 1 << 30, "B": 1}
    for u, mul in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mul)
    return int(s)


_hash_cache = {}


def sha256_file(path):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _hash_cache:
        return _hash_cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def write_random_file(path, size, seed=None):
    """A file of `size` pseudo-random bytes (fast: a random 1 MiB block
    re-hashed per block so no two blocks are equal)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    base = os.urandom(1 << 20)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        left, n = size, 0
        while left > 0:
            prefix = hashlib.sha256(f"{seed}-{n}".encode() + base[:64]).digest()
            block = (prefix + base[32:])[: min(left, 1 << 20)]
            f.write(block)
            left -= len(block)
            n += 1
    os.replace(tmp, path)


def install_signal_handlers():
    def handler(signum, frame):
        # Further signals while cleaning up are ignored so cleanup finishes.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.alarm(0)   # cleanup is bounded by each step's own timeout
        name = signal.Signals(signum).name
        raise Interrupted(f"interrupted by {name}" if signum != signal.SIGALRM
                          else "command timeout reached")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGHUP):
        signal.signal(s, handler)


def restore_signal_handlers():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
