#!/usr/bin/env python3
# Any exception other than StreamError (StreamTruncated included) escaping the reader is a bug.
"""Fuzz the stream reader (specs/stream-format.md).

    python tools/fuzz_stream.py --iterations 100000 [--seed 1]   # plain random mutation
    python tools/fuzz_stream.py --write-corpus DIR                # seed corpus from the writer
    python tools/fuzz_stream.py --atheris [libFuzzer args] [CORPUS_DIR ...]

Both modes feed each input to a StreamReader in two pieces (split at a point the input
picks) and, half of the time, repair the CRC-32 of every record first so that mutations
reach the body decoders instead of stopping at the checksum.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECORD_HEADER = struct.Struct("<IIII")
HEADER_SIZE = 24
INTERESTING = [0, 1, 7, 8, 0x7F, 0x80, 0xFF, 1023, 1024, 1025, 4096, 0x7FFF_FFFF,
               0x8000_0000, 0xFFFF_FFFF, (128 << 20), (128 << 20) + 1]


REAL_STREAM = ROOT / "tests" / "fixtures" / "idle-v2-baseline-amd.hvm"   # a real guest+stub save


def seeds() -> list[bytes]:
    """Writer output (the small sample pair, a minimal stream with every page kind) and
    the real saved guest+stub stream checked in as a test fixture."""
    from migrate.stream import DomainConfig, MemoryLayout, StreamWriter, Vm, ZERO_PAGE
    from migrate.stream.sample import pattern, sample_stream

    writer = StreamWriter()
    minimal = [writer.start(), writer.record(DomainConfig({"name": "fuzz", "k": [1, b"x"]})),
               writer.record(MemoryLayout.flat(Vm.GUEST, 4)), writer.record(MemoryLayout.flat(Vm.STUB, 2))]
    minimal.append(writer.pages(Vm.GUEST, [(0, ZERO_PAGE), (1, pattern(1, 4096))]))
    minimal.append(writer.pages(Vm.STUB, [(1, bytes([9]) * 4096)], compressed=True))
    minimal.append(writer.finish())
    out = [sample_stream(vcpus=1, guest_pages=6, stub_pages=3), b"".join(minimal)]
    if REAL_STREAM.exists():
        out.append(REAL_STREAM.read_bytes())
    return out


def repair_crcs(data: bytes) -> bytes:
    """Recompute the CRC of each record that the framing can still find."""
    out = bytearray(data)
    at = HEADER_SIZE
    while at + RECORD_HEADER.size <= len(out):
        record_type, length, reserved, _ = RECORD_HEADER.unpack_from(out, at)
        body_end = at + RECORD_HEADER.size + length
        if body_end > len(out):
            break
        crc = zlib.crc32(bytes(out[at + RECORD_HEADER.size:body_end]), zlib.crc32(bytes(out[at:at + 12])))
        struct.pack_into("<I", out, at + 12, crc)
        at += RECORD_HEADER.size + ((length + 7) & ~7)
    return bytes(out)


def one_input(data: bytes) -> None:
    """Read one input; StreamError is the only allowed failure."""
    from migrate.stream import DONE, NEED_DATA, StreamError, StreamReader

    split = data[-1] * len(data) // 256 if data else 0
    reader = StreamReader()
    try:
        for piece in (data[:split], data[split:]):
            reader.feed(piece)
            while reader.next_record() not in (NEED_DATA, DONE):
                pass
        reader.eof()
    except StreamError as exc:
        str(exc)  # the message must render too


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 64))
        kind = rng.randrange(7)
        pos = rng.randrange(len(buf))
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = rng.randrange(256)
        elif kind == 2:
            value = rng.choice(INTERESTING)
            width = rng.choice((1, 2, 4, 8))
            buf[pos:pos + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif kind == 3:
            del buf[pos:]
        elif kind == 4:
            end = min(len(buf), pos + rng.randint(1, 512))
            buf[pos:pos] = buf[pos:end]
        elif kind == 5:
            del buf[pos:pos + rng.randint(1, 512)]
        else:
            other = rng.choice(corpus)
            buf[pos:] = other[rng.randrange(len(other)):]
    out = bytes(buf)
    return repair_crcs(out) if rng.random() < 0.5 else out


def run_random(iterations: int, seed: int = 0) -> float:
    """Plain random-mutation fuzzing; returns inputs per second. A bug propagates."""
    rng = random.Random(seed)
    corpus = seeds()
    start = time.perf_counter()
    for _ in range(iterations):
        data = mutate(rng.choice(corpus), rng, corpus)
        try:
            one_input(data)
        except Exception:
            sys.stderr.write(f"BUG on input (hex): {data.hex()}\n")
            raise
    return iterations / max(time.perf_counter() - start, 1e-9)


def run_atheris(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        import migrate.stream  # noqa: F401  (instrumented for coverage)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        data = atheris.Mutate(data, max_size)
        return repair_crcs(data) if seed & 1 else data

    atheris.Setup(argv, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, help="plain random-mutation mode: inputs to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-corpus", type=Path, metavar="DIR")
    parser.add_argument("--atheris", action="store_true", help="run under atheris; other args go to libFuzzer")
    args, rest = parser.parse_known_args()
    if args.write_corpus:
        args.write_corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds()):
            (args.write_corpus / f"seed-{i}.hvmstream").write_bytes(data)
        return 0
    if args.atheris:
        run_atheris([sys.argv[0], *rest])
        return 0
    rate = run_random(args.iterations or 10000, args.seed)
    print(f"{args.iterations or 10000} inputs, {rate:.0f} inputs/s, no bugs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
