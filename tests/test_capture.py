"""The C capture of HVM context records (migrate/capture.py, migrate/kvm/capture.c) gives
what the Python capture and ``HvmState.pack`` give, on real VMs; its copy programs come
from the stream's layouts and the kernel's structs, and a disagreement between the two is
refused when the program is made."""
import pytest

from migrate.capture import segments
from migrate.domain import Domain, DomainConfig
from migrate.engine.state import state_bodies
from migrate.kvm._lib import ffi
from migrate.kvm.state import MSR_IA32_TSC
from migrate.engine.state import config_record
from migrate.stream import MemoryLayout, StreamWriter
from migrate.stream.errors import StreamError
from migrate.stream.hvm import DTABLE, SEGMENT, Field, HvmBodies, HvmState, Layout
from migrate.stream.records import RecordType, Vm


def test_segments_copy_the_carried_fields_and_skip_the_padding():
    assert segments(SEGMENT, ffi.typeof("struct kvm_segment")) == [(0, 23)]   # "padding" is the 24th byte
    assert segments(DTABLE, ffi.typeof("struct kvm_dtable"), 100) == [(100, 10)]


def test_segments_refuse_a_field_whose_size_differs_from_the_kernel():
    wrong = Layout(Field("base", "I"), Field("limit", "H"))
    with pytest.raises(ValueError, match="base: 8 bytes in the kernel, 4 in the stream"):
        segments(wrong, ffi.typeof("struct kvm_dtable"))


TMCCT = 0x390           # the LAPIC timer's current count register


def _records(state, vm):
    return state_bodies(state, vm)[0]


def test_hvm_bodies_frame_as_the_records_would():
    regs = HvmState(RecordType.VCPU_REGS, Vm.GUEST, 0, {name: i for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
         "r14", "r15", "rip", "rflags"))})
    mp = HvmState(RecordType.VCPU_MP_STATE, Vm.GUEST, 0, 3)        # a body of 12 bytes: padded
    bodies = HvmBodies.of(Vm.GUEST, [regs, mp])

    def started() -> tuple[StreamWriter, bytes]:
        writer = StreamWriter()
        head = writer.start() + writer.record(config_record(DomainConfig("w", "idle", 16 << 20, stub=False)))
        head += writer.record(MemoryLayout(Vm.GUEST, ((0, 4096),)))
        return writer, head + writer.record(MemoryLayout(Vm.STUB, ()))

    one, head = started()
    other, _ = started()
    framed = one.hvm_bodies(bodies)
    assert framed == other.record(regs) + other.record(mp)
    assert one.finish() == other.finish()           # the same counts and digest in END
    again, _ = started()
    again.hvm_bodies(bodies)
    with pytest.raises(ValueError, match="VCPU_REGS for GUEST vcpu 0 appears twice"):
        again.hvm_bodies(HvmBodies.of(Vm.GUEST, [regs]))


def _same_but_time(ours: HvmState, theirs: HvmState) -> None:
    """Equal, but for what runs on while a domain is paused: the TSC and kvmclock (the C
    capture ran after the Python one, so no earlier) and the LAPIC timer's current count."""
    a, b = ours.state, theirs.state
    if ours.type is RecordType.VCPU_LAPIC:
        a, b = a[:TMCCT] + a[TMCCT + 4:], b[:TMCCT] + b[TMCCT + 4:]
    if ours.type is RecordType.VCPU_MSRS:
        assert a.keys() == b.keys()
        assert a.pop(MSR_IA32_TSC) >= b.pop(MSR_IA32_TSC)
    elif ours.type is RecordType.CLOCK:
        for key in ("clock", "realtime", "host_tsc"):
            assert a.pop(key) >= b.pop(key)
    assert (ours.type, ours.vm, ours.vcpu_id, a) == (theirs.type, theirs.vm, theirs.vcpu_id, b)


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_c_capture_gives_the_records_the_python_capture_gives(domains, vcpus):
    workload = "smp" if vcpus > 1 else "ledger"
    args = [] if vcpus > 1 else [1, 64]
    dom = Domain.boot(DomainConfig("cap", workload, 32 << 20, args=args, vcpus=vcpus, stub=True))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for("ok", 10)
    dom.pause()
    state = dom.capture()
    python = {Vm.GUEST: _records(state, Vm.GUEST), Vm.STUB: _records(state.stub, Vm.STUB)}
    captured = dom.capture_records()
    assert set(captured) == {Vm.GUEST, Vm.STUB}
    assert captured[Vm.GUEST][1] == [] and captured[Vm.STUB][1] == list(state.stub.devices)
    for vm, (bodies, _) in captured.items():
        want = python[vm]
        assert (bodies.vm, bodies.types, bodies.vcpu_ids, bodies.lengths) == \
            (want.vm, want.types, want.vcpu_ids, want.lengths)
        assert sorted({i for i in bodies.vcpu_ids if i is not None}) == list(range(vcpus if vm is Vm.GUEST else 1))
        for ours, theirs in zip(bodies.records(), want.records()):
            _same_but_time(ours, theirs)
    # a second capture of the still paused domain: only the clocks moved
    again = dom.capture_records()
    for ours, theirs in zip(again[Vm.GUEST][0].records(), captured[Vm.GUEST][0].records()):
        _same_but_time(ours, theirs)


@pytest.mark.kvm
def test_c_capture_needs_a_paused_domain(domains):
    dom = Domain.boot(DomainConfig("cap2", "idle", 16 << 20, stub=False))
    domains.append(dom)
    dom.resume()
    with pytest.raises(Exception, match="capture needs a paused domain"):
        dom.capture_records()
    dom.pause()
    captured = dom.capture_records()
    assert set(captured) == {Vm.GUEST}
    with pytest.raises(StreamError):        # a body cut short is refused by the reader's decoder
        HvmState.unpack_as(RecordType.VCPU_REGS, captured[Vm.GUEST][0].data[:20])
