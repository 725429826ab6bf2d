"""Corrupt one thing at a time and assert the exact error (Firecracker's snapshot tests):
class, message, offset, record index and record type."""

from __future__ import annotations

import struct

import msgpack
import pytest
import zstandard

from migrate.stream import (
    DONE, NEED_DATA, Creator, DeviceState, DomainConfig, HvmState, MemoryLayout, PageBatch, RecordType, StreamError,
    StreamReader, StreamTruncated, StreamWriter, Vm, decode_stream,
)
from migrate.stream.framing import frame
from migrate.stream.pages import PAGE_ENTRY, BATCH_HEADER, PageType, encode_batch
from migrate.stream.records import CHANNEL_SYNC_SIZE, END, MAX_RECORD_BODY, RECORD_HEADER, End, padded
from migrate.stream.sample import pattern, sample_cpu, sample_state

PAGE = pattern(7, 4096)


def error_of(data: bytes, **kwargs) -> StreamError:
    with pytest.raises(StreamError) as info:
        decode_stream(data, **kwargs)
    return info.value


def expect(data: bytes, cls: type, msg: str, offset: int | None, index: int | None, rtype: int | None) -> None:
    err = error_of(data)
    assert type(err) is cls, err
    assert msg in err.msg, err
    assert (err.offset, err.record_index, err.record_type) == (offset, index, rtype), err
    assert f"offset {offset if offset is not None else '-'}" in str(err)


def finish(started, *raw: tuple[int, bytes, int]) -> tuple[bytes, int]:
    """The started stream plus raw records and END; returns it and the first raw offset."""
    writer, parts = started
    first = len(b"".join(parts))
    parts = parts + [writer.raw(t, body, pages) for t, body, pages in raw] + [writer.finish()]
    return b"".join(parts), first


def fix_crc(data: bytes, at: int) -> bytes:
    """Recompute the CRC of the record at `at` after a deliberate body change."""
    record_type, length, _, _ = RECORD_HEADER.unpack_from(data, at)
    body = data[at + 16:at + 16 + length]
    fixed = frame(record_type, body)[:16]
    return data[:at] + fixed + data[at + 16:]


# ---- truncation ---------------------------------------------------------------------------

def test_truncated_at_every_record_boundary(sample: bytes, spans) -> None:
    for index, (at, _, _, _) in enumerate(spans):
        expect(sample[:at], StreamTruncated, "input ended before END", at, index, None)


def test_truncated_mid_record(sample: bytes, spans) -> None:
    for index, (at, rtype, length, total) in enumerate(spans):
        expect(sample[:at + 9], StreamTruncated, "incomplete record", at + 9, index, None)
        cut = at + 16 + length // 2 if length else at + 16
        if cut < at + total:
            expect(sample[:cut], StreamTruncated, "incomplete record", cut, index, rtype)


@pytest.mark.parametrize("cut", [0, 1, 8, 23])
def test_truncated_in_header(sample: bytes, cut: int) -> None:
    expect(sample[:cut], StreamTruncated, "inside the stream header", cut, None, None)


def test_missing_end(sample: bytes, spans) -> None:
    at = spans[-1][0]
    expect(sample[:at], StreamTruncated, "before END", at, len(spans) - 1, None)


def test_truncation_error_names_position_in_str(sample: bytes, spans) -> None:
    at, rtype, _, _ = spans[5]
    err = error_of(sample[:at + 20])
    assert str(err).endswith(f"(offset {at + 20}, record 5, type {RecordType(rtype).name}(0x{rtype:08x}))")


# ---- bit flips ------------------------------------------------------------------------------

def test_flipped_bit_in_every_record_body(sample: bytes, spans) -> None:
    for index, (at, rtype, length, _) in enumerate(spans):
        if not length:
            continue
        pos = at + 16 + length // 2
        data = sample[:pos] + bytes([sample[pos] ^ 0x10]) + sample[pos + 1:]
        expect(data, StreamError, "CRC-32 mismatch", at, index, rtype)


def test_flipped_bit_in_every_crc_field(sample: bytes, spans) -> None:
    for index, (at, rtype, _, _) in enumerate(spans):
        data = sample[:at + 12] + bytes([sample[at + 12] ^ 1]) + sample[at + 13:]
        expect(data, StreamError, "CRC-32 mismatch", at, index, rtype)


