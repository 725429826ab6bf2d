#!/usr/bin/env python3
# Any exception other than StreamError (StreamTruncated included) escaping the reader, or
# other than StreamError / RestoreError escaping a restore, is a bug; so is a message that is
# not one short line.
"""Structure-aware, coverage-guided fuzzing of the stream's record layer
(specs/stream-format.md): the reader, its page-batch C checks and the restore engine with
its C scatter, on a fake domain (no KVM).

    python tools/fuzz_stream.py --runs 1000000 [-seed=1] NEW_DIR tests/stream/fuzz-corpus   # atheris
    python tools/fuzz_stream.py --random --iterations 100000 [--seed 1]     # no engine: speed check
    python tools/fuzz_stream.py --write-corpus DIR                          # the seed streams

An input is a whole stream. The mutator splits it into records, changes them as records
(a body through libFuzzer's own mutator, a hostile body made for its type, a type changed,
records duplicated, dropped, swapped or taken from another seed, a header field) and then
frames the result again: every CRC-32, and END's record count, page count, stream length
and digest, are recomputed, so that a mutant reaches the body, ordering and restore checks
instead of stopping at the first checksum. One input in sixteen keeps its broken framing,
so the CRC and END checks are fuzzed too. Why atheris: it is libFuzzer (the engine the
C harnesses of tools/fuzz_c.py use) driving Python with coverage of the Python code, it
accepts a custom mutator, and it installs from a wheel (pyproject's test extra).

The corpus kept in the repository is tests/stream/fuzz-corpus/ (small); the short run in
the test suite is tests/stream/test_fuzz_short.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import random
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import xxhash  # noqa: E402
import zstandard  # noqa: E402

CORPUS = ROOT / "tests" / "stream" / "fuzz-corpus"
RECORD_HEADER = struct.Struct("<IIII")
HEADER = struct.Struct("<8sIIII")
BATCH = struct.Struct("<II")
ENTRY = struct.Struct("<QII")
END_TYPE, PAGE_DATA, PAGE_DATA_ZSTD, DEVICE_STATE, DOMAIN_CONFIG = 0, 3, 4, 0x30, 1
MAX_INPUT = 1 << 16
INTERESTING = [0, 1, 2, 7, 8, 15, 16, 17, 0x7F, 0x80, 0xFF, 1023, 1024, 1025, 4095, 4096, 0xFFFF,
               0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 20, (1 << 20) + 1, 5 << 20, 128 << 20,
               (128 << 20) + 1, 1 << 36, (1 << 64) - 1]
KNOWN_TYPES = [0, 1, 2, 3, 4, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x20, 0x21,
               0x22, 0x23, 0x30, 0x40, 0x41, 0x42, 0x51, 0x8000_0001]
MEMORY_LAYOUT, CPUID_POLICY, MSR_POLICY = 2, 0x41, 0x42


# ---- framing, loosely: what a mutator needs -----------------------------------------------

def split(data: bytes) -> tuple[bytes, list[list]]:
    """(header, [[type, body], ...]) of whatever framing can be found; the rest of the
    input, if any, becomes one last record of type END-or-garbage."""
    if len(data) < HEADER.size or data[:8] != b"\x89HVMPAIR":
        return bytes(HEADER.pack(b"\x89HVMPAIR", 1, 24, 0, 0)), [[DOMAIN_CONFIG, bytes(data)]]
    length = HEADER.unpack_from(data)[2]
    if not 24 <= length <= min(len(data), 4096) or length % 8:
        length = 24
    header, at, records = data[:length], length, []
    while at + RECORD_HEADER.size <= len(data):
        rtype, blen, _, _ = RECORD_HEADER.unpack_from(data, at)
        body = data[at + 16:at + 16 + blen]
        records.append([rtype, body])
        at += 16 + ((blen + 7) & ~7)
    return bytes(header), records


_FRAMED: dict = {}      # (type, body) -> framed record: most records of a mutant are unchanged


def frame(rtype: int, body: bytes) -> bytes:
    key = (rtype, body)
    framed = _FRAMED.get(key)
    if framed is None:
        crc = zlib.crc32(body, zlib.crc32(struct.pack("<III", rtype, len(body), 0)))
        framed = RECORD_HEADER.pack(rtype, len(body), 0, crc) + body + bytes(-len(body) % 8)
        if len(_FRAMED) > 4096:
            _FRAMED.clear()
        _FRAMED[key] = framed
    return framed


def page_count(rtype: int, body: bytes) -> int:
    return BATCH.unpack_from(body)[1] if rtype in (PAGE_DATA, PAGE_DATA_ZSTD) and len(body) >= 8 else 0


def reframe(header: bytes, records: list[list]) -> bytes:
    """The records framed with good CRCs, padding and a fresh END (counts, length, digest)
    after the last record that is not END."""
    out = bytearray(header)
    body_records = [r for r in records if r[0] != END_TYPE]
    for rtype, body in body_records:
        out += frame(rtype, bytes(body))
    pages = sum(page_count(rtype, body) for rtype, body in body_records)
    digest = xxhash.xxh3_128(bytes(out)).digest()
    out += frame(END_TYPE, struct.pack("<QQQ16s", len(body_records), pages, len(out), digest))
    return bytes(out)


# ---- hostile bodies, made for their type ---------------------------------------------------

def hostile_msgpack(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:       # nested: around the depth cap, or past msgpack's own stack
        depth = rng.choice([rng.randint(28, 36), rng.randint(990, 1030), rng.randint(1, 2000)])
        return b"\x81\xa1a" + rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"
    if kind == 1:       # a duplicate key, at the top or inside
        key = rng.choice([b"\xa4name", b"\xa6memory", b"\xa6fields", b"\xa1a"])
        inner = b"\x82" + key + b"\x01" + key + b"\xce\xc0\x00\x00\x00"
        return inner if rng.random() < 0.5 else b"\x81\xa1x" + inner
    if kind == 2:       # a key that is not a str
        return b"\x81" + rng.choice([b"\x01", b"\xc4\x01k", b"\xc0", b"\x90", b"\xcb" + bytes(8)]) + b"\x01"
    if kind == 3:       # lengths that lie or exceed the caps
        head = rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"])
        return b"\x81\xa1a" + head + (rng.choice(INTERESTING) & 0xFFFF_FFFF).to_bytes(4, "big")
    if kind == 4:       # ext types, timestamps
        return b"\x81\xa1a" + rng.choice([b"\xc7\x00\x05", b"\xd6\xff" + bytes(4), b"\xd4\x01\x00"])
    if kind == 5:       # invalid UTF-8 in keys and values
        return b"\x81\xa2\xff\xfe\x01" if rng.random() < 0.5 else b"\x81\xa1a\xa2\xc3\x28"
    if kind == 6:       # a device record with odd fields
        fields = rng.choice([{"q": [{"avail": 7}]}, {"a" * 24: 1}, {"x": -1}, {"x": True}, {"\u00e9": 1},
                             {"rx_fifo": b"x" * rng.randint(0, 64)}, {"x": -(1 << 63)}])
        value = {"device": rng.choice(["uart16550a", "virtio-blk", "", "x" * 30]), "instance": 0,
                 "version": rng.choice([0, 1, 2]), "min_version": rng.choice([0, 1, 3]), "fields": fields}
        return msgpack.packb(value, use_bin_type=True)
    if kind == 7:       # a configuration with wrong types and ranges
        value = {"name": rng.choice(["x", 5, None]), "workload": rng.choice(["idle", "nope", 1]),
                 "memory": rng.choice([16 << 20, 3 << 30, 1, -1, True, 2 ** 64 - 1, 17 << 20]),
                 "args": rng.choice([[0] * 8, [0] * 9, [-1], "x", [True]]), "timer_hz": rng.choice([100, 5000, -1]),
                 "stub": rng.choice([True, False, 1, None]), "disk": rng.choice([None, "/x", "a\0b", 5]),
                 "stub_build": rng.choice(["", "x" * 65, 7])}
        return msgpack.packb(value, use_bin_type=True)
    return bytes(rng.randbytes(rng.randint(0, 40)))


def hostile_batch(rng: random.Random, zstd: bool) -> bytes:
    count = rng.choice([0, 1, 2, 3, 1024, 1025, rng.randint(1, 8)])
    pfns = rng.choice([list(range(count)), [rng.choice(INTERESTING) for _ in range(count)],
                       [3] * count, list(range(count, 0, -1))])
    types = [rng.choice([0, 1, 2, 3, 1]) for _ in range(min(count, 64))] + [1] * max(0, count - 64)
    entries = b"".join(ENTRY.pack(p & (2**64 - 1), t, rng.choice([0] * 15 + [1]))
                       for p, t in zip(pfns, types))
    n_data = sum(1 for t in types if t == (2 if zstd else 0))
    space = rng.choice([0, 0, 1, 2])
    if not zstd:
        data = rng.choice([bytes(4096 * n_data), rng.randbytes(4096 * n_data), b"x"])
        return BATCH.pack(space, count) + entries + data
    payload = rng.randbytes(64) * (64 * n_data)
    frame_ = zstandard.ZstdCompressor(write_content_size=rng.random() < 0.9,
                                      write_checksum=rng.random() < 0.5).compress(payload)
    choice = rng.randrange(8)
    if choice == 0 and frame_[4] & 0x20 and not frame_[4] & 3:      # a dictionary id
        frame_ = frame_[:4] + bytes([frame_[4] | 1, 7]) + frame_[5:]
    elif choice == 1 and frame_[4] & 0x20:                           # a large window
        frame_ = frame_[:4] + bytes([frame_[4] & ~0x20, rng.choice([0x58, 0x60, 0x68, 0xF8])]) + frame_[5:]
    elif choice == 2:                                                # skippable frames
        skip = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"skip"
        frame_ = skip + frame_ if rng.random() < 0.5 else frame_ + skip
    elif choice == 3 and frame_:
        at = rng.randrange(len(frame_))
        frame_ = frame_[:at] + bytes([frame_[at] ^ (1 << rng.randrange(8))]) + frame_[at + 1:]
    return BATCH.pack(space, count) + entries + frame_


def hostile_layout(rng: random.Random) -> bytes:
    """A version 2 MEMORY_LAYOUT: ranges that touch, overlap, are empty, end past the pfn
    limit, or are many; or a version 1 body."""
    if rng.random() < 0.1:
        return struct.pack("<IIQ", rng.choice([0, 1, 2]), 4096, rng.choice(INTERESTING))
    count = rng.choice([0, 1, 2, 3, 64, 65])
    ranges, at = [], rng.choice([0, 0, 1, 0x100000])
    for _ in range(count):
        n = rng.choice([1, 16, 4096, 0, rng.choice(INTERESTING)])
        ranges.append((at & (2**64 - 1), n & (2**64 - 1)))
        at += n + rng.choice([1, 1, 0, -1, 1 << 20])
    body = struct.pack("<IIII", rng.choice([0, 0, 1, 2]), rng.choice([4096, 4096, 8192]), count,
                       rng.choice([0] * 9 + [1]))
    return body + b"".join(struct.pack("<QQ", max(a, 0), n) for a, n in ranges)


def hostile_counted(rng: random.Random, entry_size: int) -> bytes:
    """CPUID_POLICY / MSR_POLICY: counts that lie, entries out of order or repeated."""
    count = rng.choice([0, 1, 2, 255, 256, 257, 1024, 1025])
    entry = rng.randbytes(entry_size)
    entries = entry * min(count, 40) if rng.random() < 0.5 else rng.randbytes(entry_size * min(count, 40))
    return struct.pack("<II", rng.choice([0, 1, 2]), count) + entries


def hostile_body(rtype: int, body: bytes, rng: random.Random) -> bytes:
    if rtype in (DOMAIN_CONFIG, DEVICE_STATE):
        return hostile_msgpack(rng)
    if rtype in (PAGE_DATA, PAGE_DATA_ZSTD):
        return hostile_batch(rng, rtype == PAGE_DATA_ZSTD)
    if rtype == MEMORY_LAYOUT and rng.random() < 0.7:
        return hostile_layout(rng)
    if rtype in (CPUID_POLICY, MSR_POLICY) and rng.random() < 0.5:
        return hostile_counted(rng, 28 if rtype == CPUID_POLICY else 16)
    out = bytearray(body)
    for _ in range(rng.randint(1, 3)):       # interesting values into fixed layouts
        if not out:
            break
        width = rng.choice((1, 2, 4, 8))
        at = rng.randrange(len(out))
        value = rng.choice(INTERESTING) & ((1 << 8 * width) - 1)
        out[at:at + width] = value.to_bytes(width, "little")[:len(out) - at]
    if rng.random() < 0.1:
        out = out[:-1] if rng.random() < 0.5 else out + b"\0"
    return bytes(out)


# ---- the mutator -------------------------------------------------------------------------

def mutate(data: bytes, max_size: int, rng: random.Random, corpus: list[bytes], byte_mutate) -> bytes:
    """One structure-aware mutant of ``data`` (see the module docstring)."""
    header, records = split(data)
    if not records:
        records = [[DOMAIN_CONFIG, b"\x80"]]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(records))
        kind = rng.randrange(12)
        if kind <= 3:                                        # libFuzzer's byte mutator on a body
            body = records[i][1]
            records[i][1] = byte_mutate(body, max(len(body) * 2, 64))
        elif kind <= 5:
            records[i][1] = hostile_body(records[i][0], records[i][1], rng)
        elif kind == 6:
            records[i][0] = rng.choice([*KNOWN_TYPES, records[i][0] ^ 0x8000_0000, rng.randrange(1 << 32)])
        elif kind == 7:
            records.insert(rng.randrange(len(records) + 1), list(records[i]))
        elif kind == 8 and len(records) > 1:
            del records[i]
        elif kind == 9:
            j = rng.randrange(len(records))
            records[i], records[j] = records[j], records[i]
        elif kind == 10:
            _, other = split(rng.choice(corpus))
            if other:
                records.insert(rng.randrange(len(records) + 1), list(rng.choice(other)))
        else:
            fields = list(HEADER.unpack(header[:24]))
            fields[rng.randrange(1, 5)] = rng.choice(INTERESTING) & 0xFFFF_FFFF
            header = HEADER.pack(*fields) + header[24:]
    out = reframe(header, records)
    if rng.random() < 1 / 16:                                # keep some framing broken
        out = bytearray(out)
        at = rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
        out = bytes(out[:rng.randint(at, len(out))])
    return out[:max_size]


# ---- the target --------------------------------------------------------------------------

@functools.cache
def _fake_domain_class():
    from migrate.engine import fake
    from migrate.stub import devstate

    class FakeDomain(fake.FakeDomain):
        def apply(self, state, fresh_stub: bool = False, stub_build: str = "") -> None:
            if state.stub is not None:
                devstate.build(state.stub.devices)     # DeviceStateError: a DomainError-like refusal
            super().apply(state, fresh_stub, stub_build)
    return FakeDomain


def fake_domain(config, **cpu):
    """What restore() needs of a domain, without KVM (migrate.engine.fake.FakeDomain), with
    apply() building the stub's device buffer as a fresh stub's LOAD would. The class is
    made on first use: migrate is imported only once atheris instruments imports."""
    return _fake_domain_class()(config, **cpu)


def host_without_kvm():
    """What a version-1 restore asks of this host (migrate.cpu.this_host), made from the
    sample's CPUID leaves instead of a KVM probe: the fuzzer needs no /dev/kvm."""
    from migrate.cpu import CpuidEntry, HostCpu
    from migrate.stream import Vm
    from migrate.stream.sample import sample_cpu
    cpuid = sample_cpu(Vm.GUEST)[1]
    return HostCpu(cpuid=tuple(CpuidEntry(*e) for e in cpuid.entries),
                   msrs=frozenset({0x10, 0xC000_0080, 0xC000_0100}), tsc_khz=2_000_000)


