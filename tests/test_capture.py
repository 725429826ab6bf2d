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
    capture ran after the Python one, so no earlier), the LAPIC timer's current count, and
    when the PIT's counters were loaded."""
    a, b = ours.state, theirs.state
    if ours.type is RecordType.VCPU_LAPIC:
        a, b = a[:TMCCT] + a[TMCCT + 4:], b[:TMCCT] + b[TMCCT + 4:]
    if ours.type is RecordType.PIT:         # KVM_SET_PIT2 loads each counter at its own time
        for state in (a, b):
            for channel in state["channels"]:
                channel.pop("count_load_time")
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


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_c_apply_sets_what_the_python_apply_sets(domains, vcpus):
    """The same captured state applied to two never-run domains, by Domain.apply
    (the KVM layer, from dicts) and by Domain.apply_records (C, from bodies): the two
    read back the same, the stub's included; and the restored guest runs on."""
    workload, args = ("smp", []) if vcpus > 1 else ("ledger", [1, 64])
    cfg = DomainConfig("ap", workload, 32 << 20, args=args, vcpus=vcpus, stub=True)
    src = Domain.boot(cfg)
    domains.append(src)
    src.resume()
    src.console.wait_for("ok", 10)
    src.pause()
    state = src.capture()
    records = {vm: bodies for vm, (bodies, _) in src.capture_records().items()}
    memory, stub_memory = bytes(src.memory), bytes(src.stub_memory)
    targets = []
    for how in ("python", "c"):
        dst = Domain(cfg, cpu=src.cpu, stub_cpu=src.stub.cpu)
        domains.append(dst)
        dst.memory[:] = memory
        dst.stub_memory[:] = stub_memory
        if how == "python":
            dst.apply(state)
        else:
            dst.apply_records(records, list(state.stub.devices))
        targets.append(dst)
    python, c = (dst.capture() for dst in targets)
    for vm in (Vm.GUEST, Vm.STUB):
        ours = _records(c if vm is Vm.GUEST else c.stub, vm).records()
        theirs = _records(python if vm is Vm.GUEST else python.stub, vm).records()
        assert [r.type for r in ours] == [r.type for r in theirs]
        for a, b in zip(ours, theirs):
            if a.type is RecordType.CLOCK:      # kvmclock runs on: only its value was applied
                continue
            _same_but_time(a, b)
    mark = targets[1].console.next_index
    targets[1].resume()
    targets[1].console.wait_for(r"ok", 10, start=mark)


def test_the_reader_keeps_bodies_with_the_same_checks():
    """check_body refuses what unpack_as refuses, and keeps the body it was given."""
    regs = HvmState(RecordType.VCPU_REGS, Vm.GUEST, 3, dict.fromkeys(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
         "r14", "r15", "rip", "rflags"), 7))
    body = regs.pack()
    kept = HvmState.check_body(RecordType.VCPU_REGS, body)
    assert (kept.type, kept.vm, kept.vcpu_id, kept.state, kept.body) == (RecordType.VCPU_REGS, Vm.GUEST, 3, None, body)
    assert kept.decoded() == regs
    with pytest.raises(StreamError, match="VCPU_REGS"):
        HvmState.check_body(RecordType.VCPU_REGS, body[:-8])
    with pytest.raises(StreamError, match="reserved vcpu_id"):
        HvmState.check_body(RecordType.CLOCK, b"\0" * 4 + b"\1\0\0\0" + bytes(28))
    with pytest.raises(StreamError):
        HvmState.check_body(RecordType.VCPU_REGS, b"\x07\0\0\0" + body[4:])     # no such VM
    xcrs = bytearray(HvmState(RecordType.VCPU_XCRS, Vm.GUEST, 0, {
        "nr_xcrs": 0, "flags": 0, "xcrs": [{"xcr": 0, "value": 0}] * 16}).pack())
    xcrs[8:12] = (17).to_bytes(4, "little")
    with pytest.raises(StreamError, match="nr_xcrs 17"):        # a rule on values: decoded and checked
        HvmState.check_body(RecordType.VCPU_XCRS, bytes(xcrs))
