"""The C capture of HVM context records (migrate/capture.py, migrate/kvm/capture.c) gives
what the Python capture and ``HvmState.pack`` give, on real VMs; its copy programs come
from the stream's layouts and the kernel's structs, and a disagreement between the two is
refused when the program is made."""
import dataclasses
import struct

import pytest

from migrate import capture
from migrate.capture import StateApply, segments
from migrate.cpu import CpuPolicy, HostCpu, MsrEntry, msrs_as_saved
from migrate.domain import Domain, DomainConfig, _touches_memory
from migrate.engine.state import state_bodies
from migrate.kvm import KvmError
from migrate.kvm._lib import ffi
from migrate.kvm.state import MSR_IA32_TSC
from migrate.engine.state import config_record
from migrate.stream import MemoryLayout, StreamWriter
from migrate.stream.errors import StreamError
from migrate.stream import hvm as layouts
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
    elif ours.type is RecordType.VCPU_XSAVE and a != b:
        # seen once (2026-12-07) and not since: say where the two regions differ (XSTATE_BV
        # is the 8 bytes at 512), so that a recurrence tells what changed
        differ = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        raise AssertionError(f"{ours.vm.name} vcpu {ours.vcpu_id} XSAVE differs at {len(differ)} bytes, "
                             f"first {differ[:16]}: {a[differ[0]:differ[0] + 16].hex()} "
                             f"against {b[differ[0]:differ[0] + 16].hex()}; "
                             f"XSTATE_BV {a[512:520].hex()} against {b[512:520].hex()}")
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
    assert not captured[Vm.GUEST][1]
    assert [dataclasses.asdict(r) for r in captured[Vm.STUB][1].records()] == list(state.stub.devices)
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


KERNEL_GS_BASE = 0xC0000102


def _no_decoded_msrs(*_):
    raise AssertionError("the MSRs were decoded and set from Python, not from their body")


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_c_apply_sets_what_the_python_apply_sets(domains, vcpus, monkeypatch):
    """The same captured state applied to two never-run domains, by Domain.apply
    (the KVM layer, from dicts) and by Domain.apply_state and finish_apply (C, from bodies): the two
    read back the same, the stub's included; and the restored guest runs on."""
    workload, args = ("smp", []) if vcpus > 1 else ("ledger", [1, 64])
    cfg = DomainConfig("ap", workload, 32 << 20, args=args, vcpus=vcpus, stub=True)
    src = Domain.boot(cfg)
    domains.append(src)
    src.resume()
    src.console.wait_for("ok", 10)
    src.pause()
    # the last MSR of the list (swapgs is never used: the guests do not read it) set apart
    # from its reset value in each vCPU, so that an apply that misses it shows
    for i, vcpu in enumerate(src.vcpus + [src.stub.vcpu]):
        vcpu.set_msrs({KERNEL_GS_BASE: 0x7F00_1234_5000 + 0x1000 * i})
    state = src.capture()
    records = {vm: bodies for vm, (bodies, _) in src.capture_records().items()}
    memory, stub_memory = bytes(src.memory), bytes(src.stub_memory)
    targets = []
    for how in ("python", "c", "c, MSRs decoded"):
        dst = Domain(cfg, cpu=src.cpu, stub_cpu=src.stub.cpu)
        domains.append(dst)
        dst.memory[:] = memory
        dst.stub_memory[:] = stub_memory
        if how == "python":
            dst.apply(state)
        else:
            # a policy fitted to this host has only MSRs it saves: their bodies go as they are
            assert dst._applier.direct_msrs == dst.cpu.msr_indices and KERNEL_GS_BASE in dst.cpu.msr_indices
            assert dst.stub.applier.direct_msrs == dst.stub.cpu.msr_indices
            if how == "c, MSRs decoded":        # the other way, through msrs_to_apply
                dst._applier = StateApply(dst.vm, dst.vcpus)
                dst.stub.applier = StateApply(dst.stub.vm, [dst.stub.vcpu])
                dst.apply_state(records)
                dst.finish_apply(list(state.stub.devices))
            else:
                with monkeypatch.context() as m:       # the bodies went as they are, or this fails
                    m.setattr(capture, "set_msrs", _no_decoded_msrs)
                    dst.apply_state(records)
                    dst.finish_apply(list(state.stub.devices))
        targets.append(dst)
    python, *cs = (dst.capture() for dst in targets)
    for c in cs:
        for vm in (Vm.GUEST, Vm.STUB):
            ours = _records(c if vm is Vm.GUEST else c.stub, vm).records()
            theirs = _records(python if vm is Vm.GUEST else python.stub, vm).records()
            assert [r.type for r in ours] == [r.type for r in theirs]
            for a, b in zip(ours, theirs):
                if a.type is RecordType.CLOCK:      # kvmclock runs on: only its value was applied
                    continue
                _same_but_time(a, b)
    for dst in targets[1:]:
        mark = dst.console.next_index
        dst.resume()
        dst.console.wait_for(r"ok", 10, start=mark)
        dst.pause()


