"""The C page helpers (migrate.stream._pages), the reader's raw page batches and the data
plane's page records: the same pages as the Python encoder, the same errors as the
Python decoder, and hostile batches rejected before anything is written to guest memory."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from array import array

from migrate.stream._pages import ffi, lib
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
@pytest.mark.parametrize("mode", ["none", "zstd", "auto"])
@pytest.mark.parametrize("pfns", [range(PAGES), [0, 3, 4, 9, 60, 63], range(0, PAGES, 4),
                                  range(1, 4), range(4, 5)])
def test_the_data_plane_writes_what_the_reference_encoder_means(memory, mode, pfns, stable, tmp_path) -> None:
    """The engine's page records (the data plane, in C) read back, through the reader, as
    exactly the pages the stream package's reference encoder would carry."""
    from migrate.engine.sinks import Compression, FileSink
    from migrate.stream import DomainConfig, MemoryLayout, StreamWriter
    path = tmp_path / "pages.hvm"
    writer = StreamWriter()
    with open(path, "wb") as f:
        sink = FileSink(f.fileno())
        try:
            sink.open({Vm.GUEST: [(0, PAGES, memory)]}, 0.0)
            sink.write(writer.start(), 0)
            for record in (DomainConfig({"name": "p"}), MemoryLayout.flat(Vm.GUEST, PAGES),
                           MemoryLayout.flat(Vm.STUB, 0)):
                sink.write(writer.record(record))
            stats = sink.send_pages(Vm.GUEST, array("Q", pfns), Compression(mode), stable)
            sink.end(writer)
        finally:
            sink.close()
    got = [page for batch in decode_stream(path.read_bytes()) if isinstance(batch, PageBatch)
           for page in batch.pages]
    assert sorted(got) == sorted(pages_of(memory, pfns))
    assert stats.zero_pages == sum(1 for pfn in pfns if pfn % 4 == 0)


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