def test_flipped_bit_in_type_field(sample: bytes, spans) -> None:
    at, rtype, _, _ = spans[3]
    data = sample[:at] + bytes([sample[at] ^ 4]) + sample[at + 1:]
    expect(data, StreamError, "CRC-32 mismatch", at, 3, rtype ^ 4)


def test_any_flipped_bit_is_an_error(sample: bytes) -> None:
    for pos in range(0, len(sample), 509):
        for bit in (0, 7):
            data = sample[:pos] + bytes([sample[pos] ^ (1 << bit)]) + sample[pos + 1:]
            error_of(data)


# ---- header ---------------------------------------------------------------------------------

def test_wrong_magic(sample: bytes) -> None:
    expect(b"\x89HVX" + sample[4:], StreamError, "bad magic", 0, None, None)
    expect(b"GIF8", StreamError, "bad magic", 0, None, None)  # caught before the header is whole


@pytest.mark.parametrize("version,word", [(3, "newer"), (0, "older"), (0xFFFF_FFFF, "newer")])
def test_unreadable_version(sample: bytes, version: int, word: str) -> None:
    data = sample[:8] + struct.pack("<I", version) + sample[12:]
    expect(data, StreamError, f"stream format version {version} is {word} than this reader reads "
           "(versions 1..2)", 0, None, None)


@pytest.mark.parametrize("length", [16, 28, 4104, 0xFFFF_FFF8])
def test_bad_header_length(sample: bytes, length: int) -> None:
    expect(sample[:12] + struct.pack("<I", length) + sample[16:], StreamError, "header length", 0, None, None)


def test_unknown_incompat_flag(sample: bytes) -> None:
    expect(sample[:16] + struct.pack("<I", 4) + sample[20:], StreamError,
           "unknown incompatible header flags 0x4", 0, None, None)


def test_longer_header_and_compat_flags_are_accepted(started) -> None:
    from migrate.stream import Header
    writer = StreamWriter()
    data = writer.start(Header(header_length=40, compat_flags=0x8000_0000))
    data += writer.record(DomainConfig({}))
    data += writer.record(MemoryLayout.flat(Vm.GUEST, 1)) + writer.record(MemoryLayout.flat(Vm.STUB, 1))
    data += writer.finish()
    records = decode_stream(data)
    assert records[-1].stream_bytes == len(data) - 16 - END.size


# ---- framing --------------------------------------------------------------------------------

def test_oversized_length_fails_before_the_body_arrives(sample: bytes, spans) -> None:
    at, rtype, _, _ = spans[2]
    head = struct.pack("<IIII", rtype, MAX_RECORD_BODY + 1, 0, 0)
    reader = StreamReader()
    reader.feed(sample[:at] + head)
    with pytest.raises(StreamError, match=r"exceeds 48 \(this type's cap\)") as info:
        while reader.next_record() is not NEED_DATA:
            pass
    assert (info.value.offset, info.value.record_index, info.value.record_type) == (at, 2, rtype)


def test_unknown_type_may_have_the_largest_body_but_no_more(sample: bytes, spans) -> None:
    at = spans[2][0]
    for rtype in (0x8000_7777, 0x7777):
        head = struct.pack("<IIII", rtype, MAX_RECORD_BODY + 1, 0, 0)
        reader = StreamReader()
        reader.feed(sample[:at] + head)
        with pytest.raises(StreamError, match=r"exceeds 134217728 \(MAX_RECORD_BODY\)"):
            while reader.next_record() is not NEED_DATA:
                pass
        reader = StreamReader()
        reader.feed(sample[:at] + struct.pack("<IIII", rtype, MAX_RECORD_BODY, 0, 0))
        while (record := reader.next_record()) is not NEED_DATA:
            pass                        # waits for the body: within the cap


def test_nonzero_record_reserved(sample: bytes, spans) -> None:
    at, rtype, _, _ = spans[1]
    data = sample[:at + 8] + b"\x01" + sample[at + 9:]
    expect(data, StreamError, "record header reserved field is 0x1", at, 1, rtype)


def test_nonzero_padding(sample: bytes, spans) -> None:
    index, (at, rtype, length, total) = next((i, s) for i, s in enumerate(spans) if s[2] % 8)
    pos = at + total - 1
    expect(sample[:pos] + b"\x01" + sample[pos + 1:], StreamError, "record padding is not zero", at, index, rtype)