def check_message(exc: Exception) -> None:
    text = str(exc)
    if "\n" in text or len(text) > 600:
        raise AssertionError(f"error message is not one short line: {text[:200]!r}...")


@contextlib.contextmanager
def fake_host():
    """While it lasts, a version-1 restore asks host_without_kvm() instead of KVM, and a
    relocation's restore (warm) skips the warming of its state paths, which would only
    slow the fuzzer (the patches are undone afterwards: other code in the process keeps
    the real host)."""
    restore_module = importlib.import_module("migrate.engine.restore")   # the package exports a function of that name
    real, real_warm = restore_module.this_host, restore_module.warm.restore_paths
    host = host_without_kvm()
    restore_module.this_host = lambda: host
    restore_module.warm.restore_paths = lambda: None
    try:
        yield
    finally:
        restore_module.this_host, restore_module.warm.restore_paths = real, real_warm


@contextlib.contextmanager
def big_records(on: bool = True):
    """While it lasts (if ``on``), every page batch that has not all come in one piece is
    gathered in a buffer of its own, as only batches of which BIG_RECORD bytes have come
    are otherwise: that path too meets every input."""
    reader_module = importlib.import_module("migrate.stream.reader")
    real = reader_module.BIG_RECORD
    reader_module.BIG_RECORD = 1 if on else real
    try:
        yield
    finally:
        reader_module.BIG_RECORD = real


