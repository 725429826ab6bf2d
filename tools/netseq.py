"""netseq: numbered UDP datagrams to a guest's echo port (and pings beside them), and
what came back: loss, duplicates, reordering, corrupted payloads and the longest gap.

    python tools/netseq.py 10.77.0.10 [--rate 1000] [--size 64] [--seconds 10] [--ping-rate 20] [--json]

Each datagram is "HNSQ", the sequence number (u64), the send time (u64 ns) and a pattern
that depends on the sequence number; an echo is counted only if it comes back byte for
byte. Without --seconds it runs until SIGTERM or SIGINT. Then it waits --drain seconds
for late answers and reports (one JSON object with --json):
- sent, received (distinct sequence numbers back), lost = sent - received, duplicates
  (a sequence number back more than once), reordered (one back after a higher one),
  corrupted (an answer that is not the datagram sent);
- the longest gap: the longest time without any echo while datagrams were going out, and
  the longest run of consecutive lost sequence numbers; ``gaps``: every silence longer
  than ten send intervals and --gap-ms (start in seconds from the first send, ``t0`` in
  CLOCK_MONOTONIC seconds; its length; the datagrams lost in it); ``lost_runs``: each run
  of consecutive lost datagrams (the first, how many, the seconds from the echo before it
  to the echo after it); datagram s went out at t0 + s / rate;
- pings: ICMP echo requests sent and answered (needs a raw socket: root).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time

MAGIC = b"HNSQ"
HEAD = struct.Struct("!4sQQ")            # magic, seq, send time (ns)
PATTERN = bytes((i * 131 + 7) & 255 for i in range(65536 + 256))


def datagram(seq: int, size: int, now_ns: int) -> bytes:
    body = HEAD.pack(MAGIC, seq, now_ns)
    if size <= len(body):
        return body
    off = seq % 251
    return body + PATTERN[off:off + size - len(body)]


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo requests through a raw socket, answers matched by identifier."""

    def __init__(self, host: str):
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.ident = os.getpid() & 0xFFFF
        self.sent = 0
        self.answered: set[int] = set()
        self.rtts: list[float] = []
        self.times: dict[int, float] = {}

    def send(self) -> None:
        seq = self.sent & 0xFFFF
        payload = struct.pack("!d", time.monotonic()) + b"netseq-ping"
        header = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, icmp_checksum(header + payload), self.ident, seq) + payload
        self.times[seq] = time.monotonic()
        self.sock.sendto(packet, (self.host, 0))
        self.sent += 1

    def receive(self) -> None:
        data, _ = self.sock.recvfrom(65536)
        ihl = (data[0] & 15) * 4
        if len(data) < ihl + 8:
            return
        kind, _, _, ident, seq = struct.unpack_from("!BBHHH", data, ihl)
        if kind == 0 and ident == self.ident and seq in self.times and seq not in self.answered:
            self.answered.add(seq)
            self.rtts.append(time.monotonic() - self.times[seq])