def test_unknown_mandatory_record_rejected(started) -> None:
    data, at = finish(started, (0x1234, b"what is this", 0))
    expect(data, StreamError, "unknown mandatory record type", at, 3, 0x1234)
    assert "unknown mandatory 0x00001234" in str(error_of(data))


def test_unknown_optional_record_skipped(started) -> None:
    data, at = finish(started, (0x8000_1234, b"skip me", 0), (0x8000_0777, b"", 0))
    reader = StreamReader()
    reader.feed(data)
    records = []
    while (record := reader.next_record()) is not DONE:
        records.append(record)
    assert [type(r).__name__ for r in records] == ["DomainConfig", "MemoryLayout", "MemoryLayout", "End"]
    assert reader.skipped == [(at, 0x8000_1234), (at + 24, 0x8000_0777)]
    assert records[-1].record_count == 5


@pytest.mark.parametrize("rtype, length, msg", [
    (0x8000_0050, CHANNEL_SYNC_SIZE, "the optional bit is set on a mandatory record type"),
    (RecordType.CHANNEL_SYNC, CHANNEL_SYNC_SIZE, "CHANNEL_SYNC in the main stream"),
    (RecordType.CHANNEL_SYNC, 1000, f"record body length 1000 exceeds {CHANNEL_SYNC_SIZE}"),
])
def test_the_optional_bit_on_channel_sync_is_refused_and_channel_sync_named(started, rtype, length, msg) -> None:
    """CHANNEL_SYNC is a mandatory type of version 2 that only a channel stream carries:
    0x80000050 is reserved like every other twin (it was skipped), and CHANNEL_SYNC in the
    main stream is refused by name at its fixed cap (not waited for up to MAX_RECORD_BODY)."""
    data, at = finish(started, (rtype, bytes(length), 0))
    expect(data, StreamError, msg, at, 3, rtype)


def _with_cpu_records(*records) -> tuple[bytes, int]:
    """A stream whose guest has these CPU records, cut after its MEMORY_LAYOUT (which the
    writer would refuse to write) and closed with a dummy END; that layout's offset."""
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "t"}))]
    parts += [writer.raw(r.TYPE, r.pack()) for r in records]
    at = len(b"".join(parts))
    parts += [writer.raw(RecordType.MEMORY_LAYOUT, MemoryLayout.flat(Vm.GUEST, 16).pack()),
              frame(RecordType.END, End(0, 0, 0, bytes(16)).pack())]
    return b"".join(parts), at


def test_a_vm_has_all_three_cpu_records_or_none() -> None:
    model, cpuid, msrs = sample_cpu(Vm.GUEST)
    for records in ((model, cpuid, msrs), ()):
        writer = StreamWriter()
        decode_stream(b"".join([writer.start(), writer.record(DomainConfig({"name": "t"})),
                                *(writer.record(r) for r in records), writer.record(MemoryLayout.flat(Vm.GUEST, 16)),
                                writer.record(MemoryLayout.flat(Vm.STUB, 0)), writer.finish()]))
    data, at = _with_cpu_records(model)
    expect(data, StreamError, "CPU records of GUEST lack CPUID_POLICY, MSR_POLICY (a VM has all three or none)",
           at, 2, RecordType.MEMORY_LAYOUT)
    data, at = _with_cpu_records(cpuid, msrs)
    expect(data, StreamError, "CPU records of GUEST lack CPU_MODEL", at, 3, RecordType.MEMORY_LAYOUT)


@pytest.mark.parametrize("name", [b"baseline\n", b"a" * 15 + b"\n"])
def test_a_cpu_model_name_ending_in_a_newline_is_refused(name: bytes) -> None:
    model, cpuid, msrs = sample_cpu(Vm.GUEST)
    body = bytearray(model.pack())
    body[8:24] = name.ljust(16, b"\0")
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "t"}))]
    at = len(b"".join(parts))
    parts += [writer.raw(RecordType.CPU_MODEL, bytes(body)), writer.raw(cpuid.TYPE, cpuid.pack()),
              writer.raw(msrs.TYPE, msrs.pack()), writer.record(MemoryLayout.flat(Vm.GUEST, 16)),
              writer.record(MemoryLayout.flat(Vm.STUB, 0)), writer.finish()]
    expect(b"".join(parts), StreamError, "is not a model name", at, 1, RecordType.CPU_MODEL)


def test_duplicated_end(sample: bytes, spans) -> None:
    end = sample[spans[-1][0]:]
    expect(sample + end, StreamError, f"{len(end)} bytes after END", len(sample), len(spans), None)