def one_input(data: bytes) -> None:
    """Read one input; StreamError (and, in a restore, RestoreError) are the allowed failures."""
    from migrate.engine.restore import restore
    from migrate.engine.state import RestoreError
    from migrate.stream import DONE, NEED_DATA, StreamError, StreamReader
    from migrate.stream.reader import BufferPool
    from migrate.stub.devstate import DeviceStateError

    if not data:
        return
    split_at = data[-1] * len(data) // 256
    pieces = (data[:split_at], data[split_at:])
    try:
        if data[-1] & 1:        # the restore engine: raw batches, the C scatter, the collectors
            # warm: a relocation's, which applies the state between pieces
            # bit 4: read as a file is, straight into the reader's buffers
            source = PieceSource(pieces) if data[-1] & 16 else pieces
            with fake_host(), big_records(bool(data[-1] & 8)):
                restore(source, make_domain=fake_domain, fresh_stub=bool(data[-1] & 2), warm=bool(data[-1] & 4))
        else:                   # the reader alone, decoding page batches in Python
            decoded, error = read_all(StreamReader(), pieces)
            kept, _ = read_all(StreamReader(hvm_bodies=True), pieces)
            if kept != decoded:     # the restore's way with context records reads the same
                raise AssertionError(f"hvm_bodies reader differs: {kept[-1]!r} against {decoded[-1]!r}")
            with big_records():
                gathered, _ = read_all(StreamReader(), pieces)
            if gathered != decoded:
                raise AssertionError(f"records gathered apart differ: {gathered[-1]!r} against {decoded[-1]!r}")
            with big_records():     # read into the reader's pooled buffers, as a restore reads a file
                pooled, _ = read_all(StreamReader(pool=BufferPool()), PieceSource(pieces))
            if pooled != decoded:
                raise AssertionError(f"records read into pooled buffers differ: {pooled[-1]!r} against {decoded[-1]!r}")
            if error is not None:
                raise error
    except (StreamError, RestoreError) as exc:
        check_message(exc)
    except DeviceStateError:
        pass                    # the stub refuses it at LOAD: a DomainError for a real domain


