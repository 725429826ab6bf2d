"""Hypothesis round-trip properties: any valid state, batch or chunking survives a round
trip, and arbitrary bytes only ever raise StreamError."""

from __future__ import annotations

import struct
import tracemalloc
from unittest import mock

import cffi
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from migrate.stream import (
    DONE, NEED_DATA, ZERO_PAGE, DeviceState, DomainConfig, HvmState, MemoryLayout, PageBatch,
    RecordType, StreamError, StreamReader, StreamWriter, Vm, decode_stream, encode_stream,
)
from migrate.stream.hvm import CODECS, PLATFORM_CODECS, Layout, MsrCodec, ScalarCodec
from migrate.stream import reader as reader_module
from migrate.stream.reader import BufferPool
from migrate.stream.framing import frame
from two_readers import read_into, read_pieces
from migrate.stream.sample import sample_cpu, sample_stream

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT_RANGE = {"B": (0, 2**8 - 1), "H": (0, 2**16 - 1), "I": (0, 2**32 - 1), "Q": (0, 2**64 - 1),
             "q": (-(2**63), 2**63 - 1)}


def layout_states(layout: Layout) -> st.SearchStrategy:
    parts = {}
    for f in layout.fields:
        if not f.carried:
            parts[f.name] = st.just(f.zero())
            continue
        one = layout_states(f.nested) if f.nested else st.integers(*INT_RANGE[f.code])
        parts[f.name] = st.lists(one, min_size=f.count, max_size=f.count) if f.count else one
    return st.fixed_dictionaries(parts)


def states(record_type: RecordType) -> st.SearchStrategy:
    codec = CODECS[record_type]
    if isinstance(codec, MsrCodec):
        return st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), max_size=40)
    if isinstance(codec, ScalarCodec):
        code = codec.layout.fields[0].code
        return st.binary(min_size=codec.struct.size - 8, max_size=codec.struct.size - 8) \
            if code.endswith("s") else st.integers(0, 2**32 - 1)
    if record_type is RecordType.VCPU_XCRS:
        return xcrs_states()
    if record_type is RecordType.VCPU_PDPTRS:      # flags: only bit 0 is defined
        return layout_states(codec.layout).map(lambda state: {**state, "flags": state["flags"] & 1})
    return layout_states(codec.layout)


@st.composite
def xcrs_states(draw) -> dict:
    """VCPU_XCRS as readers accept it: nr_xcrs 0..16, flags 0, unused entries zero."""
    state = draw(layout_states(CODECS[RecordType.VCPU_XCRS].layout))
    nr = draw(st.integers(0, 16))
    state["nr_xcrs"], state["flags"] = nr, 0
    for xcr in state["xcrs"][nr:]:
        xcr["xcr"] = xcr["value"] = 0
    return state


@st.composite
def hvm_records(draw) -> HvmState:
    record_type = draw(st.sampled_from(list(CODECS)))
    vcpu_id = None if record_type in PLATFORM_CODECS else draw(st.integers(0, 4095))
    return HvmState(record_type, draw(st.sampled_from(list(Vm))), vcpu_id, draw(states(record_type)))


@FAST
@given(hvm_records())
def test_hvm_records_round_trip(record: HvmState) -> None:
    assert HvmState.unpack_as(record.type, record.pack()) == record


@FAST
@given(hvm_records(), st.data())
def test_check_body_refuses_what_unpack_as_refuses(record: HvmState, data) -> None:
    """The restore's reader keeps HVM bodies (check_body): it accepts and refuses exactly
    what the decoding reader does, and its records decode to the same; bodies of any
    length, with any byte changed, included."""
    body = bytearray(record.pack())
    if data.draw(st.booleans()):
        body = body[:data.draw(st.integers(0, len(body)))] + data.draw(st.binary(max_size=9))
    if body and data.draw(st.booleans()):
        body[data.draw(st.integers(0, len(body) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        want = HvmState.unpack_as(record.type, bytes(body))
    except StreamError as exc:
        with pytest.raises(StreamError) as got:
            HvmState.check_body(record.type, bytes(body))
        assert got.value.msg == exc.msg
    else:
        kept = HvmState.check_body(record.type, bytes(body))
        assert kept.body == bytes(body) and kept.decoded() == want


pages = st.one_of(st.just(ZERO_PAGE), st.binary(min_size=1, max_size=64).map(lambda b: (b * 4096)[:4096]))


@st.composite
def page_batches(draw) -> tuple[Vm, list[tuple[int, bytes]], bool]:
    pfns = draw(st.lists(st.integers(0, 255), min_size=1, max_size=40, unique=True))
    return draw(st.sampled_from(list(Vm))), [(pfn, draw(pages)) for pfn in pfns], draw(st.booleans())


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
configs = st.dictionaries(st.text(max_size=10), json_like, max_size=6)
names = st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=23)
device_fields = st.dictionaries(names, st.integers(0, 2**64 - 1) | st.binary(max_size=40), max_size=6)


@FAST
@given(st.lists(page_batches(), max_size=4), configs, st.lists(hvm_records(), max_size=6, unique_by=lambda r: (r.type, r.vm, r.vcpu_id)),
       device_fields)
def test_streams_round_trip(batches, config, context, fields) -> None:
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig(config)),
             writer.record(MemoryLayout.flat(Vm.GUEST, 256)), writer.record(MemoryLayout.flat(Vm.STUB, 256))]
    parts += [writer.record(record) for record in context]
    parts.append(writer.record(DeviceState("dev", 1, 2, 1, fields)))
    for space, batch, compressed in batches:
        parts.append(writer.pages(space, batch, compressed))
    parts.append(writer.finish())
    data = b"".join(parts)
    records = decode_stream(data)
    assert records[3:3 + len(context)] == context
    assert records[0] == DomainConfig(config)
    got = [(r.space, list(r.pages), r.compressed) for r in records if isinstance(r, PageBatch)]
    assert got == [(space, batch, compressed) for space, batch, compressed in batches]
    assert encode_stream(records) == data