@pytest.mark.kvm
@pytest.mark.parametrize("direct", [True, False])
def test_an_msr_value_kvm_refuses_is_named_either_way(domains, direct, monkeypatch):
    """IA32_LSTAR (0xC0000082) holding a non-canonical address: KVM_SET_MSRS sets the MSRs
    before it and stops there; the apply fails naming the MSR and the value, whether the
    body went to KVM as it is or through msrs_to_apply."""
    cfg = DomainConfig("lstar", "idle", 16 << 20, stub=True)
    src = Domain.boot(cfg)
    domains.append(src)
    src.pause()
    records = {vm: bodies for vm, (bodies, _) in src.capture_records().items()}
    guest = records[Vm.GUEST]
    k = guest.types.index(RecordType.VCPU_MSRS)
    at = sum(guest.lengths[:k])
    msrs = bytearray(guest.data[at:at + guest.lengths[k]])
    entries = [struct.unpack_from("<IIQ", msrs, 16 + 16 * i)[0] for i in range((len(msrs) - 16) // 16)]
    assert 0xC0000082 in entries                # IA32_LSTAR: in every model's MSRs
    struct.pack_into("<Q", msrs, 16 + 16 * entries.index(0xC0000082) + 8, 1 << 63)
    records[Vm.GUEST] = dataclasses.replace(guest, data=guest.data[:at] + bytes(msrs) + guest.data[at + len(msrs):])
    dst = Domain(cfg, cpu=src.cpu, stub_cpu=src.stub.cpu)
    domains.append(dst)
    if not direct:
        dst._applier = StateApply(dst.vm, dst.vcpus)
    assert (dst._applier.direct_msrs is not None) is direct
    if direct:
        monkeypatch.setattr(capture, "set_msrs", _no_decoded_msrs)
    with pytest.raises(KvmError, match="MSR 0xc0000082 refused value 0x8000000000000000"):
        dst.apply_state(records)


def test_msrs_go_as_saved_only_where_msrs_to_apply_would_keep_them():
    host = HostCpu(cpuid=(), msrs=frozenset({0x10, 0x3B, 0x174, 0x277}))
    policy = CpuPolicy(model="t", cpuid=(), msrs=(MsrEntry(0x10), MsrEntry(0x3B), MsrEntry(0x277)), tsc_khz=1,
                       strict_tsc=False)
    assert msrs_as_saved(policy, host) == [0x10, 0x3B, 0x277]
    assert msrs_as_saved(dataclasses.replace(policy, legacy=True), host) is None
    missing = dataclasses.replace(policy, msrs=policy.msrs + (MsrEntry(0x6E0),))
    assert msrs_as_saved(missing, host) is None         # msrs_to_apply drops it or refuses
    before_tsc = HostCpu(cpuid=(), msrs=host.msrs | {0x1})
    assert msrs_as_saved(dataclasses.replace(policy, msrs=(MsrEntry(0x1),) + policy.msrs), before_tsc) is None
    no_tsc = dataclasses.replace(policy, msrs=policy.msrs[1:])
    assert msrs_as_saved(no_tsc, host) == [0x3B, 0x277]


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


def test_an_msrs_body_goes_as_it_is_only_with_exactly_those_msrs():
    from types import SimpleNamespace

    def body(*indices):
        return struct.pack("<IIII", 0, 0, len(indices), 0) + b"".join(struct.pack("<IIQ", i, 0, 7) for i in indices)
    takes = StateApply.takes_msrs_as_saved
    direct = SimpleNamespace(direct_msrs=[0x10, 0x3B, 0x277])
    assert takes(direct, body(0x10, 0x3B, 0x277))
    assert not takes(direct, body(0x10, 0x3B, 0x276))            # the same count, another MSR
    assert not takes(direct, body(0x10, 0x3B))
    assert not takes(direct, body(0x10, 0x3B, 0x277, 0x6E0))
    assert not takes(SimpleNamespace(direct_msrs=None), body(0x10))
    assert takes(SimpleNamespace(direct_msrs=[]), body())


def _changed(bodies: HvmBodies, change) -> HvmBodies:
    """``bodies`` with each record's state passed through ``change(record)`` (in place)."""
    records = bodies.records()
    for record in records:
        change(record)
    return HvmBodies.of(bodies.vm, records)


def _pae(record) -> None:
    """A vCPU in 32-bit PAE paging whose PDPTRs KVM must read from guest memory."""
    if record.type is RecordType.VCPU_SREGS:
        record.state.update(cr0=record.state["cr0"] | 1 << 31 | 1, cr4=record.state["cr4"] | 1 << 5,
                            efer=record.state["efer"] & ~(1 << 10 | 1 << 8))
        record.state["cs"] = dict(record.state["cs"], l=0)             # no 64-bit code outside long mode
    elif record.type is RecordType.VCPU_PDPTRS:
        record.state["flags"] = 0


def test_what_waits_for_the_pages():
    """_touches_memory: PAE paging without PDPTRs KVM takes from the record, or a KVM wall
    clock MSR set, make KVM read or write guest memory as it applies the vCPU."""
    def bodies(cr0=0x80000011, cr4=0x20, efer=0x500, msrs=None, pdptrs=None):
        sregs = dict(layouts.SREGS.zero(), cr0=cr0, cr4=cr4, efer=efer)
        out = {RecordType.VCPU_SREGS: HvmState(RecordType.VCPU_SREGS, Vm.GUEST, 0, sregs).pack(),
               RecordType.VCPU_MSRS: HvmState(RecordType.VCPU_MSRS, Vm.GUEST, 0, msrs or {0x10: 5}).pack()}
        if pdptrs is not None:
            out[RecordType.VCPU_PDPTRS] = HvmState(RecordType.VCPU_PDPTRS, Vm.GUEST, 0,
                                                   {"flags": pdptrs, "pdptrs": [0] * 4}).pack()
        return out
    assert not _touches_memory(bodies(), sregs2=True)                          # long mode
    assert not _touches_memory(bodies(cr0=0x11, efer=0), sregs2=False)          # no paging
    assert _touches_memory(bodies(efer=0), sregs2=True)                         # PAE, no PDPTRS record
    assert _touches_memory(bodies(efer=0, pdptrs=0), sregs2=True)               # ... not valid
    assert _touches_memory(bodies(efer=0, pdptrs=1), sregs2=False)              # ... KVM cannot take them
    assert not _touches_memory(bodies(efer=0, pdptrs=1), sregs2=True)
    assert not _touches_memory(bodies(cr4=0, efer=0), sregs2=False)             # 32-bit paging: no PDPTRs
    assert _touches_memory(bodies(msrs={0x10: 5, 0x11: 0x9000}), sregs2=True)  # wall clock
    assert _touches_memory(bodies(msrs={0x4B564D00: 0x9000}), sregs2=True)
    assert not _touches_memory(bodies(msrs={0x11: 0, 0x4B564D00: 0}), sregs2=True)


@pytest.mark.kvm
def test_early_apply_declines_state_that_touches_guest_memory(domains):
    """Domain.apply_state(early=True) applies a long-mode guest's state at once, but for a
    vCPU KVM would load PDPTRs for from guest memory it applies nothing and says so; END
    then applies it (early=False)."""
    cfg = DomainConfig("early", "idle", 16 << 20, stub=True)
    src = Domain.boot(cfg)
    domains.append(src)
    src.resume()
    src.console.wait_for(r"idle ticks=\d+", 10)
    src.pause()
    records = {vm: bodies for vm, (bodies, _) in src.capture_records().items()}
    rip = src.vcpus[0].get_regs()["rip"]
    for vm in (Vm.GUEST, Vm.STUB):
        pae = {**records, vm: _changed(records[vm], _pae)}
        dst = Domain(cfg, cpu=src.cpu, stub_cpu=src.stub.cpu)
        domains.append(dst)
        before = dst.vcpus[0].get_regs(), dst.stub.vcpu.get_regs()
        assert dst.apply_state(pae, early=True) is False
        assert (dst.vcpus[0].get_regs(), dst.stub.vcpu.get_regs()) == before      # nothing applied
        assert dst.apply_state(pae) is True and dst.vcpus[0].get_regs()["rip"] == rip
    dst = Domain(cfg, cpu=src.cpu, stub_cpu=src.stub.cpu)
    domains.append(dst)
    dst.memory[:] = bytes(src.memory)
    dst.stub_memory[:] = bytes(src.stub_memory)
    assert dst.apply_state(records, early=True) is True and dst.vcpus[0].get_regs()["rip"] == rip
    dst.finish_apply([])
    mark = dst.console.next_index
    dst.resume()
    dst.console.wait_for(r"idle ticks=\d+", 10, start=mark)
