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
from migrate.stream.hvm import CODECS, PLATFORM_CODECS
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
