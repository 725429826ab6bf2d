"""This machine's limits for moving guest memory, measured now, for the benchmarks to print
beside their own figures (timings here are noisy: compare ratios taken in one run).

Each takes the bytes to move (not empty memory: zero pages are nearly free everywhere) and
returns bytes per second:

- ``memcpy``: memoryview assignment into memory already faulted in (how the data plane
  copies; ``bytearray[:] = bytes`` goes through a temporary copy and is several times slower);
- ``memcpy_fresh``: the same into fresh memory, one page fault per 4 KiB;
- ``tcp_loopback``: one TCP connection on 127.0.0.1, sender and receiver threads in this
  process (the sockets release the GIL), 4 MiB writes and reads;
- ``aes_gcm``: ``openssl speed -evp aes-256-gcm`` on 16 KiB blocks, one core (a TLS record
  is at most 16 KiB; a loopback TLS byte is encrypted once and decrypted once here);
- ``zstd``: zstd level 1 compression of the sample in 1 MiB chunks, and its ratio.
"""
from __future__ import annotations

import mmap
import os
import re
import socket
import subprocess
import threading
import time

MIB = 1 << 20


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memcpy(sample: bytes) -> float:
    dst = bytearray(len(sample))
    view = memoryview(dst)
    view[:] = sample                                    # fault it in first
    return len(sample) / _timed(lambda: view.__setitem__(slice(None), sample))


def memcpy_fresh(sample: bytes) -> float:
    fd = os.memfd_create("limit")
    try:
        os.ftruncate(fd, len(sample))
        with mmap.mmap(fd, len(sample)) as fresh:
            view = memoryview(fresh)
            try:
                return len(sample) / _timed(lambda: view.__setitem__(slice(None), sample))
            finally:
                view.release()
    finally:
        os.close(fd)


def tcp_loopback(sample: bytes, total: int = 1 << 30) -> float:
    """Bytes per second through one loopback TCP connection, ``total`` bytes of ``sample``."""
    chunk = memoryview(sample)[:4 * MIB]
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        got = [0]

        def receive():
            conn, _ = srv.accept()
            buf = bytearray(4 * MIB)
            with conn:
                while (n := conn.recv_into(buf)):
                    got[0] += n

        reader = threading.Thread(target=receive)
        reader.start()
        with socket.create_connection(("127.0.0.1", port)) as out:
            t0 = time.perf_counter()
            sent = 0
            while sent < total:
                out.sendall(chunk)
                sent += len(chunk)
            out.shutdown(socket.SHUT_WR)
            reader.join()
            seconds = time.perf_counter() - t0
    return got[0] / seconds


def aes_gcm() -> float | None:
    """One core's AES-256-GCM rate on 16 KiB blocks (openssl speed), None without openssl."""
    try:
        out = subprocess.run(["openssl", "speed", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "1"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^AES-256-GCM\s+([\d.]+)k", out, re.MULTILINE | re.IGNORECASE)
    return float(m.group(1)) * 1000 if m else None


def zstd(sample: bytes, level: int = 1) -> tuple[float, float]:
    """(compression bytes per second, ratio) of ``sample`` in 1 MiB chunks."""
    import zstandard
    cctx = zstandard.ZstdCompressor(level=level)
    out = [0]

    def run():
        for i in range(0, len(sample), MIB):
            out[0] += len(cctx.compress(sample[i:i + MIB]))

    return len(sample) / _timed(run), len(sample) / max(1, out[0])


def gbps(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate / 1e9:.2f} GB/s"


class HugePagePool:
    """Context manager: at least ``n`` free 2 MiB huge pages for its duration (the pool
    raised through sysctl vm.nr_hugepages, as root, and put back after), each written
    once first: on these hosts (themselves virtual machines) memory never touched before
    costs the outer hypervisor's faults on first use (a fresh pool filled at 0.4 GB/s, a
    used one at 5.7 GB/s), and a host's reserved pool is a used one after its first guest."""
    PATH = "/proc/sys/vm/nr_hugepages"

    def __init__(self, n: int):
        self.n, self.before = n, None

    def __enter__(self):
        from migrate.kvm import huge_pages_free
        free, total = huge_pages_free()
        if free < self.n:
            self.before = total
            with open(self.PATH, "w") as f:
                f.write(str(total + self.n - free))
            free, _ = huge_pages_free()
            if free < self.n:
                raise SystemExit(f"the kernel gave {free} free huge pages of the {self.n} asked for")
        if self.n:
            size = self.n * (2 << 20)
            fd = os.memfd_create("warm", os.MFD_HUGETLB)
            try:
                os.ftruncate(fd, size)
                with mmap.mmap(fd, size) as mem:
                    for at in range(0, size, 2 << 20):
                        mem[at] = 1
            finally:
                os.close(fd)
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            with open(self.PATH, "w") as f:
                f.write(str(self.before))