# ---- END ------------------------------------------------------------------------------------

def forge_end(data: bytes, at: int, **changes) -> bytes:
    end = End.unpack(data[at + 16:at + 16 + END.size])
    fields = {**end.__dict__, **changes}
    return data[:at] + frame(RecordType.END, End(**fields).pack())


@pytest.mark.parametrize("field,value", [("record_count", 5), ("page_count", 1),
                                         ("stream_bytes", 8), ("digest", bytes(32))])
def test_forged_end(sample: bytes, spans, field: str, value) -> None:
    at = spans[-1][0]
    expect(forge_end(sample, at, **{field: value}), StreamError, f"END {field} is", at, len(spans) - 1, 0)


def test_spliced_streams_are_caught(sample: bytes, spans, started) -> None:
    other, _ = finish(started)
    other_end = other[record_spans_end(other):]
    # the sample's records, the other stream's END (CRC-valid, wrong digest and counts)
    at = spans[-1][0]
    expect(sample[:at] + other_end, StreamError, "END record_count is", at, len(spans) - 1, 0)


def record_spans_end(data: bytes) -> int:
    return len(data) - 16 - END.size


def test_truncated_stream_with_forged_end_is_caught(sample: bytes, spans) -> None:
    at = spans[10][0]
    writer_view = decode_stream(sample)[-1]
    forged = sample[:at] + frame(RecordType.END, End(10, 0, at, writer_view.digest).pack())
    expect(forged, StreamError, "END digest is", at, 10, 0)


def test_end_before_memory_layouts(started) -> None:
    writer = StreamWriter()
    data = writer.start() + writer.record(DomainConfig({}))
    data += frame(RecordType.END, End(1, 0, len(data), bytes(32)).pack())
    expect(data, StreamError, "END before MEMORY_LAYOUT of GUEST, STUB", len(data) - 16 - END.size, 1, 0)


# ---- ordering -------------------------------------------------------------------------------

def test_record_before_domain_config() -> None:
    writer = StreamWriter()
    data = writer.start() + writer.raw(RecordType.MEMORY_LAYOUT, MemoryLayout.flat(Vm.GUEST, 4).pack())
    data += writer.raw(RecordType.END, bytes(END.size))
    expect(data, StreamError, "MEMORY_LAYOUT before DOMAIN_CONFIG", 24, 0, RecordType.MEMORY_LAYOUT)


@pytest.mark.parametrize("record,msg", [
    (DomainConfig({}), "DOMAIN_CONFIG appears twice"),
    (MemoryLayout.flat(Vm.STUB, 9), "MEMORY_LAYOUT for STUB appears twice"),
])
def test_duplicate_once_records(started, record, msg) -> None:
    data, at = finish(started, (record.TYPE, record.pack(), 0))
    expect(data, StreamError, msg, at, 3, record.TYPE)


def test_duplicate_context_and_device_records(started) -> None:
    regs = HvmState(RecordType.VCPU_REGS, Vm.GUEST, 1, sample_state(RecordType.VCPU_REGS, 1))
    dev = DeviceState("uart", 0, 1, 1, {})
    data, at = finish(started, *[(r.TYPE, r.pack(), 0) for r in (regs, dev, regs)])
    third = at + 16 + len(regs.pack()) + 16 + padded(len(dev.pack()))
    expect(data, StreamError, "VCPU_REGS for GUEST vcpu 1 appears twice", third, 5, RecordType.VCPU_REGS)


def test_duplicate_device_state(started) -> None:
    dev = DeviceState("uart", 0, 1, 1, {})
    data, at = finish(started, (dev.TYPE, dev.pack(), 0), (dev.TYPE, dev.pack(), 0))
    expect(data, StreamError, "DEVICE_STATE uart.0 appears twice", at + 16 + padded(len(dev.pack())), 4,
           RecordType.DEVICE_STATE)


