"""The restore's reader checks runs of HVM context records in C (hvm.BodyScan,
``hvm_scan_records``) and hands them out after the ordering rules (StreamOrder.context_fits):
it must read every stream exactly as the decoding reader does. Each case here bends one
record of a complete stream (END and its digest included) at a boundary of a rule the scan
carries, and both readers must hand out the same records, stand at the same ``last`` and
``offset`` after each, and stop at the same error; each case also says which error the bent
record must raise, so that a case that stopped exercising its rule fails."""
from __future__ import annotations

import struct

import pytest
import xxhash

from migrate.stream import (
    Channels, DomainConfig, End, Header, HvmState, MemoryLayout, RecordType, StreamWriter, Vm,
)
from migrate.stream.framing import frame
from migrate.stream.hvm import CODECS, PLATFORM_CODECS, BodyScan, HvmBodies
from migrate.stream.sample import sample_cpu, sample_state
from two_readers import read_pieces

T = RecordType
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


def context(vm: Vm) -> list[tuple[RecordType, bytearray]]:
    """Every context record of one VM with one vCPU, as (type, body) in a save's order."""
    return [(t, bytearray(HvmState(t, vm, None if t in PLATFORM_CODECS else 0, sample_state(t, t + vm)).pack()))
            for t in CODECS]


def stream(bend=None, version: int = 2, channels: bool = True, before_layouts: bool = False) -> bytes:
    """A whole stream: header, DOMAIN_CONFIG, CPU records (version 2), the layouts, both VMs'
    context (``before_layouts``: ahead of the layouts), CHANNELS, END. ``bend(type, vm,
    body) -> (body, framing bend or None)`` may change one record; a framing bend is
    applied to the framed bytes (so END's digest still covers the unbent ones)."""
    writer = StreamWriter()
    parts = [writer.start(Header(version=version)), writer.record(DomainConfig({"name": "x"}))]
    if version >= 2:
        parts += [writer.record(r) for vm in Vm for r in sample_cpu(vm)]
    layouts = [writer.raw(T.MEMORY_LAYOUT, MemoryLayout.flat(vm, 64).pack() if version >= 2
                          else struct.pack("<IIQ", vm, 4096, 64)) for vm in Vm]
    records = []
    for vm in Vm:
        for rtype, body in context(vm):
            reframe = None
            if bend is not None:
                body, reframe = bend(rtype, vm, body)
            framed = bytearray(writer.raw(rtype, bytes(body)))
            if reframe is not None:
                reframe(framed)
            records.append(bytes(framed))
    parts += (records + layouts) if before_layouts else (layouts + records)
    if channels:
        parts.append(writer.raw(T.CHANNELS, Channels(((1, 1, 0, 0, bytes(16)),)).pack()))
    return with_end(parts)


def with_end(parts: list[bytes]) -> bytes:
    """The stream's header and records, then the END they make (made here: a writer
    refuses to end a stream that breaks the ordering rules)."""
    head = b"".join(parts)
    end = End(len(parts) - 1, 0, len(head), xxhash.xxh3_128(head).digest())
    return head + frame(end.TYPE, end.pack())


def read(data: bytes, piece: int, **options) -> list:
    return read_pieces(data, [piece], **options)


def one(rtype: RecordType, change, vm: Vm = Vm.GUEST, framing=None):
    """A bend that changes the body (``change(body)``) or the framed record (``framing``) of
    ``rtype`` of ``vm``."""
    def bend(t, v, body):
        if (t, v) != (rtype, vm):
            return body, None
        if change is not None:
            change(body)
        return body, framing
    return bend


def put(fmt: struct.Struct, at: int, value: int):
    return lambda body: fmt.pack_into(body, at, value)


def setbyte(at: int, value: int = 1):
    def change(body):
        body[at] = value
    return change


XCRS_ENTRY = 12         # xcr u32, value u64 (reserved not carried)


def msr(i: int) -> int:
    """Where VCPU_MSRS's entry ``i`` starts in its body."""
    return 16 + 16 * i


def drop_last_msr(body: bytearray) -> None:
    U32.pack_into(body, 8, U32.unpack_from(body, 8)[0] - 1)
    del body[-16:]
