"""The NAT layout: two hosts on the public segment, four NAT routers: two
hosts behind each of the first two, one behind each of the others.

    root namespace: bridge rmt-<tag>br, <subnet>.1/24 (the checker)
      ├─ h01 <subnet>.11, h02 <subnet>.12       public, the bootstrap peers
      ├─ router a (ns rmt-<tag>ra, eth0 <subnet>.2)   MASQUERADE: cone-like
      │    └─ bridge lan0 <lan a>.1/24 ─ h03 <lan a>.13, h04 <lan a>.14
      ├─ router b (ns rmt-<tag>rb, eth0 <subnet>.3)   MASQUERADE --random-fully:
      │    └─ bridge lan0 <lan b>.1/24 ─ h05 <lan b>.15, h06 <lan b>.16   symmetric
      ├─ router c (ns rmt-<tag>rc, eth0 <subnet>.4)   MASQUERADE: cone-like
      │    └─ bridge lan0 <lan c>.1/24 ─ h07 <lan c>.17
      └─ router d (ns rmt-<tag>rd, eth0 <subnet>.5)   MASQUERADE: cone-like
           └─ bridge lan0 <lan d>.1/24 ─ h08 <lan d>.18

The LAN bridges live inside the router namespaces, so neither the root
namespace nor the public hosts are on a LAN. The public hosts have no route
to the LANs; each router forwards new connections from its LAN out (and
masquerades them), and from outside only the replies (ESTABLISHED,RELATED)
plus new connections from the root namespace's bridge address to the API
and metrics ports: the checker reaches every API through a route in the root
namespace (<lan>.0/24 via the router), and nothing reaches an agent behind
NAT on its p2p port from outside. Like home and cloud NATs, a router drops
an unsolicited connection to its own address instead of answering it with a
reset (a reset would kill a hole punch whose SYN crosses the other's in
flight). The routers' rules are iptables rules in the routers' namespaces
(gone with them); the root namespace gets four routes and no rule.
Cone-like NATs (a, c, d) let DCUtR punch through; the symmetric one (b)
does not, and its hosts stay relayed to every host behind another NAT. The
two hosts behind router a share its public port 4001 (only one of them can
hold it), so the punch that must succeed is between the lone hosts behind
c and d.
"""

import shutil

from .cluster import API_PORT, METRICS_PORT, P2P_PORT
from .util import TestnetError, log, run

# Host index -> router; hosts 1 and 2 are public.
BEHIND = {3: "a", 4: "a", 5: "b", 6: "b", 7: "c", 8: "d"}
ROUTERS = (("a", "cone"), ("b", "symmetric"), ("c", "cone"), ("d", "cone"))
LAN_BRIDGE = "lan0"


def layout(s, lans):
    """Turn the flat 8-host state `s` (Cluster.init) into the NAT layout:
    the routers, and the hosts behind them with their LAN addresses."""
    tag, subnet = s["tag"], s["subnet"]
    s["routers"] = {}
    for i, (r, kind) in enumerate(ROUTERS, start=2):
        lan = lans[r]
        s["routers"][r] = {
            "name": r, "ns": f"rmt-{tag}r{r}", "veth": f"rmt-{tag}vr{r}",
            "addr": f"{subnet}.{i}", "lan": lan, "lan_addr": f"{lan}.1", "nat": kind,
            "masquerade": ["MASQUERADE"] + (["--random-fully"] if kind == "symmetric" else []),
        }
    for h in s["hosts"].values():
        r = BEHIND.get(h["index"])
        if not r:
            h["router"] = None
            continue
        rt = s["routers"][r]
        addr = f"{rt['lan']}.{10 + h['index']}"
        h.update(router=r, addr=addr, veth_ns=rt["ns"],
                 p2p=f"/ip4/{addr}/tcp/{P2P_PORT}", api=f"{addr}:{API_PORT}",
                 metrics=f"{addr}:{METRICS_PORT}")


def iptables():
    """The iptables command that works here (nft or legacy backend)."""
    for cmd in ("iptables", "iptables-nft", "iptables-legacy"):
        if shutil.which(cmd) and run([cmd, "--version"], check=False).returncode == 0:
            return cmd
    raise TestnetError("the NAT layout needs iptables (apt-get install iptables)")


