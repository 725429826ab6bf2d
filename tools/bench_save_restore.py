"""Save and restore of a guest with mixed memory, beside this machine's limits measured in
the same run.

Guest RAM (default 1 GiB) of a paused `idle` domain is written from the host in 1 MiB
stripes: half of it (512 MiB) stays untouched, a quarter is text-like, a quarter random
(so the touched half compresses about 2x with zstd-1). Then, for each compression mode,
`save_to_file` and a restore until the guest runs again (`restore`, then resume and the
vCPU's first entry), with the file in the page cache. The save's time is until its stream
is written (into the page cache: what a checkpoint's guest waits for); "on disk after" adds
the fsync of the file and of its directory. Each figure is the median of ``--runs`` runs
(the modes taking turns, each run starting with another: a mode's save does not always
follow the same one's writeback), the slowest beside it.

    .venv/bin/python tools/bench_save_restore.py [--memory-mib 1024] [--modes none,auto,zstd:1] [--runs 5] [--hugepages]

Limits printed first, measured now: memcpy into memory already faulted in and into fresh
memory (a page fault per 4 KiB here), pwrite into a fresh memfd (how restores place pages:
the touched pages written at that rate are the floor a restore is printed against),
zstd-1 on the touched half, and a 1 GiB file written and read back through the page cache.
Beside each restore: the same file read and checked as a restore reads it, placing nothing.
Targets (issue 11): save <= 0.25 s, restore until running <= 0.3 s, uncompressed >= 3 GB/s
of guest RAM each way.
"""
from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
import random
import statistics
import tempfile
import time

import zstandard

from migrate.domain import Domain, DomainConfig
from migrate.engine import file_chunks, restore, save_to_file
from migrate.stream import DONE, NEED_DATA, HvmState, StreamReader
from migrate.stream.pages import RawPageBatch
from migrate.stream.reader import BufferPool

import machine_limits  # noqa: E402  (tools/)

MIB = 1 << 20
WORDS = ("the of and to in is page memory guest host stream record domain kernel save "
         "restore migrate dirty round zero batch vcpu clock timer ledger pass error "
         "value status config device stub request reply offset length").split()