def test_context_before_its_layout_and_for_an_absent_vm() -> None:
    regs = HvmState(RecordType.VCPU_REGS, Vm.STUB, 0, sample_state(RecordType.VCPU_REGS, 1))
    dev = DeviceState("uart16550a", 0, 1, 1, {"ier": 1})
    for record, what in ((regs, "VCPU_REGS"), (dev, "DEVICE_STATE")):
        writer = StreamWriter()
        data = writer.start() + writer.record(DomainConfig({})) + writer.record(MemoryLayout.flat(Vm.GUEST, 4))
        at = len(data)
        expect(data + writer.raw(record.TYPE, record.pack()) + writer.raw(RecordType.END, bytes(END.size)),
               StreamError, f"{what} for STUB before its MEMORY_LAYOUT", at, 2, record.TYPE)
        writer = StreamWriter()
        data = writer.start() + writer.record(DomainConfig({})) + writer.record(MemoryLayout.flat(Vm.GUEST, 4))
        data += writer.record(MemoryLayout.flat(Vm.STUB, 0))
        at = len(data)
        expect(data + writer.raw(record.TYPE, record.pack()) + writer.raw(RecordType.END, bytes(END.size)),
               StreamError, f"{what} for STUB, whose MEMORY_LAYOUT says it is absent", at, 3, record.TYPE)


@pytest.mark.parametrize("fields,msg", [
    ({"a" * 24: 1}, "field name 'aaaaaaaaaaaaaaaaaaaaaaaa' is not 1 to 23 ASCII"),
    ({"\u00e9": 1}, "field name '\u00e9' is not 1 to 23 ASCII"),
    ({"a\0": 1}, "is not 1 to 23 ASCII"),
    ({"q": [{"avail": 7}]}, "field q is list, expected an int or bin"),
    ({"q": True}, "field q is bool"),
    ({"q": "text"}, "field q is str"),
    ({"q": -1}, "field q is -1, outside 0..2^64-1"),
])
def test_device_state_fields(started, fields, msg) -> None:
    body = msgpack.packb({"device": "uart16550a", "instance": 0, "version": 1, "min_version": 1,
                          "fields": fields}, use_bin_type=True)
    data, at = finish(started, (RecordType.DEVICE_STATE, body, 0))
    expect(data, StreamError, msg, at, 3, RecordType.DEVICE_STATE)
    with pytest.raises(ValueError, match="writer refuses"):
        DeviceState("uart16550a", 0, 1, 1, fields).pack()


def test_pages_before_layout() -> None:
    writer = StreamWriter()
    data = writer.start() + writer.record(DomainConfig({}))
    data += writer.raw(RecordType.PAGE_DATA, encode_batch(Vm.GUEST, [(0, PAGE)], False), 1)
    expect(data, StreamError, "PAGE_DATA for GUEST before its MEMORY_LAYOUT", len(data) - 16 - 8 - 16 - 4096, 1,
           RecordType.PAGE_DATA)


# ---- pages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("space,pfn", [(Vm.GUEST, 16), (Vm.STUB, 4), (Vm.GUEST, 2 ** 64 - 1)])
def test_pfn_out_of_range(started, space, pfn) -> None:
    data, at = finish(started, (RecordType.PAGE_DATA, encode_batch(space, [(0, PAGE), (pfn, PAGE)], False), 2))
    nr = 16 if space is Vm.GUEST else 4
    expect(data, StreamError, f"pfn 0x{pfn:x} outside {space.name} memory ({nr} pages in 1 ranges)",
           at, 3, RecordType.PAGE_DATA)


def batch(space: int, entries: list[tuple[int, int, int]], data: bytes = b"") -> bytes:
    return BATCH_HEADER.pack(space, len(entries)) + b"".join(PAGE_ENTRY.pack(*e) for e in entries) + data


@pytest.mark.parametrize("body,msg", [
    (batch(0, []), "count 0 outside 1..1024"),
    (BATCH_HEADER.pack(0, 1025) + bytes(16 * 1025), "count 1025 outside 1..1024"),
    (BATCH_HEADER.pack(0, 1024), "1024 entries need 16392"),
    (batch(0, [(1, PageType.NORMAL, 0)]), "carries 0 data bytes, 1 pages need 4096"),
    (batch(0, [(1, PageType.ZERO, 0)], b"x"), "carries 1 data bytes, 0 pages need 0"),
    (batch(0, [(1, PageType.COMPRESSED, 0)]), "page type 2, not allowed here"),
    (batch(0, [(1, 9, 0)]), "page type 9, not allowed here"),
    (batch(0, [(1, PageType.ZERO, 1)]), "nonzero reserved field"),
    (batch(0, [(1, PageType.ZERO, 0), (1, PageType.ZERO, 0)]), "pfn 0x1 appears twice"),
    (batch(2, [(1, PageType.ZERO, 0)]), "unknown VM / address space id 2"),
    (b"\0" * 4, "shorter than its header"),
])
def test_bad_page_data(started, body: bytes, msg: str) -> None:
    data, at = finish(started, (RecordType.PAGE_DATA, body, 1))
    expect(data, StreamError, msg, at, 3, RecordType.PAGE_DATA)


