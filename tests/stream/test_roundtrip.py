"""Round trips: whole input, one byte at a time, trailing bytes left untouched (h11's three
ways), plus each record kind and the file helpers."""

from __future__ import annotations

import io

import pytest

from migrate.stream import (
    DONE, NEED_DATA, ZERO_PAGE, DeviceState, End, HvmState, PageBatch, RecordType, StreamError,
    StreamReader, StreamWriter, Vm, decode_stream, encode_stream,
)
from migrate.stream.hvm import CODECS
from migrate.stream.records import END
from migrate.stream.io import read_stream, write_stream
from migrate.stream.pages import decode_batch, encode_batch
from migrate.stream.sample import sample_records, sample_state


def read_chunked(data: bytes, size: int, **kwargs) -> tuple[list, StreamReader]:
    reader = StreamReader(**kwargs)
    records = []
    for at in range(0, len(data), size):
        reader.feed(data[at:at + size])
        while (record := reader.next_record()) not in (NEED_DATA, DONE):
            records.append(record)
    reader.eof()
    return records, reader


def test_whole_input(sample: bytes) -> None:
    records = decode_stream(sample)
    assert records[:-4] == sample_records()
    assert isinstance(records[-1], End)
    assert records[-1].record_count == len(records) - 1
    assert records[-1].stream_bytes == len(sample) - 16 - END.size


@pytest.mark.parametrize("size", [1, 7, 8, 4095, 65536])
def test_chunk_sizes_give_the_same_records(sample: bytes, size: int) -> None:
    """size 1 is the whole stream one byte at a time."""
    assert read_chunked(sample, size)[0] == decode_stream(sample)


def test_trailing_bytes_left_untouched(sample: bytes) -> None:
    trailing = b"next protocol message\x00\xff"
    records, reader = read_chunked(sample + trailing, 1000, leave_trailing=True)
    assert records == decode_stream(sample)
    assert reader.trailing == trailing
    assert reader.next_record() is DONE
    reader.feed(b"more")
    assert reader.trailing == trailing + b"more"
    assert decode_stream(sample + trailing, leave_trailing=True) == records


def test_trailing_bytes_refused_by_default(sample: bytes) -> None:
    with pytest.raises(StreamError, match="3 bytes after END"):
        decode_stream(sample + b"abc")
    reader = StreamReader()
    reader.feed(sample)
    while reader.next_record() is not DONE:
        pass
    with pytest.raises(StreamError, match="1 bytes after END") as info:
        reader.feed(b"x")
    assert info.value.offset == len(sample)


def test_reencoding_is_byte_identical(sample: bytes) -> None:
    assert encode_stream(decode_stream(sample)) == sample


@pytest.mark.parametrize("record_type", list(CODECS), ids=lambda t: t.name)
def test_hvm_record_pack_unpack(record_type: RecordType) -> None:
    platform = record_type in (RecordType.PIC, RecordType.IOAPIC, RecordType.PIT, RecordType.CLOCK)
    record = HvmState(record_type, Vm.STUB, None if platform else 3, sample_state(record_type, 5))
    body = record.pack()
    assert len(body) == CODECS[record_type].struct.size or record_type is RecordType.VCPU_MSRS
    assert HvmState.unpack_as(record_type, body) == record


def test_padding_is_dropped_and_restored_as_zero() -> None:
    state = sample_state(RecordType.VCPU_SREGS, 1)
    noisy = {**state, "cs": {**state["cs"], "padding": 0x55}, "gdt": {**state["gdt"], "padding": [1, 2, 3]}}
    back = HvmState.unpack_as(RecordType.VCPU_SREGS, HvmState(RecordType.VCPU_SREGS, Vm.GUEST, 0, noisy).pack())
    assert back.state == state
    assert back.state["cs"]["padding"] == 0 and back.state["gdt"]["padding"] == [0, 0, 0]


def test_hvm_pack_rejects_bad_shapes() -> None:
    regs = sample_state(RecordType.VCPU_REGS, 1)
    with pytest.raises(ValueError, match="unknown fields"):
        HvmState(RecordType.VCPU_REGS, Vm.GUEST, 0, {**regs, "rzz": 1}).pack()
    with pytest.raises(ValueError):
        HvmState(RecordType.VCPU_REGS, Vm.GUEST, 0, {**regs, "rax": -1}).pack()
    with pytest.raises(ValueError, match="vcpu_id must be None"):
        HvmState(RecordType.PIT, Vm.GUEST, 0, sample_state(RecordType.PIT, 1)).pack()
    with pytest.raises(ValueError, match="expected 1024 bytes"):
        HvmState(RecordType.VCPU_LAPIC, Vm.GUEST, 0, b"\0" * 1000).pack()