CASES = {
    # name: (bend, the error the bent record raises; None: it is accepted)
    "valid": (None, None),
    "vcpu 4095": (one(T.VCPU_REGS, put(U32, 4, 4095)), None),
    "vcpu 4096": (one(T.VCPU_REGS, put(U32, 4, 4096)), "VCPU_REGS vcpu_id 4096 exceeds 4095"),
    "vcpu 2^32-1": (one(T.VCPU_LAPIC, put(U32, 4, 0xFFFF_FFFF)), "exceeds 4095"),
    "platform vcpu 1": (one(T.PIT, put(U32, 4, 1)), "PIT reserved vcpu_id field is 1, must be 0"),
    "vm 2": (one(T.VCPU_XSAVE, put(U32, 0, 2)), "unknown VM / address space id 2"),
    "vm 2^31": (one(T.CLOCK, put(U32, 0, 1 << 31)), "unknown VM"),
    "stub context under the guest's id": (one(T.VCPU_REGS, put(U32, 0, 0), vm=Vm.STUB), "appears twice"),
    "nr_xcrs 16": (one(T.VCPU_XCRS, put(U32, 8, 16)), None),
    "nr_xcrs 17": (one(T.VCPU_XCRS, put(U32, 8, 17)), "VCPU_XCRS nr_xcrs 17 exceeds 16"),
    "xcrs flags": (one(T.VCPU_XCRS, put(U32, 12, 1 << 31)), "VCPU_XCRS flags 0x80000000, must be zero"),
    # the sample's guest XCRS has nr_xcrs 2 (1 + 0x13 % 3): entry 2 is the first unused one
    "xcrs unused entry, first byte": (one(T.VCPU_XCRS, setbyte(16 + 2 * XCRS_ENTRY)), "entry 2 is not zero"),
    "xcrs unused entry, value's last byte": (one(T.VCPU_XCRS, setbyte(16 + 3 * XCRS_ENTRY - 1)), "entry 2 is not zero"),
    "xcrs last entry, last byte": (one(T.VCPU_XCRS, setbyte(16 + 16 * XCRS_ENTRY - 1)), "entry 15 is not zero"),
    "pdptrs flags 1": (one(T.VCPU_PDPTRS, put(U64, 8, 1)), None),
    "pdptrs flags bit 1": (one(T.VCPU_PDPTRS, put(U64, 8, 3)), "only bit 0 is defined"),
    "pdptrs flags bit 32": (one(T.VCPU_PDPTRS, put(U64, 8, 1 << 32)), "only bit 0 is defined"),
    "pdptrs flags bit 63": (one(T.VCPU_PDPTRS, put(U64, 8, 1 << 63)), "only bit 0 is defined"),
    "body 8 bytes short": (one(T.VCPU_EVENTS, lambda b: b.__delitem__(slice(-8, None))), "body is"),
    "body 8 bytes long": (one(T.IOAPIC, lambda b: b.extend(bytes(8))), "exceeds"),
    "padding": (one(T.VCPU_EVENTS, None, framing=lambda f: f.__setitem__(-1, 1)), "padding is not zero"),
    "reserved": (one(T.VCPU_SREGS, None, framing=lambda f: f.__setitem__(8, 1)), "reserved field is 0x1"),
    "crc": (one(T.VCPU_MP_STATE, None, framing=lambda f: f.__setitem__(12, f[12] ^ 1)), "CRC-32 mismatch"),
    # VCPU_MSRS: count, reserved, then (index, reserved, value) from byte 16; the sample's
    # four MSRs are its VM's MSR_POLICY, the second (0x10A) a feature MSR
    "msrs another non-feature value": (one(T.VCPU_MSRS, put(U64, msr(0) + 8, 7)), None),
    "msrs of the stub, another value": (one(T.VCPU_MSRS, put(U64, msr(3) + 8, 9), vm=Vm.STUB), None),
    "msrs count one short": (one(T.VCPU_MSRS, put(U32, 8, 3)), "3 entries need"),
    "msrs count one over": (one(T.VCPU_MSRS, put(U32, 8, 5)), "5 entries need"),
    "msrs reserved": (one(T.VCPU_MSRS, put(U32, 12, 1 << 31)), "VCPU_MSRS reserved field is 0x80000000"),
    "msrs entry reserved": (one(T.VCPU_MSRS, put(U32, msr(2) + 4, 1)), "MSR 0xc0000080 has nonzero reserved"),
    "msrs index repeated": (one(T.VCPU_MSRS, put(U32, msr(1), 0x10)), "not strictly ascending at 0x10"),
    "msrs index descending": (one(T.VCPU_MSRS, put(U32, msr(3), 0x11)), "not strictly ascending at 0x11"),
    "msrs an MSR its policy lacks": (one(T.VCPU_MSRS, put(U32, msr(3), 0xC000_0101)), "other MSRs than its MSR_POLICY"),
    "msrs one fewer than its policy": (one(T.VCPU_MSRS, drop_last_msr), "other MSRs than its MSR_POLICY (3 against 4)"),
    "msrs none": (one(T.VCPU_MSRS, lambda b: (put(U32, 8, 0)(b), b.__delitem__(slice(16, None)))),
                  "(0 against 4)"),
    "msrs feature value": (one(T.VCPU_MSRS, lambda b: b.__setitem__(msr(1) + 8, b[msr(1) + 8] ^ 1)),
                           "feature MSR 0x10a is"),
    "msrs of the stub, feature value": (one(T.VCPU_MSRS, put(U64, msr(1) + 8, 0), vm=Vm.STUB),
                                        "VCPU_MSRS of STUB vcpu 0: feature MSR 0x10a is 0x0"),
    "msrs 1025 entries": (one(T.VCPU_MSRS, lambda b: (put(U32, 8, 1025)(b), b.extend(bytes(16 * 1021)))),
                          "exceeds 16400"),
    "msrs length not its count's": (one(T.VCPU_MSRS, lambda b: b.extend(bytes(8))), "4 entries need"),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("piece", [1 << 20, 4096, 17, 1])
def test_the_scan_reads_each_bent_record_as_the_decoding_reader(name, piece) -> None:
    bend, error = CASES[name]
    data = stream(bend)
    want = read(data, piece)
    assert read(data, piece, raw_pages="bodies", hvm_bodies=True) == want
    if error is None:
        assert isinstance(want[-1][0], End), want[-1]
    else:
        assert isinstance(want[-1][0], str) and error in want[-1][0], want[-1]


@pytest.mark.parametrize("shape, error", [
    ({"version": 1, "channels": False}, None),
    # version 1 has no MSR_POLICY: any MSRs, in order, pass
    ({"version": 1, "channels": False, "bend": one(T.VCPU_MSRS, drop_last_msr)}, None),
    ({"version": 1, "channels": False, "bend": one(T.VCPU_MSRS, put(U64, msr(1) + 8, 0))}, None),
    ({"version": 1, "channels": False, "bend": one(T.VCPU_MSRS, put(U32, msr(3), 0x11))}, "not strictly ascending"),
    ({"before_layouts": True}, "before its MEMORY_LAYOUT"),
])
def test_the_scan_reads_version_1_and_misplaced_context_as_the_decoding_reader(shape, error) -> None:
    data = stream(**shape)
    for piece in (1 << 20, 7):
        want = read(data, piece)
        assert read(data, piece, raw_pages="bodies", hvm_bodies=True) == want
        assert isinstance(want[-1][0], End) if error is None else error in want[-1][0]


def test_context_after_channels_is_refused_alike() -> None:
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "x"})),
             *(writer.record(r) for vm in Vm for r in sample_cpu(vm)),
             *(writer.record(MemoryLayout.flat(vm, 64)) for vm in Vm),
             writer.raw(T.CHANNELS, Channels(((1, 1, 0, 0, bytes(16)),)).pack())]
    parts += [writer.raw(t, bytes(body)) for t, body in context(Vm.GUEST)]
    data = with_end(parts)
    want = read(data, 1 << 20)
    assert read(data, 1 << 20, raw_pages="bodies", hvm_bodies=True) == want
    assert "after CHANNELS" in want[-1][0]