SMALL = sample_stream(vcpus=1, guest_pages=6, stub_pages=3)


@pytest.mark.parametrize("record_type", [RecordType.PAGE_DATA, 0x80007777])   # a page batch, an unknown optional type
def test_a_record_header_alone_allocates_nothing_for_its_body(record_type) -> None:
    """The body length is checked against the type's cap before anything is allocated from
    it, and a page batch gets a buffer of its own only once BIG_RECORD bytes of it have come:
    a header claiming the largest body its type may have costs no more than what came."""
    length = reader_module.CAPS[2].get(record_type, reader_module.MAX_RECORD_BODY)
    reader = StreamReader(raw_pages="bodies")
    reader.feed(StreamWriter().start())
    assert reader.next_record() is NEED_DATA and reader.header is not None
    tracemalloc.start()
    try:
        reader.feed(struct.pack("<IIII", record_type, length, 0, 0) + bytes(1000))
        assert reader.next_record() is NEED_DATA
        assert tracemalloc.get_traced_memory()[1] < 64 << 10
    finally:
        tracemalloc.stop()


def batch_stream(batches, where: int, flip: int) -> bytes:
    """A stream of these page batches (space, batch, compressed), with the byte at
    ``where`` (modulo the length) XORed with ``flip``."""
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "x"})),
             writer.record(MemoryLayout.flat(Vm.GUEST, 256)), writer.record(MemoryLayout.flat(Vm.STUB, 256))]
    parts += [writer.pages(space, batch, compressed) for space, batch, compressed in batches]
    data = bytearray(b"".join(parts + [writer.finish()]))
    if flip:
        data[where % len(data)] ^= flip
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(page_batches(), min_size=1, max_size=4), st.integers(0, 2**20), st.integers(0, 255),
       st.sampled_from([1, 100, 5000]), st.sampled_from([False, True, "bodies"]),
       st.lists(st.integers(1, 9000), min_size=1, max_size=6))
def test_records_gathered_in_their_own_buffer_read_the_same(batches, where, flip, big, raw, sizes) -> None:
    """A page batch that has not all come is gathered in a buffer of its own once BIG_RECORD
    bytes of it are here (StreamReader.feed): with the threshold at a few bytes, so that
    nearly every batch goes that way, a stream of page batches, perhaps with a byte changed
    anywhere, reads as with the default (which these small records never reach): the same
    records, positions and error, in whatever pieces it comes."""
    data = batch_stream(batches, where, flip)
    want = read_pieces(data, sizes, raw_pages=raw)
    with mock.patch.object(reader_module, "BIG_RECORD", big):
        got = read_pieces(data, sizes, raw_pages=raw)
    assert got == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(page_batches(), min_size=1, max_size=4), st.integers(0, 2**20), st.integers(0, 255),
       st.sampled_from([1, 100, 5000]), st.sampled_from([False, True, "bodies"]),
       st.lists(st.integers(1, 9000), min_size=1, max_size=6))
def test_a_reader_reading_into_pooled_buffers_reads_the_same(batches, where, flip, big, raw, sizes) -> None:
    """A reader that reads the stream itself (StreamReader.read_from, as a restore reads a
    file), gathering page batches in a BufferPool's buffers, hands out what a reader fed
    the same bytes does: the same records, positions and error. The batches' bodies are
    compared only at the end, so a buffer the reader gave back to its pool while a batch
    it handed out still shows it (``raw_pages``) would show another batch's bytes."""
    data = batch_stream(batches, where, flip)
    want = read_pieces(data, sizes, raw_pages=raw)
    with mock.patch.object(reader_module, "BIG_RECORD", big):
        got = read_into(data, sizes, raw_pages=raw, pool=BufferPool(keep=1))
    assert got == want