def text_blocks(count: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    blocks = []
    for _ in range(count):
        out = bytearray()
        while len(out) < MIB:
            line = " ".join(rnd.choices(WORDS, k=rnd.randint(4, 14)))
            out += f"{rnd.randint(0, 99999):05d} {line} {rnd.random():.6f}\n".encode()
        blocks.append(bytes(out[:MIB]))
    return blocks


def stripes(size: int):
    """(offset, 1 MiB) of the touched stripes: of every four, the third text-like and the
    fourth random; the first two stay untouched."""
    texts = text_blocks(16)
    rnd = random.Random(2)
    for i in range(size // MIB):
        if i % 4 == 2:
            yield i * MIB, texts[i // 4 % len(texts)]
        elif i % 4 == 3:
            yield i * MIB, rnd.randbytes(MIB)


def fill(mem: memoryview) -> None:
    for at, block in stripes(len(mem)):
        mem[at:at + MIB] = block


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_limits(touched: bytes, directory: str) -> dict:
    """What this machine does, now, with the bytes a save moves."""
    n = len(touched)
    out = {}
    dst = bytearray(n)
    view = memoryview(dst)
    view[:] = touched                                   # fault it in first
    out["memcpy"] = n / timed(lambda: view.__setitem__(slice(None), touched))
    fd = os.memfd_create("limit")
    os.ftruncate(fd, n)
    fresh = mmap.mmap(fd, n)
    fview = memoryview(fresh)
    out["memcpy into fresh memory"] = n / timed(lambda: fview.__setitem__(slice(None), touched))
    fview.release()
    fresh.close()
    os.close(fd)
    fd = os.memfd_create("limit")
    os.ftruncate(fd, n)
    out["pwrite into a fresh memfd"] = n / timed(
        lambda: [os.pwrite(fd, memoryview(touched)[i:i + 4 * MIB], i) for i in range(0, n, 4 * MIB)])
    os.close(fd)
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    frames = []
    out["zstd-1 compress"] = n / timed(
        lambda: frames.extend(cctx.compress(touched[i:i + 4 * MIB]) for i in range(0, n, 4 * MIB)))
    out["zstd-1 ratio"] = n / sum(len(f) for f in frames)
    dctx = zstandard.ZstdDecompressor()
    out["zstd decompress"] = n / timed(lambda: [dctx.decompress(f) for f in frames])
    path = os.path.join(directory, f"limit-{os.getpid()}")
    try:
        def write():
            with open(path, "wb", buffering=0) as f:
                for i in range(0, n, 4 * MIB):
                    f.write(memoryview(touched)[i:i + 4 * MIB])
        out["file write (page cache)"] = n / timed(write)

        def read():
            buf = bytearray(4 * MIB)
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        out["file read (page cache)"] = n / timed(read)
    finally:
        os.unlink(path)
    return out


def read_alone(path: str) -> float:
    """Seconds to read and check the file as a restore reads it, placing nothing: the
    restore's reading thread, apart from the pages' placement."""
    t0 = time.perf_counter()
    pool = BufferPool()
    reader = StreamReader(raw_pages="bodies", hvm_bodies=True, pool=pool)
    source = file_chunks(path)
    while reader.read_from(source.readinto):
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            if isinstance(record, HvmState):
                reader.take_run()
            elif isinstance(record, RawPageBatch):
                pool.put(record.body)           # as the restore's placer gives it back
    reader.eof()
    return time.perf_counter() - t0


def run_mode(mode: str, size: int, directory: str, huge: bool = False) -> tuple[float, float, int, float, float]:
    config = DomainConfig("bench", "idle", size, stub=False, hugepages=huge)
    src = Domain.boot(config)
    path = os.path.join(directory, f"bench-{os.getpid()}.hvm")
    try:
        fill(src.memory)
        stats = save_to_file(src, path, compress=mode)
        src.destroy()
        file_size = os.path.getsize(path)
        read_s = read_alone(path)
        t0 = time.perf_counter()
        dom, _ = restore(file_chunks(path), make_domain=lambda cfg, **cpu: Domain(
            dataclasses.replace(cfg, hugepages=huge), **cpu))
        dom.resume()
        dom.entered(5.0)
        restored = time.perf_counter() - t0
        dom.destroy()
        return stats.seconds, stats.synced, file_size, restored, read_s
    finally:
        if src.status != "destroyed":
            src.destroy()
        if os.path.exists(path):
            os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--modes", default="none,auto,zstd:1", help="compression modes to run, comma-separated")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--hugepages", action="store_true",
                    help="guest RAM of 2 MiB huge pages (the pool is raised as needed, as root)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each mode; the figures are their medians")
    args = ap.parse_args()
    size = args.memory_mib * MIB
    touched = b"".join(block for _, block in stripes(size))
    limits = measure_limits(touched, args.dir)
    print(f"guest RAM {size >> 20} MiB: half untouched, a quarter text-like, a quarter random "
          f"({len(touched) >> 20} MiB touched)")
    print("machine, now: " + ", ".join(f"{k} {v:.2f}x" if k.endswith("ratio") else f"{k} {gbps(v, 1)}"
                                        for k, v in limits.items()))
    pool = machine_limits.HugePagePool(2 * size // (2 << 20) + 8 if args.hugepages else 0)
    modes = [mode.strip() for mode in args.modes.split(",")]
    runs: dict[str, list] = {mode: [] for mode in modes}
    with pool:
        for i in range(args.runs):      # the modes take turns, each run starting with another
            for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                runs[mode].append(run_mode(mode, size, args.dir, args.hugepages))
    # a restore writes the touched pages into fresh guest memory: at the pwrite rate measured
    # above, that alone takes this long (the floor of an uncompressed restore here)
    floor = len(touched) / limits["pwrite into a fresh memfd"]
    print(f"medians of {args.runs} runs (the slowest in brackets); writing the touched pages into fresh "
          f"memory alone takes {floor:.3f} s here:")
    for mode, results in runs.items():
        save_s, synced_s, file_size, restore_s, read_s = (statistics.median(r[i] for r in results) for i in range(5))
        slow_save, slow_restore = max(r[0] for r in results), max(r[3] for r in results)
        print(f"{mode:>7}: save {save_s:.3f} s [{slow_save:.3f}] ({gbps(size, save_s)} of RAM, "
              f"{gbps(file_size, save_s)} of file, "
              f"{file_size / (limits['file write (page cache)'] * save_s):.2f}x the file write limit), "
              f"on disk after {synced_s:.3f} s; "
              f"file {file_size / MIB:.0f} MiB = {100 * file_size / size:.0f}% of RAM; "
              f"restore until running {restore_s:.3f} s [{slow_restore:.3f}] ({gbps(size, restore_s)} of RAM, "
              f"{restore_s / floor:.2f}x that floor); the file read and checked alone {read_s:.3f} s "
              f"({gbps(file_size, read_s)})")


if __name__ == "__main__":
    main()
