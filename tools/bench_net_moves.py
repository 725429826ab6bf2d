"""Relocation under UDP load: a netecho guest moved back and forth between two hosts
while a peer sends it numbered datagrams; loss, the gap and the downtime of each move,
from the same run.

    .venv/bin/python tools/bench_net_moves.py [--moves 20] [--rate 1000] [--size 64] [--json]

The hosts are network namespaces hvmmA<pid> and hvmmB<pid>, each with a bridge and a
relocation daemon (`hvm host serve --net-map` the other's bridge to its own), the bridges
joined by a veth link limited to 1 Gbit/s each way (tbf); the peer (hvmmP<pid>, on A's
bridge) runs tools/netseq.py with pings. Everything made is removed at the end. For each
move: the downtime `hvm migrate` reports (the source vCPU's last run to the
destination's first), the datagrams lost that were sent while it ran, and the silence the
peer saw around them (from the echo before the lost run to the echo after it); then the
totals beside downtime x rate.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADDR = {"a": "10.79.0.1", "b": "10.79.0.2", "p": "10.79.0.100", "guest": "10.79.0.10"}


def topology(tag: str) -> dict:
    h = {"a": f"hvmmA{tag}", "b": f"hvmmB{tag}", "p": f"hvmmP{tag}", "br_a": f"hmbrA{tag}",
         "br_b": f"hmbrB{tag}", "link_a": f"hmlA{tag}", "link_b": f"hmlB{tag}", "peer_a": f"hmpA{tag}",
         "peer": f"hmpP{tag}"}
    a, b, p = h["a"], h["b"], h["p"]
    steps = [["ip", "netns", "add", ns] for ns in (a, b, p)]
    steps += [["ip", "link", "add", h["link_a"], "type", "veth", "peer", "name", h["link_b"]],
              ["ip", "link", "set", h["link_a"], "netns", a], ["ip", "link", "set", h["link_b"], "netns", b],
              ["ip", "link", "add", h["peer_a"], "type", "veth", "peer", "name", h["peer"]],
              ["ip", "link", "set", h["peer_a"], "netns", a], ["ip", "link", "set", h["peer"], "netns", p]]
    for ns, br, link, addr in ((a, h["br_a"], h["link_a"], ADDR["a"]), (b, h["br_b"], h["link_b"], ADDR["b"])):
        steps += [["ip", "-n", ns, "link", "add", br, "type", "bridge"],
                  ["ip", "-n", ns, "link", "set", link, "master", br],
                  ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", br],
                  ["ip", "-n", ns, "link", "set", br, "up"], ["ip", "-n", ns, "link", "set", link, "up"],
                  ["ip", "-n", ns, "link", "set", "lo", "up"],
                  ["tc", "-n", ns, "qdisc", "add", "dev", link, "root", "tbf", "rate", "1gbit", "burst",
                   "256kb", "latency", "50ms"]]
    steps += [["ip", "-n", a, "link", "set", h["peer_a"], "master", h["br_a"]],
              ["ip", "-n", a, "link", "set", h["peer_a"], "up"],
              ["ip", "-n", p, "addr", "add", f"{ADDR['p']}/24", "dev", h["peer"]],
              ["ip", "-n", p, "link", "set", h["peer"], "up"], ["ip", "-n", p, "link", "set", "lo", "up"]]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    return h


def remove(h: dict) -> None:
    for key in ("a", "b", "p"):
        subprocess.run(["ip", "netns", "del", h[key]], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=20)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--memory", default="32M")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between moves")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from migrate.host import control, tls
    from migrate.host.source import migrate_domain

    tag = str(os.getpid() % 100000)
    work = Path(tempfile.mkdtemp(prefix="hvm-netmoves-"))
    base = {"a": work / "a", "b": work / "b"}
    h = topology(tag)
    py = [sys.executable, "-m", "migrate.cli"]
    procs, netseq = [], None
    try:
        tls.keygen(work / "pki", [ADDR["a"], ADDR["b"]])
        for side, peer in (("a", "b"), ("b", "a")):
            proc = subprocess.Popen(["ip", "netns", "exec", h[side], *py, "host", "serve", "--listen",
                                     f"{ADDR[side]}:7410", "--tls-dir", str(work / "pki" / ADDR[side]),
                                     "--net-map", f"{h['br_' + peer]}={h['br_' + side]}"],
                                    env={**os.environ, "HVM_STATE_DIR": str(base[side])}, cwd=ROOT,
                                    stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            assert "listening on" in proc.stderr.readline()
        ip = int.from_bytes(socket.inet_aton(ADDR["guest"]), "big")
        subprocess.run(["ip", "netns", "exec", h["a"], *py, "create", "-w", "netecho", "-m", args.memory, "-n",
                        "mover", "--arg", str(ip), "--net", f"bridge={h['br_a']}"],
                       env={**os.environ, "HVM_STATE_DIR": str(base["a"])}, cwd=ROOT, check=True,
                       capture_output=True)
        time.sleep(1.0)
        netseq = subprocess.Popen(["ip", "netns", "exec", h["p"], sys.executable, str(ROOT / "tools" / "netseq.py"),
                                   ADDR["guest"], "--rate", str(args.rate), "--size", str(args.size),
                                   "--ping-rate", "20", "--gap-ms", "2", "--json"],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(args.settle)
        moves, where = [], "a"
        for i in range(args.moves):
            there = "b" if where == "a" else "a"
            t0 = time.monotonic()
            reply = migrate_domain("mover", f"{ADDR[there]}:7410", tls_dir=str(work / "pki" / ADDR[where]),
                                   base=base[where])
            control.wait_gone("mover", base[where])
            moves.append({"move": i + 1, "to": there.upper(), "start": t0, "end": time.monotonic(),
                          "downtime": reply["stats"]["downtime"], "seconds": reply["stats"]["seconds"]})
            where = there
            time.sleep(args.settle)
        netseq.send_signal(signal.SIGTERM)
        result = json.loads(netseq.communicate(timeout=60)[0])
    finally:
        if netseq is not None and netseq.poll() is None:
            netseq.kill()
        for side in ("a", "b"):
            for info in control.list_domains(base[side]):
                try:
                    with control.DomainClient(info["name"], base[side]) as c:
                        c.call("destroy")
                except control.ControlError:
                    pass
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        remove(h)

    t0, rate = result["t0"], args.rate
    for move in moves:      # the peer's silences, and the datagrams lost, sent while this move ran
        runs = [run for run in result["lost_runs"] if move["start"] <= t0 + run[0] / rate <= move["end"] + 0.2]
        move["lost"] = sum(n for _, n, _ in runs)
        move["gap"] = max((gap or 0.0 for _, _, gap in runs), default=0.0)
    total_down = sum(m["downtime"] for m in moves)
    summary = {"moves": len(moves), "rate": args.rate, "sent": result["sent"], "lost": result["lost"],
               "duplicates": result["duplicates"], "reordered": result["reordered"],
               "corrupted": result["corrupted"], "downtime_total": total_down,
               "downtime_x_rate": total_down * args.rate, "longest_gap": result["longest_gap"],
               "ping": result.get("ping"), "per_move": moves, "lost_runs": result["lost_runs"],
               "t0": result["t0"]}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    for m in moves:
        print(f"move {m['move']:>2} to {m['to']}: downtime {m['downtime'] * 1000:6.1f} ms, {m['lost']:>3} lost, "
              f"the peer's silence around them {m['gap'] * 1000:6.1f} ms, move {m['seconds']:.2f} s")
    downs = sorted(m["downtime"] for m in moves)
    print(f"{len(moves)} moves at {args.rate:.0f} datagrams/s: sent {result['sent']}, lost {result['lost']} "
          f"(downtime x rate = {total_down * args.rate:.0f}), duplicates {result['duplicates']}, reordered "
          f"{result['reordered']}, corrupted {result['corrupted']}; downtime median "
          f"{downs[len(downs) // 2] * 1000:.1f} ms, max {downs[-1] * 1000:.1f} ms; longest gap "
          f"{result['longest_gap'] * 1000:.1f} ms; pings {result['ping']['answered']}/{result['ping']['sent']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