def test_a_buffer_pool_takes_a_buffer_back_unless_the_view_given_back_is_held() -> None:
    """A buffer comes back out of the pool once given back, but not while the view given
    back is still exported (as the data plane's hold on a batch's body exports it); at
    most ``keep`` free buffers are kept; anything else is ignored. (Other views of the
    buffer are the caller's to drop first: the pool cannot see them.)"""
    pool = BufferPool(keep=1)
    first = pool.get(100)
    base = first.obj
    first[:5] = b"hello"
    pool.put(first)
    again = pool.get(BufferPool.SIZE)
    assert again.obj is base and again[:5] == b"hello"          # the same memory, as it was
    held = memoryview(again)
    exported = again[:10]
    pin = cffi.FFI().from_buffer("uint8_t[]", exported)         # as Target.decode holds a body
    pool.put(exported)
    assert pool.get(10).obj is not base                         # not given out again
    del pin
    pool.put(held)
    other = pool.get(10)
    pool.put(pool.get(10))
    pool.put(other)                                             # a second free one: not kept
    assert len(pool._free) == 1
    pool.put(memoryview(bytearray(10)))                         # not the pool's: ignored
    pool.put(b"bytes")
    assert len(pool._free) == 1


@FAST
@given(st.lists(st.integers(1, 600), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_records(sizes) -> None:
    reader, records, at, i = StreamReader(), [], 0, 0
    while at < len(SMALL):
        size = sizes[i % len(sizes)]
        reader.feed(SMALL[at:at + size])
        at, i = at + size, i + 1
        while (record := reader.next_record()) not in (NEED_DATA, DONE):
            records.append(record)
    reader.eof()
    assert records == decode_stream(SMALL)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, len(SMALL)))
def test_garbage_raises_only_stream_errors(noise: bytes, at: int) -> None:
    for data in (noise, SMALL[:at] + noise, SMALL[:8] + struct.pack("<I", 1) + noise):
        try:
            decode_stream(data)
        except StreamError:
            pass


@st.composite
def bent_context(draw) -> list[bytes]:
    """HVM context records framed one by one, some of them bent: a byte of the body
    changed (most often in its first 24 bytes: the VM, the vCPU id, XCRS's count and flags,
    PDPTRS's flags), the body cut or grown, the header's reserved field, CRC or padding
    spoiled, or a record repeated."""
    out: list[bytes] = []
    for record in draw(st.lists(hvm_records(), min_size=1, max_size=10)):
        body = bytearray(record.pack())
        how = draw(st.integers(0, 6))
        if how == 1:
            body[draw(st.integers(0, min(len(body), 24) - 1))] ^= draw(st.integers(1, 255))
        elif how == 2:
            body[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
        elif how == 3:
            body = body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=9))
        framed = bytearray(frame(record.type, bytes(body)))
        if how == 4:
            framed[draw(st.sampled_from([8, 12, len(framed) - 1]))] ^= 1     # reserved, CRC, padding
        out.append(bytes(framed))
        if out and draw(st.integers(0, 4)) == 0:
            out.append(draw(st.sampled_from(out)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bent_context(), st.sampled_from([(256, 256), (256, 0), None]), st.booleans(),
       st.lists(st.integers(1, 700), min_size=1, max_size=8))
def test_the_restore_reader_reads_context_as_the_decoding_reader(context, layouts, policy, sizes) -> None:
    """The restore's reader (HVM bodies kept, runs of context records checked in C by
    hvm.BodyScan) hands out the same records as the decoding reader and stops at the same
    error with the same words, offset, index and type, whatever the records hold, in
    whatever pieces the stream comes. ``layouts``: the guest's and stub's pages (None: the
    context comes before any MEMORY_LAYOUT); ``policy``: the CPU records come first, so
    VCPU_MSRS must match the MSR_POLICY."""
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "x"}))]
    if policy:          # for each VM with pages (a writer refuses them for an absent one)
        parts += [writer.record(record) for vm, pages in zip(Vm, layouts or (1, 1)) if pages
                  for record in sample_cpu(vm)]
    if layouts is not None:
        parts += [writer.record(MemoryLayout.flat(vm, pages)) for vm, pages in zip(Vm, layouts)]
    data = b"".join(parts + context)
    want = read_pieces(data, sizes)
    assert read_pieces(data, sizes, raw_pages="bodies", hvm_bodies=True) == want
