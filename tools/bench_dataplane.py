"""The data plane alone on loopback: pages of one memory file sent by a Sender over N TCP
connections (plain or TLS 1.3) to a Receiver that places them into another memory file,
as a relocation's round 0 does, without a guest, beside the machine's limits measured in
the same run (tools/machine_limits.py).

    .venv/bin/python tools/bench_dataplane.py                       # 1 GiB random, 1 and 2 channels
    .venv/bin/python tools/bench_dataplane.py --content mixed --compress auto --channels 2

``--content``: random (incompressible), mixed (a quarter zero, a quarter text-like, half
random) or text. The destination memory file is fresh (every page faults in as it is
placed, as on a real destination) unless ``--prefault`` populates it first; ``--hugepages``
makes it of 2 MiB huge pages (a fault per 2 MiB; the pages are copied in). Each figure
is the median of ``--runs``.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.dataplane import AUTO, RAW, ZSTD, Output, Range, Receiver, Sender, TlsContext  # noqa: E402
from migrate.host import tls  # noqa: E402

import machine_limits  # noqa: E402  (tools/)

MIB = 1 << 20
PAGE = 4096
TOKEN = bytes(range(32))
MODES = {"none": RAW, "auto": AUTO, "zstd": ZSTD}


def fill(mem: mmap.mmap, content: str) -> None:
    rnd = random.Random(1)
    words = b"the page memory guest host stream record domain kernel save restore dirty round ".split()
    text = b" ".join(rnd.choice(words) for _ in range(MIB // 5))[:MIB]
    text = text + b" " * (MIB - len(text))
    for i in range(len(mem) // MIB):
        kind = {"random": 3, "text": 2}.get(content, i % 4)
        if kind == 3 or (content == "mixed" and kind == 1):
            mem[i * MIB:(i + 1) * MIB] = rnd.randbytes(MIB)
        elif kind == 2:
            mem[i * MIB:(i + 1) * MIB] = text
        # kind 0 (mixed): left zero


def memfd(size: int, name: str, huge: bool = False) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_HUGETLB if huge else 0))
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def one(src: mmap.mmap, pages: int, channels: int, secure: bool, tls_dirs, mode: int,
        prefault: bool, huge: bool) -> float:
    """Seconds to send every page and have it placed."""
    dfd, dst = memfd(pages * PAGE, "dst", huge)
    if prefault:
        os.posix_fallocate(dfd, 0, pages * PAGE)
        dst.madvise(mmap.MADV_POPULATE_WRITE) if hasattr(mmap, "MADV_POPULATE_WRITE") else None
    server_tls = TlsContext(True, tls_dirs[0]) if secure else None
    client_tls = TlsContext(False, tls_dirs[1]) if secure else None
    rx = Receiver(channels, 2, TOKEN, server_tls, timeout=60)
    rx.set_space(0, [Range(0, pages, dst, -1 if huge else dfd, 0)])     # huge: copied, no write()
    rx.set_space(1, [Range(0, 8, None)])
    rx.open()
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        for i in range(channels):
            conn, _ = listener.accept()
            accepted.append(conn)
            rx.add(i, conn.fileno())

    t = threading.Thread(target=accept)
    t.start()
    links = [socket.create_connection(listener.getsockname()) for _ in range(channels)]
    t.join()
    outs = [Output(s.fileno(), client_tls, "127.0.0.1", 60) for s in links]
    for i, out in enumerate(outs):
        out.channel_header(2, i, TOKEN)
    tx = Sender(outs, channels)
    tx.set_space(0, [(0, pages, src)])
    try:
        t0 = time.perf_counter()
        tx.send(0, array("Q", range(pages)), mode=mode, stable=True)
        for out in outs:
            out.sync(0, final=True)
        if not rx.wait(0, final=True, timeout=120):
            raise SystemExit(f"the receiver did not finish: {rx.error()}")
        seconds = time.perf_counter() - t0
        if dst[:] != src[:]:
            raise SystemExit("the destination differs from the source")
        return seconds
    finally:
        tx.close()
        for out in outs:
            out.close()
        rx.close()
        for s in links + accepted:
            s.close()
        listener.close()
        dst.close()
        os.close(dfd)
        for ctx in (server_tls, client_tls):
            if ctx is not None:
                ctx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--content", choices=("random", "mixed", "text"), default="random")
    ap.add_argument("--channels", default="1,2", help="comma-separated channel counts")
    ap.add_argument("--compress", choices=sorted(MODES), default="none")
    ap.add_argument("--prefault", action="store_true", help="populate the destination file first")
    ap.add_argument("--hugepages", action="store_true",
                    help="the destination of 2 MiB huge pages (the pool is raised as needed, as root)")
    ap.add_argument("--runs", type=int, default=3)
    opts = ap.parse_args()
    size = opts.mib * MIB
    sfd, src = memfd(size, "src")
    fill(src, opts.content)
    sample = src[:min(size, 256 * MIB)]
    lim = {"memcpy": machine_limits.memcpy(sample), "memcpy into fresh memory": machine_limits.memcpy_fresh(sample),
           "TCP loopback": machine_limits.tcp_loopback(sample), "AES-256-GCM, one core": machine_limits.aes_gcm()}
    lim["zstd-1"], ratio = machine_limits.zstd(sample)
    print(f"{opts.mib} MiB {opts.content}, compress {opts.compress}, destination "
          f"{'prefaulted' if opts.prefault else 'fresh'}{' huge pages' if opts.hugepages else ''}; machine, now: "
          + ", ".join(f"{k} {machine_limits.gbps(v)}" for k, v in lim.items()) + f" (zstd-1 ratio {ratio:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp, machine_limits.HugePagePool(opts.mib // 2 + 8 if opts.hugepages else 0):
        tls.keygen(Path(tmp), ["127.0.0.1", "src"])
        tls_dirs = (Path(tmp) / "127.0.0.1", Path(tmp) / "src")
        for channels in (int(c) for c in opts.channels.split(",")):
            for secure in (False, True):
                times = [one(src, size // PAGE, channels, secure, tls_dirs, MODES[opts.compress], opts.prefault,
                             opts.hugepages)
                         for _ in range(opts.runs)]
                rate = size / statistics.median(times)
                print(f"{channels} channel{'s' if channels > 1 else ''}, {'TLS  ' if secure else 'plain'}: "
                      f"{rate / 1e9:.2f} GB/s of RAM (median of {opts.runs}; best {size / min(times) / 1e9:.2f}) "
                      f"= {rate / lim['TCP loopback']:.2f}x TCP loopback, {rate / lim['memcpy']:.2f}x memcpy, "
                      f"{rate / lim['memcpy into fresh memory']:.2f}x memcpy into fresh memory", flush=True)
    src.close()
    os.close(sfd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
