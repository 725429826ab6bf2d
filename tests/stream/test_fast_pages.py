"""The C page helpers (migrate.stream._pages), the reader's raw page batches and the data
plane's page records: the same pages as the Python encoder, the same errors as the
Python decoder, and hostile batches rejected before anything is written to guest memory."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from array import array

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
            stats = sink.send_pages({Vm.GUEST: array("Q", pfns)}, Compression(mode), stable)
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


def place(mem: bytearray, body: bytes, record_type: int = RecordType.PAGE_DATA, fd: int = -1):
    """The data plane's placement (the restore's) of one batch body into ``mem``."""
    from migrate.dataplane import Range, Target
    target = Target()
    try:
        target.set_space(Vm.GUEST, [Range(0, len(mem) // PAGE_SIZE, mem, fd)])
        return target.place(record_type, body)
    finally:
        target.close()


@pytest.mark.parametrize("through_file", [False, True], ids=["mapping", "memfd"])
def test_placement_writes_and_zeroes(through_file) -> None:
    """Data pages land, a ZERO page over a page that held data zeroes it (through the
    memory file: a hole punched), a ZERO page never written stays untouched."""
    import mmap
    from migrate.dataplane import Range, Target
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 4 * PAGE_SIZE)
    mapping = mmap.mmap(fd, 4 * PAGE_SIZE)
    mem = memoryview(mapping)
    target = Target()
    allocated = lambda: os.fstat(fd).st_blocks * 512 // PAGE_SIZE     # noqa: E731
    try:
        target.set_space(Vm.GUEST, [Range(0, 4, mem, fd if through_file else -1)])
        assert target.place(RecordType.PAGE_DATA, raw_body([(0, 0, 0), (2, 0, 0), (3, 1, 0)], PAGE_A + PAGE_B)) == (3, 1)
        assert allocated() == 2                                  # pages 0 and 2; the ZERO page 3 untouched
        assert os.pread(fd, 4 * PAGE_SIZE, 0) == PAGE_A + bytes(PAGE_SIZE) + PAGE_B + bytes(PAGE_SIZE)
        assert target.place(RecordType.PAGE_DATA, raw_body([(2, 1, 0)])) == (1, 1)   # the newest copy is zero
        assert os.pread(fd, 4 * PAGE_SIZE, 0) == PAGE_A + bytes(3 * PAGE_SIZE)
        assert allocated() == (1 if through_file else 2)         # through the file: page 2 given back
        assert mem == PAGE_A + bytes(3 * PAGE_SIZE)              # and the mapping sees the same
    finally:
        target.close()
        mem.release()
        mapping.close()
        os.close(fd)


@pytest.mark.parametrize("entries, record_type, message", [
    ([(0, 0, 0), (4, 0, 0)], RecordType.PAGE_DATA, "pfn 0x4 outside the memory of space 0"),      # pfn == pages
    ([(0, 0, 0), (1 << 63, 0, 0)], RecordType.PAGE_DATA, "pfn 0x8000000000000000 outside"),        # wraps
    ([(0, 0, 0), (1, 3, 0)], RecordType.PAGE_DATA, "pfn 0x1 has page type 3, not allowed here"),
    ([(0, 2, 0), (1, 0, 0)], RecordType.PAGE_DATA, "pfn 0x0 has page type 2, not allowed here"),
    ([(0, 0, 0), (1, 0, 0)], RecordType.PAGE_DATA_ZSTD, "pfn 0x0 has page type 0, not allowed here"),
    ([(0, 0, 0), (1, 0, 2)], RecordType.PAGE_DATA, "pfn 0x1 entry has nonzero reserved field"),
    ([(1, 0, 0), (1, 0, 0)], RecordType.PAGE_DATA, "pfn 0x1 appears twice in one batch"),
    ([(1, 0, 0), (3, 0, 0), (1, 1, 0)], RecordType.PAGE_DATA, "pfn 0x1 appears twice in one batch"),
    ([(0, 0, 0)], RecordType.PAGE_DATA, "carries 8192 data bytes, 1 pages need 4096"),
])
def test_placement_rejects_before_writing(entries, record_type, message) -> None:
    from migrate.dataplane import DataplaneError
    mem = bytearray(4 * PAGE_SIZE)
    with pytest.raises(DataplaneError, match=message.replace("(", r"\(")):
        place(mem, raw_body(entries, PAGE_A + PAGE_B), record_type)
    assert mem == bytes(4 * PAGE_SIZE)


def test_placement_rejects_oversized_counts_and_short_bodies() -> None:
    from migrate.dataplane import DataplaneError
    mem = bytearray(PAGE_SIZE)
    with pytest.raises(DataplaneError, match="count 1025 outside 1..1024"):
        place(mem, BATCH_HEADER.pack(0, 1025) + bytes(16 * 1025))
    with pytest.raises(DataplaneError, match="body is 4 bytes, shorter than its header"):
        place(mem, b"\0" * 4)
    with pytest.raises(DataplaneError, match="2 entries need 40"):
        place(mem, BATCH_HEADER.pack(0, 2) + bytes(16))



def test_decoded_batches_are_written_in_their_turns() -> None:
    """Two slots decoded side by side: the later batch's write waits until the earlier
    one's is done, so the later copy of a page wins whichever thread comes first."""
    import threading
    from migrate.dataplane import Range, Target
    mem = bytearray(4 * PAGE_SIZE)
    target = Target(2)
    try:
        target.set_space(Vm.GUEST, [Range(0, 4, mem)])
        target.decode(0, RecordType.PAGE_DATA, raw_body([(1, 0, 0)], PAGE_A))     # turn 0
        target.decode(1, RecordType.PAGE_DATA, raw_body([(1, 0, 0)], PAGE_B))     # turn 1
        second = threading.Thread(target=lambda: target.write(1, 1))
        second.start()
        second.join(0.2)
        assert second.is_alive() and mem == bytes(4 * PAGE_SIZE)     # waits for turn 0
        assert target.write(0, 0) == (1, 0)
        second.join(5)
        assert not second.is_alive()
        assert mem[PAGE_SIZE:2 * PAGE_SIZE] == PAGE_B
    finally:
        target.close()


