"""Network throughput of the stub's virtio-net: packets/s and MB/s guest -> host and
host -> guest over a TAP device, for MTU 1500 and 9000, with and without checksum
offload, with a driver that suppresses notifications and batches (EVENT_IDX, no
interrupts) and one that does not (a kick per packet, interrupts); exits per packet, and
the stub path's cost per packet beside a bare exit.

    .venv/bin/python tools/bench_net.py [--seconds 2] [--configs all|quick] [--json]

It makes a network namespace of its own (hvmbench<pid>, removed at the end) and runs
the measurement inside it: an in-process domain running netecho on a TAP device whose
host side has 10.88.0.1, the guest 10.88.0.2.
- guest -> host: a datagram to the guest's blast port (19) makes it send N numbered
  datagrams as fast as it can; the host counts what arrives and when.
- host -> guest: the host sends datagrams to the discard port (9) as fast as Python can
  for --seconds; the guest's status port (10) says how many it took.
- exits per packet: the guest vCPU's KVM exits (Vcpu.exits) during a run, over packets;
  stub ioreqs per packet the same way. The stub path's cost per packet sent: the guest's
  TSC cycles for the blast over N, beside the cost of a bare exit (port 0xED) the guest
  measured at boot; received: the host's time in NET_RX ioreqs over the packets they took.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HOST_IP, GUEST_IP = "10.88.0.1", "10.88.0.2"
NO_CSUM, NAIVE = 1, 2 | 4 | 8
CONFIGS = [(mtu, off, drv) for mtu in (1500, 9000) for off in (True, False) for drv in ("suppressed", "naive")]
QUICK = [(1500, True, "suppressed"), (1500, True, "naive"), (9000, True, "suppressed"), (9000, False, "suppressed")]


def outer(args) -> int:
    ns = f"hvmbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", *sys.argv[1:]]
        return subprocess.run(cmd).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def boot(mtu: int, opts: int, tag: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from migrate.domain import Domain, DomainConfig
    from migrate.stub.netback import parse_net
    tap = f"hvb{os.getpid() % 10000}n{tag}"
    ip = int.from_bytes(socket.inet_aton(GUEST_IP), "big")
    dom = Domain.boot(DomainConfig("bench", "netecho", 64 << 20, args=[ip, opts],
                                   net=parse_net(f"tap={tap},mtu={mtu}")))
    subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
    dom.resume()
    m = dom.console.wait_for(r"^netecho start null_exit=(\d+)", 20)
    return dom, int(m.group(1))


def counters(dom) -> tuple[int, int]:
    return dom.vcpu.exits, dom.stub.requests


def guest_to_host(dom, size: int, count: int) -> dict:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    rx.bind((HOST_IP, 0))
    rx.settimeout(2.0)
    exits0, req0 = counters(dom)
    start = dom.console.next_index
    rx.sendto(struct.pack("<II", count, size), (GUEST_IP, 19))
    got = nbytes = 0
    first = last = None
    while got < count:
        try:
            data = rx.recv(65536)
        except socket.timeout:
            break
        last = time.perf_counter()
        first = first or last
        got += 1
        nbytes += len(data)
    m = dom.console.wait_for(r"^netecho blast n=\d+ size=\d+ cycles=(\d+) kicks=(\d+)", 30, start=start)
    exits1, req1 = counters(dom)
    seconds = (last - first) if got > 1 else 0.0
    khz = dom.vcpu.get_tsc_khz()
    return {"packets": got, "of": count, "pps": got / seconds if seconds else 0.0,
            "MBps": nbytes / seconds / 1e6 if seconds else 0.0,
            "exits_per_packet": (exits1 - exits0) / max(got, 1), "ioreqs_per_packet": (req1 - req0) / max(got, 1),
            "kicks_per_packet": int(m.group(2)) / count, "guest_us_per_packet": int(m.group(1)) / count / khz * 1000}


def host_to_guest(dom, size: int, seconds: float) -> dict:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.settimeout(5)

    def ask() -> dict:
        status.sendto(b"", (GUEST_IP, 10))
        text = status.recv(4096).decode()
        return {k: int(v) for k, v in (item.split("=") for item in text.split())}

    before = ask()
    net0 = dict(dom.stub.net.stats)
    exits0, req0 = counters(dom)
    payload = bytes(size)
    sent = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(64):
            try:
                tx.sendto(payload, (GUEST_IP, 9))
                sent += 1
            except OSError:
                pass
    elapsed = time.perf_counter() - t0
    time.sleep(0.3)
    after = ask()
    exits1, req1 = counters(dom)
    net1 = dom.stub.net.stats
    took = after["discard"] - before["discard"]
    batches = net1["rx_batches"] - net0["rx_batches"]
    rx_packets = net1["rx_packets"] - net0["rx_packets"]
    return {"packets": took, "sent": sent, "pps": took / elapsed, "MBps": took * (size + 42) / elapsed / 1e6,
            "exits_per_packet": (exits1 - exits0) / max(took, 1), "ioreqs_per_packet": (req1 - req0) / max(took, 1),
            "packets_per_net_rx": rx_packets / max(batches, 1),
            "host_us_per_packet": (net1["rx_seconds"] - net0["rx_seconds"]) / max(rx_packets, 1) * 1e6}


def echo_rtt(n: int = 500) -> float:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    t0 = time.perf_counter()
    for i in range(n):
        s.sendto(b"x" * 64, (GUEST_IP, 7))
        s.recv(256)
    return (time.perf_counter() - t0) / n * 1e6


def inner(args) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    configs = QUICK if args.configs == "quick" else CONFIGS
    rows = []
    for tag, (mtu, offload, driver) in enumerate(configs):
        opts = (0 if offload else NO_CSUM) | (NAIVE if driver == "naive" else 0)
        dom, null_exit = boot(mtu, opts, tag)
        try:
            khz = dom.vcpu.get_tsc_khz()
            echo_rtt(50)
            big = mtu - 28
            row = {"mtu": mtu, "offload": offload, "driver": driver, "bare_exit_us": null_exit / khz * 1000,
                   "echo_rtt_us": echo_rtt()}
            for size in sorted({64, big}):
                count = max(2000, int(args.seconds * 8000))
                row[f"tx_{size}"] = guest_to_host(dom, size, count)
                row[f"rx_{size}"] = host_to_guest(dom, size, args.seconds)
            rows.append(row)
            if not args.json:
                print_row(row, big)
        finally:
            dom.destroy()
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def print_row(row: dict, big: int) -> None:
    head = (f"MTU {row['mtu']} offload {'on ' if row['offload'] else 'off'} {row['driver']:<10} "
            f"bare exit {row['bare_exit_us']:.1f} us, echo round trip {row['echo_rtt_us']:.0f} us")
    print(head)
    for size in sorted({64, big}):
        tx, rx = row[f"tx_{size}"], row[f"rx_{size}"]
        print(f"  {size:>5} B  guest->host {tx['pps']:>8.0f} pkt/s {tx['MBps']:>7.1f} MB/s "
              f"{tx['exits_per_packet']:.2f} exits/pkt {tx['kicks_per_packet']:.2f} kicks/pkt, "
              f"{tx['guest_us_per_packet']:.1f} us/pkt in the guest ({tx['guest_us_per_packet'] / row['bare_exit_us']:.2f} bare exits)")
        print(f"  {size:>5} B  host->guest {rx['pps']:>8.0f} pkt/s {rx['MBps']:>7.1f} MB/s "
              f"{rx['exits_per_packet']:.2f} exits/pkt {rx['packets_per_net_rx']:.1f} pkt/NET_RX, "
              f"{rx['host_us_per_packet']:.1f} us/pkt in NET_RX ({rx['host_us_per_packet'] / row['bare_exit_us']:.2f} bare exits)"
              f" [{rx['sent']} sent]")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--configs", choices=["all", "quick"], default="all")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
