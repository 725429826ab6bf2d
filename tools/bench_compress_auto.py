#!/usr/bin/env python3
"""``--compress auto`` against raw and zstd-1, on links of known rates: the data plane's
Sender (two encoding threads, one output, as a file save has) writes the pages of one
memory either to /dev/null paced by the data plane at each ``--links`` rate (0: unpaced,
an output that takes anything at once), or (``--tcp``) into a TCP connection on loopback
whose reader drains it at that rate (0: as fast as it can), a link with a socket buffer in
front of it. For each content (text-like,
mixed: half text and half random by MiB, random) it prints the input rate of each mode
(best of ``--runs``), how many batches auto sent compressed, and whether auto came within
10% of the better fixed mode; beside zstd-1's and memcpy's rates on that content, measured
in the same run (tools/machine_limits.py).

    .venv/bin/python tools/bench_compress_auto.py                 # 256 MiB, links 0.2, 0.5, 1 GB/s and unpaced
    .venv/bin/python tools/bench_compress_auto.py --mib 512 --links 0.1,0.3 --runs 3
    .venv/bin/python tools/bench_compress_auto.py --tcp --links 0.1,0.3,0
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import socket
import sys
import threading
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.dataplane import AUTO, RAW, ZSTD, Output, Sender  # noqa: E402

import machine_limits  # noqa: E402  (tools/)
from bench_save_restore import text_blocks  # noqa: E402  (tools/)

MIB = 1 << 20
PAGE = 4096
MODES = (("raw", RAW), ("zstd", ZSTD), ("auto", AUTO))


def memory(kind: str, size: int) -> mmap.mmap:
    texts, rnd = text_blocks(16), random.Random(3)
    mem = mmap.mmap(-1, size)
    for i in range(size // MIB):
        text = kind == "text" or (kind == "mixed" and i % 2 == 0)
        mem[i * MIB:(i + 1) * MIB] = texts[i % len(texts)] if text else rnd.randbytes(MIB)
    return mem


def send(mem: mmap.mmap, mode: int, rate: float, sink: int | None) -> tuple[float, int, int]:
    """Seconds to send every page, batches sent compressed, batches in all: into ``sink``
    paced at ``rate``, or (``sink`` None) into a TCP connection drained at ``rate``."""
    pages = len(mem) // PAGE
    link = None if sink is not None else tcp_link(rate)
    out = Output(sink if link is None else link[0].fileno())
    tx = Sender([out], 2, rate if link is None else 0.0)
    tx.set_space(0, [(0, pages, mem)])
    try:
        t0 = time.perf_counter()
        st = tx.send(0, array("Q", range(pages)), mode=mode)
        if link is not None:            # the link's time: until the reader has it all
            link[0].shutdown(socket.SHUT_WR)
            link[1].join()
        return time.perf_counter() - t0, st.zstd_batches, st.batches
    finally:
        tx.close()
        out.close()
        if link is not None:
            link[0].close()


def tcp_link(rate: float) -> tuple[socket.socket, threading.Thread]:
    """A connected socket whose peer, a thread, reads at most ``rate`` bytes a second (0:
    as fast as it can) until the socket is shut down."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()

    def drain():
        t0, got = time.monotonic(), 0
        with theirs:
            while chunk := theirs.recv(1 << 20):
                got += len(chunk)
                if rate:
                    time.sleep(max(0.0, got / rate - (time.monotonic() - t0)))

    reader = threading.Thread(target=drain)
    reader.start()
    return ours, reader


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--links", default="0.2,0.5,1,0", help="GB/s, comma-separated (0: unpaced)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tcp", action="store_true", help="links of TCP on loopback drained at each rate")
    opts = ap.parse_args()
    size = opts.mib * MIB
    links = [float(x) * 1e9 for x in opts.links.split(",")]
    sink = os.open(os.devnull, os.O_WRONLY)
    within = total = 0
    for kind in ("text", "mixed", "random"):
        mem = memory(kind, size)
        sample = bytes(mem[:min(size, 64 * MIB)])
        zrate, zratio = machine_limits.zstd(sample)
        print(f"{kind}: zstd-1 {machine_limits.gbps(zrate)} one thread, ratio {zratio:.2f}x; "
              f"memcpy {machine_limits.gbps(machine_limits.memcpy(sample))}")
        for rate in links:
            figures = {}
            for name, mode in MODES:
                runs = [send(mem, mode, rate, None if opts.tcp else sink) for _ in range(opts.runs)]
                seconds, zstd_batches, batches = min(runs)
                figures[name] = (size / seconds, zstd_batches, batches)
            best = max(figures["raw"][0], figures["zstd"][0])
            ok = figures["auto"][0] >= 0.9 * best
            within, total = within + ok, total + 1
            link = (f"{rate / 1e9:g} GB/s" if rate else "unpaced") + (" TCP" if opts.tcp else "")
            print(f"   link {link:>9}: raw {figures['raw'][0] / 1e9:5.2f}  zstd {figures['zstd'][0] / 1e9:5.2f}  "
                  f"auto {figures['auto'][0] / 1e9:5.2f} GB/s ({figures['auto'][1]}/{figures['auto'][2]} batches "
                  f"compressed) = {figures['auto'][0] / best:.2f}x the better fixed mode{'' if ok else '  <- missed'}",
                  flush=True)
        mem.close()
    os.close(sink)
    print(f"auto within 10% of the better fixed mode in {within} of {total} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