def test_nothing_is_written_after_a_batch_that_failed() -> None:
    """A batch that fails its check passes its turn with fail(); the batches after it,
    however good, are not written, and only the first failure says it is the first."""
    from migrate.dataplane import Range, Target
    mem = bytearray(4 * PAGE_SIZE)
    target = Target(2)
    try:
        target.set_space(Vm.GUEST, [Range(0, 4, mem)])
        target.decode(1, RecordType.PAGE_DATA, raw_body([(2, 0, 0)], PAGE_A))     # turn 1: good
        assert target.fail(0) is True                                            # turn 0 was bad
        assert target.write(1, 1) is None and mem == bytes(4 * PAGE_SIZE)
        assert target.fail(2) is False                                           # not the first
    finally:
        target.close()


def test_a_stopped_target_writes_nothing_and_keeps_no_one_waiting() -> None:
    """stop() releases a write waiting for an earlier turn (it is not written), and a slot
    whose last decode failed holds no batch, not the one decoded before it."""
    import threading
    from migrate.dataplane import DataplaneError, Range, Target
    mem = bytearray(4 * PAGE_SIZE)
    target = Target(2)
    try:
        target.set_space(Vm.GUEST, [Range(0, 4, mem)])
        target.decode(0, RecordType.PAGE_DATA, raw_body([(1, 0, 0)], PAGE_A))
        with pytest.raises(DataplaneError, match="page type 9"):
            target.decode(0, RecordType.PAGE_DATA, raw_body([(2, 9, 0)]))
        with pytest.raises(DataplaneError, match="slot 0 holds no decoded batch"):
            target.write(0)
        target.decode(1, RecordType.PAGE_DATA, raw_body([(3, 0, 0)], PAGE_B))
        results = []
        waiting = threading.Thread(target=lambda: results.append(target.write(1, 5)))   # turn 5 never comes
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive()
        target.stop()
        waiting.join(5)
        assert not waiting.is_alive() and results == [None] and mem == bytes(4 * PAGE_SIZE)
    finally:
        target.close()