def make_network(c):
    s = c.s
    br, subnet, tag = s["bridge"], s["subnet"], s["tag"]
    routers = list(s["routers"].values())
    ipt = iptables()
    # Clashes with anything already here: refuse before recording anything.
    links = run(["ip", "-o", "link", "show"]).stdout
    used = {l.split(":")[1].strip().split("@")[0] for l in links.splitlines() if ":" in l}
    nss = {l.split()[0] for l in run(["ip", "netns", "list"]).stdout.splitlines() if l.strip()}
    public = [h for h in c.hosts.values() if not h["router"]]
    root_links = {br} | {h["veth"] for h in public} | {r["veth"] for r in routers}
    all_ns = {h["ns"] for h in c.hosts.values()} | {r["ns"] for r in routers}
    clash = sorted(root_links & used) + sorted(all_ns & nss)
    if clash:
        raise TestnetError(f"already in use (another testnet? use --net-tag/--subnet/--state): "
                           f"{', '.join(clash)}")
    addrs = run(["ip", "-o", "-4", "addr", "show"]).stdout
    routes = run(["ip", "-4", "route", "show"]).stdout
    for net in [subnet] + [r["lan"] for r in routers]:
        if f" {net}." in addrs or any(l.startswith(f"{net}.") for l in routes.splitlines()):
            raise TestnetError(f"{net}.0/24 is already on an interface or routed here; "
                               "use --subnet / --lan-a / --lan-b / --lan-c / --lan-d")
    if len({subnet} | {r["lan"] for r in routers}) != 1 + len(routers):
        raise TestnetError("the public subnet and the LANs must differ")

    # The public segment: the bridge and the public hosts, as in the flat layout.
    c.record(kind="bridge", name=br)
    run(["ip", "link", "add", br, "type", "bridge"])
    run(["ip", "addr", "add", f"{s['bridge_addr']}/24", "dev", br])
    run(["ip", "link", "set", br, "up"])
    for h in public:
        _netns(c, h["ns"])
        c.record(kind="veth", name=h["veth"])
        run(["ip", "link", "add", h["veth"], "type", "veth", "peer", "name", "eth0", "netns", h["ns"]])
        run(["ip", "link", "set", h["veth"], "master", br, "up"])
        _addr_up(h["ns"], "eth0", f"{h['addr']}/24")

    for r in routers:
        ns = r["ns"]
        _netns(c, ns)
        c.record(kind="veth", name=r["veth"])
        run(["ip", "link", "add", r["veth"], "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", r["veth"], "master", br, "up"])
        _addr_up(ns, "eth0", f"{r['addr']}/24")
        c.record(kind="nslink", ns=ns, name=LAN_BRIDGE)
        run(["ip", "-n", ns, "link", "add", LAN_BRIDGE, "type", "bridge"])
        _addr_up(ns, LAN_BRIDGE, f"{r['lan_addr']}/24")
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        x = ["ip", "netns", "exec", ns, ipt]
        # Out: every new connection from the LAN, masqueraded (with
        # --random-fully a fresh source port per connection: symmetric).
        run(x + ["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j"] + r["masquerade"])
        # In: replies; new connections from the checker to the API and
        # metrics ports only; nothing else.
        fwd = x + ["-A", "FORWARD", "-i", "eth0", "-o", LAN_BRIDGE]
        run(fwd + ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        run(fwd + ["-s", s["bridge_addr"], "-p", "tcp", "-m", "multiport", "--dports",
                   f"{API_PORT},{METRICS_PORT}", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"])
        run(fwd + ["-j", "DROP"])
        # To the router itself from outside: dropped, not reset (above).
        run(x + ["-A", "INPUT", "-i", "eth0", "-p", "tcp", "-j", "DROP"])

    for h in c.hosts.values():
        if not h["router"]:
            continue
        r = s["routers"][h["router"]]
        _netns(c, h["ns"])
        c.record(kind="nslink", ns=r["ns"], name=h["veth"])
        run(["ip", "-n", r["ns"], "link", "add", h["veth"], "type", "veth", "peer", "name", "eth0",
             "netns", h["ns"]])
        run(["ip", "-n", r["ns"], "link", "set", h["veth"], "master", LAN_BRIDGE, "up"])
        _addr_up(h["ns"], "eth0", f"{h['addr']}/24")
        run(["ip", "-n", h["ns"], "route", "add", "default", "via", r["lan_addr"]])

    # The checker's way to the APIs behind the routers.
    for r in routers:
        route = f"{r['lan']}.0/24 via {r['addr']}"
        c.record(kind="root_route", route=route)
        run(["ip", "route", "add"] + route.split())
    log(f"NAT layout: public {subnet}.0/24 ({', '.join(h['name'] for h in public)}); "
        + "; ".join(f"router {r['name']} ({r['nat']}) {r['addr']} -> {r['lan']}.0/24 "
                    f"({', '.join(h['name'] for h in c.hosts.values() if h['router'] == r['name'])})"
                    for r in routers))


def _netns(c, ns):
    c.record(kind="netns", name=ns)
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def _addr_up(ns, dev, cidr):
    run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
    run(["ip", "-n", ns, "link", "set", dev, "up"])