def zstd_frame(payload: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(payload)


def with_dictionary_id(frame: bytes) -> bytes:
    """The frame with a 1-byte Dictionary_ID (7) added to its header (RFC 8878 3.1.1.1)."""
    assert frame[4] & 0x20 and not frame[4] & 3            # single segment, no dictionary
    return frame[:4] + bytes([frame[4] | 1, 7]) + frame[5:]


def with_window(frame: bytes, descriptor: int) -> bytes:
    """The frame made multi-segment with the given Window_Descriptor byte."""
    assert frame[4] & 0x20
    return frame[:4] + bytes([frame[4] & ~0x20, descriptor]) + frame[5:]


def bad_checksum(page: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(page)
    return frame[:-1] + bytes([frame[-1] ^ 1])


def test_zstd_checksum_is_allowed(started) -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(PAGE)
    body = batch(0, [(3, PageType.COMPRESSED, 0)], frame)
    data, _ = finish(started, (RecordType.PAGE_DATA_ZSTD, body, 1))
    assert [r for r in decode_stream(data) if isinstance(r, PageBatch)][0].pages == ((3, PAGE),)


@pytest.mark.parametrize("frame_bytes,msg", [
    (b"not a zstd frame at all", "bad zstd frame"),
    (zstd_frame(PAGE)[:-4], "bad zstd frame"),
    (zstd_frame(PAGE) + b"\0", "bad zstd frame"),
    (zstd_frame(PAGE + PAGE), "zstd frame declares 8192 bytes, expected 4096"),
    (zstd_frame(PAGE[:100]), "zstd frame declares 100 bytes, expected 4096"),
    (zstd_frame(PAGE, content_size=False), "zstd frame declares unknown bytes, expected 4096"),
    (b"", "bad zstd frame"),
    (b"\x50\x2a\x4d\x18" + struct.pack("<I", 4096) + PAGE, "bad zstd frame: magic 502a4d18"),   # skippable
    (with_dictionary_id(zstd_frame(PAGE)), "zstd frame names dictionary 7"),
    (with_window(zstd_frame(PAGE), 0x68), "asks for a 8388608-byte window, more than 4194304"),
    (bad_checksum(PAGE), "bad zstd frame"),
])
def test_bad_zstd_batches(started, frame_bytes: bytes, msg: str) -> None:
    body = batch(0, [(3, PageType.COMPRESSED, 0)], frame_bytes)
    data, at = finish(started, (RecordType.PAGE_DATA_ZSTD, body, 1))
    expect(data, StreamError, msg, at, 3, RecordType.PAGE_DATA_ZSTD)


def test_zstd_frame_lying_about_its_size(started) -> None:
    """A frame header that declares 4096 bytes over content that is 8192: the decompressor
    stops at the declared size (a crafted frame: patch the content-size field)."""
    good = zstd_frame(PAGE + PAGE)
    params = zstandard.get_frame_parameters(good)
    assert params.content_size == 8192
    lying = bytearray(good)
    idx = lying.find(struct.pack("<H", 8192 - 256))  # 2-byte FCS field stores size - 256
    assert idx > 0
    lying[idx:idx + 2] = struct.pack("<H", 4096 - 256)
    body = batch(0, [(3, PageType.COMPRESSED, 0)], bytes(lying))
    data, at = finish(started, (RecordType.PAGE_DATA_ZSTD, body, 1))
    expect(data, StreamError, "bad zstd frame", at, 3, RecordType.PAGE_DATA_ZSTD)


# ---- record bodies --------------------------------------------------------------------------

@pytest.mark.parametrize("rtype,body,msg", [
    (RecordType.VCPU_REGS, bytes(151), "VCPU_REGS body is 151 bytes, expected 152"),
    (RecordType.VCPU_XSAVE, bytes(4105), "record body length 4105 exceeds 4104 (this type's cap)"),
    (RecordType.VCPU_XSAVE, bytes(4103), "VCPU_XSAVE body is 4103 bytes, expected 4104"),
    (RecordType.VCPU_XCRS, struct.pack("<IIII", 0, 0, 17, 0) + bytes(192), "VCPU_XCRS nr_xcrs 17 exceeds 16"),
    (RecordType.VCPU_XCRS, struct.pack("<IIII", 0, 0, 1, 2) + bytes(192), "VCPU_XCRS flags 0x2, must be zero"),
    (RecordType.VCPU_XCRS, struct.pack("<IIII", 0, 0, 1, 0) + bytes(12) + struct.pack("<IQ", 0, 1) + bytes(168),
     "VCPU_XCRS entry 1 is not zero but nr_xcrs is 1"),
    (RecordType.VCPU_PDPTRS, struct.pack("<IIQ", 0, 0, 2) + bytes(32), "VCPU_PDPTRS flags 0x2: only bit 0 is defined"),
    (RecordType.VCPU_PDPTRS, bytes(40), "VCPU_PDPTRS body is 40 bytes, expected 48"),
    (0x8000_0003, bytes(8), "the optional bit is set on a mandatory record type"),
    (0x8000_0000, bytes(40), "the optional bit is set on a mandatory record type"),
    (RecordType.DEVICE_STATE, DeviceState("d", 0, 1, 1, {}).pack().replace(b"\xa1d", b"\xa0"),
     "DEVICE_STATE device name '' is not 1 to 23 ASCII"),
    (RecordType.VCPU_REGS, struct.pack("<II", 0, 4096) + bytes(144), "vcpu_id 4096 exceeds 4095"),
    (RecordType.PIT, struct.pack("<II", 0, 1) + bytes(76), "PIT reserved vcpu_id field is 1"),
    (RecordType.CLOCK, struct.pack("<II", 7, 0) + bytes(28), "unknown VM / address space id 7"),
    (RecordType.VCPU_MSRS, struct.pack("<IIII", 0, 0, 1, 1) + bytes(16), "reserved field is 0x1"),
    (RecordType.VCPU_MSRS, struct.pack("<IIII", 0, 0, 1025, 0), "count 1025 exceeds 1024"),
    (RecordType.VCPU_MSRS, struct.pack("<IIII", 0, 0, 2, 0) + bytes(16), "2 entries need 48"),
    (RecordType.VCPU_MSRS, struct.pack("<IIIIIIQ", 0, 0, 1, 0, 0x10, 1, 5), "nonzero reserved field"),
    (RecordType.VCPU_MSRS, struct.pack("<IIIIIIQIIQ", 0, 0, 2, 0, 0x10, 0, 5, 0x10, 0, 6),
     "not strictly ascending at 0x10"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIII", 0, 8192, 0, 0), "page size 8192"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIII", 0, 4096, 0, 1), "reserved field is 0x1"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIII", 0, 4096, 65, 0), "nr_ranges 65 exceeds 64"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIII", 0, 4096, 2, 0) + bytes(16), "2 ranges need 48"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIIIQQ", 0, 4096, 1, 0, 5, 0), "range at pfn 0x5 has no pages"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIIIQQQQ", 0, 4096, 2, 0, 0, 8, 8, 1),
     "range at pfn 0x8 overlaps, touches or precedes"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIIIQQQQ", 0, 4096, 2, 0, 9, 8, 0, 1),
     "range at pfn 0x0 overlaps, touches or precedes"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIIIQQ", 0, 4096, 1, 0, 2 ** 40 - 1, 2), "ends past pfn limit"),
    (RecordType.MEMORY_LAYOUT, struct.pack("<IIIIQQQQ", 0, 4096, 2, 0, 0, 2 ** 35, 2 ** 35 + 1, 2 ** 35 + 1),
     "more than 68719476736"),
])
def test_bad_bodies(rtype, body, msg) -> None:
    data, at = finish_at_config(rtype, body)
    expect(data, StreamError, msg, at, 1, rtype)