class Sequence:
    def __init__(self, host: str, port: int, rate: float, size: int, gap: float = 0.05):
        self.addr = (host, port)
        self.gap = gap
        self.rate, self.size = rate, max(size, HEAD.size)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)
        self.sent = 0
        self.seen: dict[int, float] = {}     # sequence number -> when its echo came
        self.duplicates = self.reordered = self.corrupted = self.send_errors = 0
        self.highest = -1
        self.t0 = 0.0
        self.last_rx = None             # (time, seq) of the last good echo
        self.gaps: list[dict] = []
        self.longest_gap = 0.0

    def send(self, now: float) -> None:
        if not self.sent:
            self.t0 = now
        try:
            self.sock.sendto(datagram(self.sent, self.size, time.monotonic_ns()), self.addr)
        except OSError:                 # no route, no ARP answer yet, a full buffer: lost
            self.send_errors += 1
        self.sent += 1

    def receive(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                continue                # ICMP errors surfacing on the socket
            if len(data) < HEAD.size or data[:4] != MAGIC:
                self.corrupted += 1
                continue
            seq = HEAD.unpack_from(data)[1]
            if seq >= self.sent or data[HEAD.size:] != datagram(seq, len(data), 0)[HEAD.size:] \
                    or len(data) != self.size:
                self.corrupted += 1
                continue
            if seq in self.seen:
                self.duplicates += 1
                continue
            self.seen[seq] = now
            if seq < self.highest:
                self.reordered += 1
            self.highest = max(self.highest, seq)
            self._gap(now, seq)
            self.last_rx = (now, seq)

    def _gap(self, now: float, seq: int) -> None:
        since, prev = self.last_rx if self.last_rx else (self.t0, -1)
        silence = now - since
        self.longest_gap = max(self.longest_gap, silence)
        if silence > max(10 / self.rate, self.gap):
            self.gaps.append({"start": round(since - self.t0, 4), "seconds": round(silence, 4),
                              "lost": max(0, seq - prev - 1)})

    def report(self) -> dict:
        missing = sorted(set(range(self.sent)) - self.seen.keys())
        run = best = 0
        runs: list[list] = []               # [first lost, how many, the silence around them]
        for i, seq in enumerate(missing):
            run = run + 1 if i and seq == missing[i - 1] + 1 else 1
            best = max(best, run)
            if run == 1:
                runs.append([seq, 1, None])
            else:
                runs[-1][1] += 1
        for item in runs:                   # from the echo before the run to the one after it
            before, after = self.seen.get(item[0] - 1), self.seen.get(item[0] + item[1])
            if before is not None and after is not None:
                item[2] = round(after - before, 4)
        return {"sent": self.sent, "received": len(self.seen), "lost": self.sent - len(self.seen),
                "duplicates": self.duplicates, "reordered": self.reordered, "corrupted": self.corrupted,
                "send_errors": self.send_errors, "rate": self.rate, "size": self.size,
                "longest_gap": round(self.longest_gap, 4), "longest_loss_run": best, "gaps": self.gaps,
                "lost_runs": runs[:1000], "t0": self.t0}


def run(args) -> dict:
    seq = Sequence(args.host, args.port, args.rate, args.size, args.gap_ms / 1000)
    pinger = Pinger(args.host) if args.ping_rate else None
    stop = {"now": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(now=True))
    start = time.monotonic()
    next_send, next_ping = start, start
    end = start + args.seconds if args.seconds else None
    watch = [seq.sock] + ([pinger.sock] if pinger else [])
    while not stop["now"] and (end is None or time.monotonic() < end):
        now = time.monotonic()
        while next_send <= now:
            seq.send(now)
            next_send += 1 / args.rate
        if pinger and next_ping <= now:
            pinger.send()
            next_ping += 1 / args.ping_rate
        wake = min(next_send, next_ping if pinger else next_send)
        try:
            readable, _, _ = select.select(watch, [], [], max(0.0, wake - time.monotonic()))
        except InterruptedError:
            continue
        now = time.monotonic()
        if seq.sock in readable:
            seq.receive(now)
        if pinger and pinger.sock in readable:
            pinger.receive()
    drain_end = time.monotonic() + args.drain
    while time.monotonic() < drain_end:
        readable, _, _ = select.select(watch, [], [], max(0.0, drain_end - time.monotonic()))
        if seq.sock in readable:
            seq.receive(time.monotonic())
        if pinger and pinger.sock in readable:
            pinger.receive()
    out = seq.report()
    out["seconds"] = round(time.monotonic() - start - args.drain, 3)
    if pinger:
        rtts = sorted(pinger.rtts)
        out["ping"] = {"sent": pinger.sent, "answered": len(pinger.answered),
                       "rtt_median_ms": round(rtts[len(rtts) // 2] * 1000, 3) if rtts else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("--port", type=int, default=7)
    ap.add_argument("--rate", type=float, default=1000.0, help="datagrams per second")
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes (at least 20)")
    ap.add_argument("--seconds", type=float, default=0.0, help="0: until SIGTERM or SIGINT")
    ap.add_argument("--ping-rate", type=float, default=0.0, help="pings per second (0: none)")
    ap.add_argument("--drain", type=float, default=1.0, help="seconds to wait for late answers")
    ap.add_argument("--gap-ms", type=float, default=50.0,
                    help="report silences longer than this (and than ten send intervals)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--status", action="store_true",
                    help="only ask the guest's status port (10) and print its line of counters")
    args = ap.parse_args(argv)
    if args.status:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"", (args.host, 10))
            print(s.recv(4096).decode(errors="replace"))
        return 0
    if args.rate <= 0 or not 20 <= args.size <= 8972:
        ap.error("--rate must be positive and --size 20 to 8972")
    out = run(args)
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        ping = out.get("ping")
        print(f"sent {out['sent']} received {out['received']} lost {out['lost']} duplicates "
              f"{out['duplicates']} reordered {out['reordered']} corrupted {out['corrupted']}; longest gap "
              f"{out['longest_gap'] * 1000:.1f} ms, longest loss run {out['longest_loss_run']}"
              + (f"; pings {ping['answered']}/{ping['sent']}" if ping else ""))
        for gap in out["gaps"]:
            print(f"  gap at {gap['start']:.3f} s: {gap['seconds'] * 1000:.1f} ms, {gap['lost']} lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