def test_a_run_longer_than_one_scan_is_read_alike() -> None:
    """More context records in a row than one scan takes (BodyScan.MAX_RUN): eight vCPUs'
    worth, the last a duplicate."""
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "x"})),
             *(writer.record(r) for vm in Vm for r in sample_cpu(vm)),
             *(writer.record(MemoryLayout.flat(vm, 64)) for vm in Vm)]
    for vcpu in range(8):
        parts += [writer.raw(t, HvmState(t, Vm.GUEST, vcpu, sample_state(t, vcpu)).pack())
                  for t in CODECS if t not in PLATFORM_CODECS and t is not T.VCPU_MSRS]
    parts.append(writer.raw(T.VCPU_REGS, HvmState(T.VCPU_REGS, Vm.GUEST, 7, sample_state(T.VCPU_REGS, 1)).pack()))
    data = with_end(parts)
    for piece in (1 << 20, 5000):
        want = read(data, piece)
        assert read(data, piece, raw_pages="bodies", hvm_bodies=True) == want
        assert len(want) > 70 and "appears twice" in want[-1][0]


def test_valid_context_never_takes_the_slow_way(monkeypatch) -> None:
    """Every context record of a valid stream, VCPU_MSRS included, passes the scan: none
    is decoded one by one (the slow way is for the record an error stops at). The reader
    takes its decoders from reader.HVM_BODY_DECODERS when it reads the header."""
    from migrate.stream import StreamError, reader

    def slow(record_type):
        def decode(body):
            raise StreamError(f"{record_type.name} went the slow way")
        return decode
    monkeypatch.setattr(reader, "HVM_BODY_DECODERS", {t: slow(t) for t in CODECS})
    data = stream()
    got = read(data, 1 << 20, raw_pages="bodies", hvm_bodies=True)
    context_records = [r[0] for r in got if isinstance(r[0], tuple) and r[0][0] in CODECS]
    assert isinstance(got[-1][0], End) and len(context_records) == 2 * len(CODECS)
    bent = read(stream(one(T.VCPU_MSRS, put(U64, msr(1) + 8, 0))), 1 << 20, raw_pages="bodies", hvm_bodies=True)
    assert "VCPU_MSRS went the slow way" in bent[-1][0]       # so the patch is what the reader uses


