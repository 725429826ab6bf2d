"""The C page helpers (migrate.stream._pages) and the reader's raw page batches: the
same bytes as the Python encoder, the same errors as the Python decoder, and hostile
batches rejected before anything is written to guest memory."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from migrate.stream._pages import ffi, lib
from migrate.engine.batches import encode_pages
from migrate.stream import PAGE_SIZE, PageBatch, PageType, RecordType, StreamError, StreamReader, Vm
from migrate.stream.pages import (
    BATCH_HEADER, PAGE_ENTRY, RawPageBatch, decode_batch, decode_raw_batch, encode_batch,
)
from migrate.stream.reader import DONE, decode_stream

GOLDEN = Path(__file__).parent / "fixtures" / "golden-v1.hvmstream"
PAGES = 64


@pytest.fixture()
def memory() -> memoryview:
    mem = bytearray(PAGES * PAGE_SIZE)
    for pfn in range(PAGES):
        kind = pfn % 4
        at = pfn * PAGE_SIZE
        if kind == 1:
            mem[at:at + PAGE_SIZE] = os.urandom(PAGE_SIZE)
        elif kind == 2:
            mem[at:at + PAGE_SIZE] = ((b"page %d text " % pfn) * PAGE_SIZE)[:PAGE_SIZE]
        elif kind == 3:
            mem[at + PAGE_SIZE - 1] = 1          # one byte at the very end
    return memoryview(mem)


def pages_of(mem: memoryview, pfns) -> list:
    return [(pfn, bytes(mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])) for pfn in pfns]


@pytest.mark.parametrize("stable", [False, True], ids=["copied", "in-place"])
@pytest.mark.parametrize("level", [None, 1, 3])
@pytest.mark.parametrize("pfns", [range(PAGES), [0, 3, 4, 9, 60, 63], range(0, PAGES, 4),
                                  range(1, 4), range(4, 5)])
def test_encode_pages_matches_encode_batch(memory, level, pfns, stable) -> None:
    batch = encode_pages(Vm.GUEST, memory, pfns, level, stable=stable)
    want = encode_batch(Vm.GUEST, pages_of(memory, pfns), level is not None, level or 3)
    assert batch.body == want
    assert batch.zero == sum(1 for pfn in pfns if pfn % 4 == 0)
    assert batch.max_pfn == max(pfns)


def test_gather_rejects_pfn_out_of_range_before_reading(memory) -> None:
    with pytest.raises(ValueError, match="pfn 0x40 is outside memory of 64 pages"):
        encode_pages(Vm.GUEST, memory, [1, 2, PAGES], None)
    out = bytearray(16 * 2)
    n = lib.hvm_gather_pages(ffi.from_buffer("uint8_t[]", memory), PAGES,
                             ffi.new("uint64_t[]", [5, 1 << 60]), 2, PageType.NORMAL,
                             ffi.from_buffer("uint8_t[]", out), ffi.new("uint8_t[]", 2 * PAGE_SIZE))
    assert n == -2 and out == bytes(32)     # nothing written for the good pfn either


def raw_body(entries: list, data: bytes = b"", space: int = Vm.GUEST) -> bytes:
    return (BATCH_HEADER.pack(space, len(entries))
            + b"".join(PAGE_ENTRY.pack(*entry) for entry in entries) + data)


PAGE_A, PAGE_B = b"\x11" * PAGE_SIZE, b"\x22" * PAGE_SIZE
HOSTILE = {
    "type 3": [(1, 0, 0), (2, 3, 0)],
    "type 2 in PAGE_DATA": [(1, 2, 0), (2, 0, 0)],
    "type 0xffffffff": [(1, 0xFFFFFFFF, 0)],
    "reserved": [(1, 1, 0), (2, 0, 1)],
    "duplicate ascending then back": [(1, 0, 0), (5, 1, 0), (1, 0, 0)],
    "duplicate adjacent": [(7, 0, 0), (7, 0, 0)],
    "data length": [(1, 0, 0), (2, 0, 0), (3, 0, 0)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_raw_decode_gives_the_python_errors(name) -> None:
    body = raw_body(HOSTILE[name], PAGE_A + PAGE_B)
    with pytest.raises(StreamError) as want:
        decode_batch(RecordType.PAGE_DATA, body)
    with pytest.raises(StreamError) as got:
        decode_raw_batch(RecordType.PAGE_DATA, body)
    assert got.value.msg == want.value.msg


def test_raw_decode_duplicates_out_of_order_many() -> None:
    entries = [(pfn, 1, 0) for pfn in range(1000, 0, -1)] + [(500, 1, 0)]
    with pytest.raises(StreamError, match="pfn 0x1f4 appears twice"):
        decode_raw_batch(RecordType.PAGE_DATA, raw_body(entries))
    ok = decode_raw_batch(RecordType.PAGE_DATA, raw_body(entries[:-1]))
    assert (ok.count, ok.zero, ok.max_pfn) == (1000, 1000, 1000)


@pytest.mark.parametrize("compressed", [False, True])
def test_raw_decode_matches_decode_batch(memory, compressed) -> None:
    pfns = [0, 1, 2, 5, 6, 33, 63]
    body = encode_batch(Vm.STUB, pages_of(memory, pfns), compressed)
    record_type = RecordType.PAGE_DATA_ZSTD if compressed else RecordType.PAGE_DATA
    raw = decode_raw_batch(record_type, body)
    assert raw.batch() == decode_batch(record_type, body)
    assert (raw.space, raw.count, raw.zero, raw.max_pfn) == (Vm.STUB, 7, 1, 63)


def test_reader_raw_pages_on_golden() -> None:
    data = GOLDEN.read_bytes()
    plain = [r for r in decode_stream(data) if isinstance(r, PageBatch)]
    reader = StreamReader(raw_pages=True)
    reader.feed(data)
    raw = []
    while (record := reader.next_record()) is not DONE:
        assert not isinstance(record, PageBatch)
        if isinstance(record, RawPageBatch):
            raw.append(record.batch())
    assert raw == plain and plain


def scatter(mem: bytearray, written: bytearray, body: bytes, data_type: int = PageType.NORMAL):
    count = BATCH_HEADER.unpack_from(body)[1]
    entries = body[BATCH_HEADER.size:BATCH_HEADER.size + 16 * count]
    data = body[BATCH_HEADER.size + 16 * count:]
    bad = ffi.new("uint32_t *")
    n = lib.hvm_scatter_pages(ffi.from_buffer("uint8_t[]", mem), len(mem) // PAGE_SIZE,
                              ffi.from_buffer("uint8_t[]", written), ffi.from_buffer("uint8_t[]", entries),
                              count, data_type, ffi.from_buffer("uint8_t[]", data), len(data), bad)
    return n, bad[0]


def test_scatter_writes_and_zeroes() -> None:
    mem, written = bytearray(4 * PAGE_SIZE), bytearray(4)
    assert scatter(mem, written, raw_body([(0, 0, 0), (2, 0, 0), (3, 1, 0)], PAGE_A + PAGE_B))[0] == 1
    assert mem == PAGE_A + bytes(PAGE_SIZE) + PAGE_B + bytes(PAGE_SIZE) and written == b"\1\0\1\0"
    assert scatter(mem, written, raw_body([(2, 1, 0)]))[0] == 1    # the newest copy is zero
    assert mem == PAGE_A + bytes(3 * PAGE_SIZE) and written == b"\1\0\0\0"


@pytest.mark.parametrize("entries, data_type, code, bad", [
    ([(0, 0, 0), (4, 0, 0)], PageType.NORMAL, lib.HVM_BAD_PFN, 1),         # pfn == pages
    ([(0, 0, 0), (1 << 63, 0, 0)], PageType.NORMAL, lib.HVM_BAD_PFN, 1),   # pfn * 4096 wraps
    ([(0, 0, 0), (1, 3, 0)], PageType.NORMAL, lib.HVM_BAD_TYPE, 1),
    ([(0, 2, 0), (1, 0, 0)], PageType.NORMAL, lib.HVM_BAD_TYPE, 0),
    ([(0, 0, 0), (1, 0, 0)], PageType.COMPRESSED, lib.HVM_BAD_TYPE, 0),
    ([(0, 0, 0), (1, 0, 0)], PageType.ZERO, lib.HVM_BAD_TYPE, 0),          # not a data type
    ([(0, 0, 0), (1, 0, 2)], PageType.NORMAL, lib.HVM_BAD_RESERVED, 1),
    ([(1, 0, 0), (1, 0, 0)], PageType.NORMAL, lib.HVM_DUPLICATE, 1),
    ([(0, 0, 0)], PageType.NORMAL, lib.HVM_BAD_LENGTH, 0),                 # two pages of data
])
def test_scatter_rejects_before_writing(entries, data_type, code, bad) -> None:
    mem, written = bytearray(4 * PAGE_SIZE), bytearray(4)
    assert scatter(mem, written, raw_body(entries, PAGE_A + PAGE_B), data_type) == (-code, bad)
    assert mem == bytes(4 * PAGE_SIZE) and written == bytes(4)


def test_scatter_rejects_oversized_count() -> None:
    mem, written = bytearray(PAGE_SIZE), bytearray(1)
    bad = ffi.new("uint32_t *")
    entries = ffi.new("uint8_t[]", 16 * 1025)
    assert lib.hvm_scatter_pages(ffi.from_buffer("uint8_t[]", mem), 1, ffi.from_buffer("uint8_t[]", written),
                                 entries, 1025, PageType.NORMAL, ffi.NULL, 0, bad) == -lib.HVM_BAD_COUNT