class PieceSource:
    """``pieces`` read the way a restore reads a file (FileChunks.readinto, for
    StreamReader.read_from): each read gives at most the rest of the current piece."""

    def __init__(self, pieces) -> None:
        self.pieces = [bytes(piece) for piece in pieces if piece]
        self.at = 0

    def readinto(self, view) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces[0]
        n = min(len(view), len(piece) - self.at)
        view[:n] = piece[self.at:self.at + n]
        self.at += n
        if self.at == len(piece):
            self.pieces.pop(0)
            self.at = 0
        return n

    def close(self) -> None:
        self.pieces = []


def _chunks(reader, pieces):
    """Feed ``reader`` the pieces, or have it read them (StreamReader.read_from) when they
    are a PieceSource; yield after each."""
    if isinstance(pieces, PieceSource):
        while reader.read_from(pieces.readinto):
            yield
        return
    for piece in pieces:
        reader.feed(piece)
        yield


def read_all(reader, pieces) -> tuple[list, Exception | None]:
    """What ``reader`` hands out for ``pieces`` (a list of bytes fed in turn, or a
    PieceSource it reads), context records as (type, vm, vcpu_id, state), each with the
    reader's ``last`` and ``offset`` after it, then the StreamError it raised, if any, as
    its text, words, offset, index and type; and that error (also what
    tests/stream/two_readers.py compares two readers by)."""
    from migrate.stream import DONE, NEED_DATA, HvmState, StreamError

    out: list = []
    try:
        for _ in _chunks(reader, pieces):
            while (record := reader.next_record()) not in (NEED_DATA, DONE):
                if isinstance(record, HvmState):
                    record = (record.type, record.vm, record.vcpu_id, record.decoded().state)
                out.append((record, reader.last, reader.offset))
        reader.eof()
    except StreamError as exc:
        out.append((str(exc), exc.msg, exc.offset, exc.record_index, exc.record_type))
        return out, exc
    return out, None