def writer_at_context(vcpus: int = 1) -> StreamWriter:
    writer = StreamWriter()
    writer.start()
    writer.record(DomainConfig({"name": "x", "vcpus": vcpus}))
    for vm in Vm:
        for record in sample_cpu(vm):
            writer.record(record)
    for vm in Vm:
        writer.record(MemoryLayout.flat(vm, 64))
    return writer


def bodies_of(vm: Vm, bend=None, vcpus: int = 1) -> HvmBodies:
    records = []
    for vcpu in range(vcpus):
        for rtype, body in context(vm):
            if rtype in PLATFORM_CODECS and vcpu:
                continue
            if rtype not in PLATFORM_CODECS:
                U32.pack_into(body, 4, vcpu)
            if bend is not None:
                body, _ = bend(rtype, vm, body)
            # the vCPU as the body says it (a capture's bodies and ids agree)
            records.append((rtype, None if rtype in PLATFORM_CODECS else U32.unpack_from(body, 4)[0], bytes(body)))
    return HvmBodies(vm, tuple(r[0] for r in records), tuple(r[1] for r in records),
                     tuple(len(r[2]) for r in records), b"".join(r[2] for r in records))


@pytest.mark.parametrize("name", [n for n, (bend, error) in CASES.items() if bend is None or
                                  (error is None or "CRC" not in error and "padding" not in error
                                   and "reserved field is 0x1" not in error)])