def finish_at_config(rtype: int, body: bytes) -> tuple[bytes, int]:
    writer = StreamWriter()
    data = writer.start() + writer.record(DomainConfig({}))
    return data + writer.raw(rtype, body) + writer.raw(RecordType.END, bytes(END.size)), len(data)


def test_msgpack_nesting_up_to_the_cap_is_read() -> None:
    deepest = b"\x81\xa1a" + b"\x91" * 31 + b"\xc0"          # 32 levels, the map included
    writer = StreamWriter()
    data = writer.start() + writer.raw(RecordType.DOMAIN_CONFIG, deepest)
    reader = StreamReader()
    reader.feed(data)
    value = reader.next_record().config["a"]
    for _ in range(30):
        value = value[0]
    assert value == [None]


def test_creator_is_never_refused_and_kept_short(started) -> None:
    writer, parts = started
    bad = b"\xff\xfehvm\n" + b"x" * 100_000
    parts = [*parts[:1], writer.raw(RecordType.CREATOR, bad), *parts[1:]]
    data = b"".join(parts)
    reader = StreamReader()
    reader.feed(data)
    creator = reader.next_record()
    assert isinstance(creator, Creator)
    assert creator.text.startswith("\ufffd\ufffdhvm\n") and len(creator.text.encode()) <= 4096 + 8