# ---- seeds and corpus ---------------------------------------------------------------------

def seeds() -> list[bytes]:
    """Small streams that a restore accepts up to END and beyond: a guest with a stub
    (every context record, both devices, every page kind), a guest alone, the sample."""
    from migrate.engine.state import state_records
    from migrate.stream import DeviceState, DomainConfig, HvmState, MemoryLayout, StreamWriter, Vm, ZERO_PAGE
    from migrate.stream.hvm import CODECS, PLATFORM_CODECS
    from migrate.stream.sample import (
        pattern, sample_config, sample_cpu, sample_devices, sample_state, sample_stream,
    )
    del state_records

    def context(vm: Vm) -> list:
        out = [HvmState(t, vm, 0, sample_state(t, t)) for t in CODECS if t not in PLATFORM_CODECS]
        return out + [HvmState(t, vm, None, sample_state(t, t)) for t in PLATFORM_CODECS]

    streams = []
    for stub in (True, False):
        config = {**sample_config(), "stub": stub}
        if not stub:
            del config["stub_build"]
        writer = StreamWriter()
        parts = [writer.start(), writer.record(DomainConfig(config))]
        parts += [writer.record(r) for r in sample_cpu(Vm.GUEST) + (sample_cpu(Vm.STUB) if stub else [])]
        parts += [writer.record(MemoryLayout.flat(Vm.GUEST, 4096)),
                  writer.record(MemoryLayout.flat(Vm.STUB, 2048 if stub else 0))]
        parts.append(writer.pages(Vm.GUEST, [(0, ZERO_PAGE), (1, pattern(1, 4096))]))
        parts += [writer.record(r) for r in context(Vm.GUEST)]
        if stub:
            parts += [writer.record(r) for r in context(Vm.STUB)]
            parts += [writer.record(r) for r in sample_devices()]
            parts.append(writer.pages(Vm.STUB, [(5, bytes([9]) * 4096), (6, ZERO_PAGE)], compressed=True))
        parts.append(writer.pages(Vm.GUEST, [(1, ZERO_PAGE), (7, bytes([7]) * 4096)], compressed=True))
        parts.append(writer.finish())
        streams.append(b"".join(parts))
    streams.append(sample_stream(vcpus=1, guest_pages=3, stub_pages=2))
    streams.append(as_version_1(streams[0]))        # version 1: its decoder table and layout
    return streams