def test_the_writer_frames_what_the_reader_takes_and_refuses_the_rest(name) -> None:
    """StreamWriter.hvm_bodies checks what it framed as the restore's reader does: each
    bent body the reader refuses (the framing cases aside: the writer frames), the writer
    refuses with the reader's words; the rest it frames as records one by one would."""
    bend, error = CASES[name]
    writer, other = writer_at_context(), writer_at_context()
    bodies = {vm: bodies_of(vm, bend) for vm in Vm}
    if error is None:
        framed = b"".join(writer.hvm_bodies(bodies[vm]) for vm in Vm)
        assert framed == b"".join(other.raw(t, b) for vm in Vm for t, _, b in bodies[vm].bodies())
        return
    with pytest.raises(ValueError, match="writer refuses") as refused:
        for vm in Vm:
            writer.hvm_bodies(bodies[vm])
    error = {   # where the writer's words are its own: it knows whose bodies they are, and
                # decodes a body over its type's cap (the reader refuses it unread)
        "stub context under the guest's id": "VCPU_REGS for STUB vcpu 0 says GUEST vcpu 0",
        "body 8 bytes long": "IOAPIC body is 228 bytes, expected 220",
        "msrs 1025 entries": "VCPU_MSRS count 1025 exceeds 1024",
    }.get(name, error)
    assert error in str(refused.value), refused.value


def test_the_writer_checks_a_run_longer_than_one_scan_and_which_vm_a_body_names() -> None:
    writer = writer_at_context(vcpus=8)
    many = bodies_of(Vm.GUEST, vcpus=8)
    assert len(many.types) > BodyScan.MAX_RUN
    other = writer_at_context(vcpus=8)
    assert writer.hvm_bodies(many) == b"".join(other.raw(t, b) for t, _, b in many.bodies())
    stub_as_guest = bodies_of(Vm.STUB)
    wrong = HvmBodies(Vm.GUEST, stub_as_guest.types, stub_as_guest.vcpu_ids, stub_as_guest.lengths,
                      stub_as_guest.data)
    with pytest.raises(ValueError, match="for GUEST vcpu 0 says STUB vcpu 0"):
        writer_at_context().hvm_bodies(wrong)


def test_the_writer_takes_plain_numbers_for_types_and_vm_and_refuses_other_types() -> None:
    bodies = bodies_of(Vm.STUB)
    plain = HvmBodies(int(Vm.STUB), tuple(int(t) for t in bodies.types), bodies.vcpu_ids, bodies.lengths, bodies.data)
    assert writer_at_context().hvm_bodies(plain) == writer_at_context().hvm_bodies(bodies)
    odd = HvmBodies(Vm.STUB, (0x7F,) + bodies.types[1:], bodies.vcpu_ids, bodies.lengths, bodies.data)
    with pytest.raises(ValueError, match="record type 0x7f is not an HVM context record"):
        writer_at_context().hvm_bodies(odd)
    bent = bodies_of(Vm.STUB, one(T.VCPU_XCRS, put(U32, 8, 17), vm=Vm.STUB))
    plain = HvmBodies(int(Vm.STUB), tuple(int(t) for t in bent.types), bent.vcpu_ids, bent.lengths, bent.data)
    with pytest.raises(ValueError, match="writer refuses: VCPU_XCRS nr_xcrs 17 exceeds 16"):
        writer_at_context().hvm_bodies(plain)


@pytest.mark.parametrize("piece", [1 << 20, 4096])       # smaller pieces never hold a run of two
def test_take_run_hands_out_what_next_record_would(piece) -> None:
    """A restore takes the rest of a run in one call (StreamReader.take_run): the same
    records, and the reader where next_record would have left it (``last``, index,
    offset), END's digest and counts then matching."""
    from migrate.stream import DONE, NEED_DATA, StreamReader
    data = stream()

    def read_all(batch: bool) -> tuple[list, tuple, int]:
        reader, records, longest = StreamReader(raw_pages="bodies", hvm_bodies=True), [], 0
        for at in range(0, len(data), piece):
            reader.feed(data[at:at + piece])
            while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
                run = reader.take_run() if batch and isinstance(record, HvmState) else []
                longest = max(longest, len(run))
                records += [record] + run
        reader.eof()                # END read: its counts and digest matched
        return records, (reader.last, reader._index, reader._offset), longest
    (one, one_at, _), (batched, batched_at, longest) = read_all(False), read_all(True)
    assert batched == one and batched_at == one_at
    assert sum(isinstance(r, HvmState) for r in batched) == 2 * len(CODECS)
    assert longest >= (len(CODECS) - 1 if piece >= len(data) else 2)      # runs were taken
