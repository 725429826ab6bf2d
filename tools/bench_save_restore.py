"""Save and restore throughput of a guest with mixed memory, beside this machine's
memcpy and zstd speed measured in the same run.

Guest RAM (default 1 GiB) of a paused `idle` domain is filled from the host in 1 MiB
stripes: half zero, a quarter text-like (words and numbers), a quarter random. Then
`save_to_file` (zstd level 1, the engine default, unless --level) and `restore` from that file.

    .venv/bin/python tools/bench_save_restore.py [--memory-mib 1024] [--dir /tmp]

Targets (issue 4): save and restore each > 1 GB/s of guest RAM with zstd; file < 40%
of guest RAM.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import zstandard

from migrate.domain import Domain, DomainConfig
from migrate.engine import file_chunks, restore, save_to_file

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


def fill(mem: memoryview) -> None:
    texts = text_blocks(16)
    for i in range(len(mem) // MIB):
        kind = i % 4
        at = i * MIB
        if kind == 2:
            mem[at:at + MIB] = texts[i // 4 % len(texts)]
        elif kind == 3:
            mem[at:at + MIB] = os.urandom(MIB)


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def machine_limits(mem: memoryview, level: int) -> dict:
    sample = bytes(mem[:256 * MIB])          # the same mix
    dst = bytearray(len(sample))
    dst[:] = sample                          # fault the pages in first
    t0 = time.perf_counter()
    dst[:] = sample
    memcpy = len(sample) / (time.perf_counter() - t0)
    cctx = zstandard.ZstdCompressor(level=level or 1, write_content_size=True)
    nonzero = b"".join(sample[i:i + MIB] for i in range(0, len(sample), MIB) if i // MIB % 4 >= 2)
    t0 = time.perf_counter()
    frames = [cctx.compress(nonzero[i:i + 4 * MIB]) for i in range(0, len(nonzero), 4 * MIB)]
    zc = len(nonzero) / (time.perf_counter() - t0)
    dctx = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    for f in frames:
        dctx.decompress(f)
    zd = len(nonzero) / (time.perf_counter() - t0)
    return {"memcpy": memcpy, "zstd_compress_nonzero": zc, "zstd_decompress_nonzero": zd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--level", type=int, default=1, help="zstd level (0 = no compression; engine default 1)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size = args.memory_mib * MIB
    src = Domain.boot(DomainConfig("bench", "idle", size, stub=False))
    path = os.path.join(args.dir, f"bench-{os.getpid()}.hvm")
    try:
        fill(src.memory)
        limits = machine_limits(src.memory, args.level)
        print(f"guest RAM {size >> 20} MiB: half zero, 1/4 text, 1/4 random")
        print("machine: memcpy {}; zstd-{} compress {} (1 thread, non-zero part); "
              "zstd decompress {} (output)".format(rate(1, 1 / limits["memcpy"]), args.level or 1,
                                                    *(rate(1, 1 / v) for v in list(limits.values())[1:])))
        level = args.level or None
        stats = save_to_file(src, path, compress=level)
        src.destroy()
        file_size = os.path.getsize(path)
        print(f"save:    {stats.seconds:.3f} s  {rate(size, stats.seconds)} of guest RAM  "
              f"file {file_size / MIB:.1f} MiB = {100 * file_size / size:.1f}% of RAM "
              f"({stats.pages_sent} pages sent, {stats.pages_zero} zero)")
        t0 = time.perf_counter()
        dom, rstats = restore(file_chunks(path), make_domain=Domain)
        seconds = time.perf_counter() - t0
        print(f"restore: {seconds:.3f} s  {rate(size, seconds)} of guest RAM  "
              f"(stream read at {rate(file_size, seconds)})")
        dom.destroy()
        ok_save = size / stats.seconds > 1e9
        ok_restore = size / seconds > 1e9
        print(f"targets: save > 1 GB/s {'met' if ok_save else 'MISSED'}, restore > 1 GB/s "
              f"{'met' if ok_restore else 'MISSED'}, file < 40% {'met' if file_size < 0.4 * size else 'MISSED'}")
    finally:
        if src.status != "destroyed":
            src.destroy()
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