def test_zero_pages_are_detected_and_never_sent_as_data() -> None:
    page = bytes(range(256)) * 16
    body = encode_batch(Vm.GUEST, [(1, bytes(4096)), (2, page), (3, bytearray(4096))], False)
    assert len(body) == 8 + 3 * 16 + 4096
    batch = decode_batch(RecordType.PAGE_DATA, body)
    assert batch.pages == ((1, ZERO_PAGE), (2, page), (3, ZERO_PAGE))
    zbody = encode_batch(Vm.GUEST, [(1, bytes(4096)), (2, page)], True)
    assert decode_batch(RecordType.PAGE_DATA_ZSTD, zbody) == PageBatch(Vm.GUEST, ((1, ZERO_PAGE), (2, page)), True)
    all_zero = encode_batch(Vm.GUEST, [(5, ZERO_PAGE)], True)
    assert len(all_zero) == 8 + 16  # no frame at all


def test_writer_splits_batches_at_1024_pages() -> None:
    writer = StreamWriter()
    parts = [writer.start(), writer.record(sample_records()[0])]
    from migrate.stream import MemoryLayout
    parts += [writer.record(MemoryLayout.flat(Vm.GUEST, 3000)), writer.record(MemoryLayout.flat(Vm.STUB, 1))]
    parts.append(writer.pages(Vm.GUEST, ((pfn, ZERO_PAGE) for pfn in range(2500))))
    parts.append(writer.finish())
    records = decode_stream(b"".join(parts))
    assert [len(r.pages) for r in records if isinstance(r, PageBatch)] == [1024, 1024, 452]
    assert records[-1].page_count == 2500


def test_writer_refuses_bad_order() -> None:
    writer = StreamWriter()
    writer.start()
    with pytest.raises(ValueError, match="before DOMAIN_CONFIG"):
        writer.record(DeviceState("uart", 0, 1, 1, {}))
    with pytest.raises(ValueError, match="records go between"):
        StreamWriter().raw(1, b"")


def test_device_state_versions() -> None:
    state = DeviceState("uart", 0, version=3, min_version=2, fields={})
    state.check_loadable(loader_version=2, loader_min_version=1)
    with pytest.raises(StreamError, match="needs a loader of version >= 2"):
        state.check_loadable(loader_version=1, loader_min_version=1)
    with pytest.raises(StreamError, match="older than the oldest this loader reads"):
        state.check_loadable(loader_version=5, loader_min_version=4)


def test_file_helpers(sample: bytes) -> None:
    out = io.BytesIO()
    assert write_stream(out, [sample[:10], sample[10:]]) == len(sample)
    assert list(read_stream(io.BytesIO(out.getvalue()), chunk=333)) == decode_stream(sample)
    with pytest.raises(StreamError, match="input ended before END"):
        list(read_stream(io.BytesIO(sample[:-1])))
    with pytest.raises(StreamError, match="bytes after END"):
        list(read_stream(io.BytesIO(sample + b"x"), chunk=len(sample)))


def strip_padding(value):
    """The KVM layer's shape: padding and reserved keys left out altogether."""
    if isinstance(value, dict):
        return {k: strip_padding(v) for k, v in value.items() if k not in ("pad", "pad0", "padding", "reserved")}
    if isinstance(value, list):
        return [strip_padding(v) for v in value]
    return value


@pytest.mark.parametrize("record_type", [t for t in CODECS if isinstance(sample_state(t, 1), dict)
                                         and t is not RecordType.VCPU_MSRS], ids=lambda t: t.name)
def test_states_without_padding_keys_pack_the_same(record_type: RecordType) -> None:
    vcpu_id = None if record_type in (RecordType.PIC, RecordType.IOAPIC, RecordType.PIT, RecordType.CLOCK) else 0
    state = sample_state(record_type, 2)
    full = HvmState(record_type, Vm.GUEST, vcpu_id, state).pack()
    assert HvmState(record_type, Vm.GUEST, vcpu_id, strip_padding(state)).pack() == full