@pytest.mark.parametrize("value,msg", [
    (msgpack.packb([1, 2]), "msgpack body is list, expected a map"),
    (msgpack.packb({1: 2}), "map key 1 is not a string"),
    (b"\x82\x01\x01\xc3\x02", "map key 1 is not a string"),      # {1: 1, True: 2}: not "True appears twice"
    (msgpack.packb({"a": [{b"k": 1}]}), "map key b'k' is not a string"),
    (b"\x82\xa1a\x01\xa1a\x02", "map key 'a' appears twice"),
    (b"\x81\xa1a\x81\xa1b\x82\xa1c\xc0\xa1c\xc3", "map key 'c' appears twice"),
    (msgpack.packb({"a": msgpack.ExtType(5, b"x")}), "bad msgpack"),
    (b"\x81\xa1a\xc7\x00\x05", "unsupported msgpack value ExtType"),   # ext of 0 bytes
    (msgpack.packb({"a": 1}) + b"\x00", "bad msgpack"),
    (b"\xc1", "bad msgpack"),
    (b"\xdd\xff\xff\xff\xff", "bad msgpack"),  # array32 of 4 G items: refused, not allocated
    (b"\xdb\x7f\xff\xff\xff", "bad msgpack"),  # str32 of 2 GiB
    (b"\x81\xa1a" * 2000 + b"\xc0", "msgpack nested deeper than 32 levels"),  # past msgpack's own stack
    (b"\x81\xa1a" + b"\x91" * 1000 + b"\xc0", "msgpack nested deeper than 32 levels"),  # was a RecursionError
    (b"\x81\xa1a" + b"\x91" * 32 + b"\xc0", "msgpack nested deeper than 32 levels"),
    (b"\x81\xa1a\xc6" + (1 << 20).to_bytes(4, "big") + bytes(1 << 20), "exceeds 1048576 (this type's cap)"),
])
def test_bad_domain_config(value: bytes, msg: str) -> None:
    writer = StreamWriter()
    data = writer.start() + writer.raw(RecordType.DOMAIN_CONFIG, value) + writer.raw(RecordType.END, bytes(END.size))
    expect(data, StreamError, msg, 24, 0, RecordType.DOMAIN_CONFIG)


@pytest.mark.parametrize("value,msg", [
    ({"device": "uart", "instance": 0, "version": 1, "min_version": 1}, "DEVICE_STATE keys are"),
    ({"device": "uart", "instance": 0, "version": 1, "min_version": 2, "fields": {}}, "1 <= min_version <= version"),
    ({"device": "uart", "instance": 0, "version": 1, "min_version": 0, "fields": {}}, "1 <= min_version <= version"),
    ({"device": 5, "instance": 0, "version": 1, "min_version": 1, "fields": {}}, "device is int, expected str"),
    ({"device": "u", "instance": True, "version": 1, "min_version": 1, "fields": {}}, "instance is bool"),
    ({"device": "u", "instance": -1, "version": 1, "min_version": 1, "fields": {}}, "instance -1 out of range"),
    ({"device": "u", "instance": 0, "version": 1, "min_version": 1, "fields": []}, "fields is list, expected dict"),
])
def test_bad_device_state(value: dict, msg: str) -> None:
    data, at = finish_at_config(RecordType.DEVICE_STATE, msgpack.packb(value))
    expect(data, StreamError, msg, at, 1, RecordType.DEVICE_STATE)


def test_reader_stays_failed(sample: bytes) -> None:
    reader = StreamReader()
    reader.feed(b"nope" + sample)
    with pytest.raises(StreamError) as first:
        reader.next_record()
    with pytest.raises(StreamError) as again:
        reader.next_record()
    assert again.value is first.value
    with pytest.raises(StreamError):
        reader.eof()
