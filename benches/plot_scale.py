#!/usr/bin/env python3
"""Plot per-host cost and detection time against cluster size.

    python3 benches/plot_scale.py [benches/results/simulate.json] \
        [--real N:BPS ...] [--out benches/results/scale.png]

Reads the simulation's rows (`cargo bench --bench simulate`), optional
figures from real agents (`--real 20:2761`: N agents, idle libp2p bytes/s
per agent from `cargo bench --bench membership`), and draws beside them
memberlist's figures derived from its DefaultLANConfig (below). Needs
matplotlib (Debian: python3-matplotlib).

memberlist, derived (hashicorp/memberlist config.go and util.go):
- idle traffic per node: one probe a second sent and, on average, one
  received (ping ~50 B, ack ~15 B: 130 B/s), plus push/pull full-state syncs
  with one random node every PushPullInterval (30 s) scaled by
  pushPullScale (x ceil(log2 N - log2 32) + 1 above 32 nodes), each node
  initiating one and answering one, ~60 B of state per node each way;
  nothing is gossiped while nothing changes;
- time until a failure is known everywhere: ~0.5 s until some node probes
  it, ProbeTimeout (0.5 s) and the indirect round (the rest of the 1 s
  ProbeInterval), the suspicion timeout SuspicionMult (4) x max(1, log10 N)
  x ProbeInterval (its minimum, reached with enough confirmations), and
  ~log3(N) gossip rounds of 200 ms to spread the verdict. memberlist has no
  transport hint: a crashed process and a vanished host take the same time.
"""

import json
import math
import sys


def memberlist_bps(n):
    probes = 2 * (50 + 15)
    scale = 1 if n <= 32 else math.ceil(math.log2(n) - math.log2(32)) + 1
    interval = 30.0 * scale
    pushpull = 2 * 2 * 60 * n / interval
    return probes + pushpull


def memberlist_detect_s(n):
    return 0.5 + 1.0 + 4 * max(1.0, math.log10(n)) + 0.2 * math.log(max(n, 3), 3)


def main(argv):
    path = "benches/results/simulate.json"
    out = "benches/results/scale.png"
    real = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--out":
            out = argv[i + 1]
            i += 2
            continue
        if a == "--real":
            n, bps = argv[i + 1].split(":")
            real.append((int(n), float(bps)))
            i += 2
            continue
        path = a
        i += 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.load(open(path))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for topo, style, label in [
        ("full", "o-", "riftmesh today (full mesh), simulated"),
        ("bounded", "s-", "riftmesh bounded design, simulated"),
    ]:
        rs = sorted((r for r in rows if r["topology"] == topo), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["idle_bps_mean"] for r in rs], style, label=label)

        def worst(v):
            return max(v) / 1000.0 if v else float("nan")

        ax2.plot(ns, [worst(r["kill_ms"]) for r in rs], style, label=f"{topo}: process killed")
        ax2.plot(ns, [worst(r["cut_ms"]) for r in rs], style.replace("-", "--"),
                 label=f"{topo}: host vanished")
    if real:
        real.sort()
        ax1.plot([n for n, _ in real], [b for _, b in real], "k^",
                 label="riftmesh today, real agents (membership bench)")
    ns = sorted({r["n"] for r in rows} | {n for n, _ in real})
    ax1.plot(ns, [memberlist_bps(n) for n in ns], "x:", label="memberlist LAN defaults, derived")
    ax2.plot(ns, [memberlist_detect_s(n) for n in ns], "x:", label="memberlist LAN defaults, derived")
    ax1.set_yscale("log")
    for ax, ylabel, title in [
        (ax1, "idle bytes/s per host (in + out)", "Per-host idle traffic"),
        (ax2, "s until every host holds HOST_OFFLINE (worst trial)", "Failure known everywhere"),
    ]:
        ax.set_xscale("log")
        ax.set_xlabel("hosts")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