def as_version_1(data: bytes) -> bytes:
    """The same pair as a version 1 writer wrote it: no CPU records, MEMORY_LAYOUT as
    space, page_size, nr_pages (specs/stream-format.md, "Versions")."""
    header, records = split(data)
    header = header[:8] + struct.pack("<I", 1) + header[12:]
    out = []
    for rtype, body in records:
        if rtype in (0x40, 0x41, 0x42):
            continue
        if rtype == MEMORY_LAYOUT:
            space, page_size, count, _ = struct.unpack_from("<IIII", body)
            pages = sum(n for _, n in struct.iter_unpack("<QQ", body[16:16 + 16 * count]))
            body = struct.pack("<IIQ", space, page_size, pages)
        out.append([rtype, body])
    return reframe(header, out)


def corpus_inputs(dirs: list[Path]) -> list[bytes]:
    out = []
    for d in dirs:
        out += [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()]
    return out or seeds()


# ---- drivers --------------------------------------------------------------------------------

def _byte_mutate(rng: random.Random):
    def mutate_bytes(body: bytes, max_size: int) -> bytes:
        buf = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            if not buf or rng.random() < 0.1:
                buf[rng.randrange(len(buf) + 1):0] = rng.randbytes(rng.randint(1, 8))
                continue
            at = rng.randrange(len(buf))
            op = rng.randrange(4)
            if op == 0:
                buf[at] ^= 1 << rng.randrange(8)
            elif op == 1:
                buf[at] = rng.randrange(256)
            elif op == 2:
                del buf[at:at + rng.randint(1, 16)]
            else:
                width = rng.choice((1, 2, 4, 8))
                buf[at:at + width] = (rng.choice(INTERESTING) & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        return bytes(buf[:max_size])
    return mutate_bytes


def run_random(iterations: int, seed: int = 0, corpus: list[bytes] | None = None) -> float:
    """The same mutator and target without a coverage engine; returns inputs per second.
    A bug propagates after the input is printed."""
    rng = random.Random(seed)
    corpus = corpus or seeds()
    byte_mutate = _byte_mutate(rng)
    pool = list(corpus)
    start = time.perf_counter()
    for _ in range(iterations):
        data = mutate(rng.choice(pool), MAX_INPUT, rng, corpus, byte_mutate)
        try:
            one_input(data)
        except Exception:
            sys.stderr.write(f"BUG on input (hex): {data.hex()}\n")
            raise
        if rng.random() < 0.01:
            pool.append(data)
    return iterations / max(time.perf_counter() - start, 1e-9)


def run_atheris(argv: list[str], runs: int | None) -> None:
    import atheris

    # Files named on the command line are inputs to replay (libFuzzer runs each once, as a
    # crash reproducer); otherwise the first path is the directory libFuzzer writes to.
    paths = [Path(a) for a in argv if not a.startswith("-")]
    replays = [p for p in paths if p.is_file()]
    corpus_dirs = [p for p in paths if p not in replays]
    if corpus_dirs and not replays:
        corpus_dirs[0].mkdir(parents=True, exist_ok=True)
    corpus = corpus_inputs([d for d in corpus_dirs if d.is_dir()])
    with atheris.instrument_imports(include=["migrate"]):
        import migrate.engine.restore  # noqa: F401  (instrumented for coverage)
        import migrate.engine.state  # noqa: F401
        import migrate.stream  # noqa: F401
        import migrate.stub.devstate  # noqa: F401

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return mutate(data, max_size, random.Random(seed), corpus, atheris.Mutate)

    args = [sys.argv[0], *argv, f"-max_len={MAX_INPUT}"]
    if runs is not None:
        args.append(f"-runs={runs}")
    atheris.Setup(args, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", action="store_true", help="no coverage engine: mutate and run")
    parser.add_argument("--iterations", type=int, default=10000, help="--random: inputs to try")
    parser.add_argument("--seed", type=int, default=0, help="--random: the mutator's seed")
    parser.add_argument("--runs", type=int, help="atheris: stop after this many inputs")
    parser.add_argument("--write-corpus", type=Path, metavar="DIR")
    args, rest = parser.parse_known_args()
    if args.write_corpus:
        args.write_corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds()):
            (args.write_corpus / f"seed-{i}.hvmstream").write_bytes(data)
        return 0
    if args.random:
        rate = run_random(args.iterations, args.seed, corpus_inputs([CORPUS]) if CORPUS.is_dir() else None)
        print(f"{args.iterations} inputs, {rate:.0f} inputs/s, no bugs")
        return 0
    run_atheris(rest, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
