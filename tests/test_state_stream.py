"""A real guest's captured state survives the stream's HVM context records
byte for byte: the KVM layer's plain data and the stream agree on shape."""
import pytest

from migrate.domain import Domain, DomainConfig
from migrate.kvm.structs import PADDING
from migrate.stream.hvm import HvmState
from migrate.stream.records import RecordType, Vm

pytestmark = pytest.mark.kvm

VCPU_FIELDS = {
    RecordType.VCPU_REGS: "regs", RecordType.VCPU_SREGS: "sregs",
    RecordType.VCPU_XSAVE: "xsave", RecordType.VCPU_XCRS: "xcrs",
    RecordType.VCPU_MSRS: "msrs", RecordType.VCPU_LAPIC: "lapic",
    RecordType.VCPU_EVENTS: "events", RecordType.VCPU_MP_STATE: "mp_state",
    RecordType.VCPU_DEBUGREGS: "debugregs", RecordType.VCPU_PDPTRS: "pdptrs",
}


def carried(value):
    """Drop the kernel structs' padding, which the stream gives back as zero."""
    if isinstance(value, dict):
        return {k: carried(v) for k, v in value.items() if not PADDING.match(str(k))}
    if isinstance(value, list):
        return [carried(v) for v in value]
    return value


PLATFORM_FIELDS = {RecordType.IOAPIC: "ioapic", RecordType.PIT: "pit", RecordType.CLOCK: "clock"}


def test_captured_state_round_trips_through_hvm_records(domains):
    dom = Domain.boot(DomainConfig("ctx", "ledger", 32 << 20, args=[1, 64]))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for("ledger ok gen=2 ", 10)
    dom.pause()
    state = dom.capture()
    vcpu = state.vcpus[0]
    carried_fields = dict(VCPU_FIELDS)
    if dom.vm.kvm.has("KVM_CAP_SREGS2"):     # captured where KVM has it; long mode: not PAE paging
        assert vcpu.pdptrs is not None and vcpu.pdptrs["flags"] == 0, vcpu.pdptrs
    else:
        assert vcpu.pdptrs is None
        del carried_fields[RecordType.VCPU_PDPTRS]
    for rtype, attr in carried_fields.items():
        value = getattr(vcpu, attr)
        body = HvmState(rtype, Vm.GUEST, 0, value).pack()
        back = HvmState.unpack_as(rtype, body).state
        assert carried(back) == value, attr
    for rtype, attr in PLATFORM_FIELDS.items():
        value = getattr(state.platform, attr)
        back = HvmState.unpack_as(rtype, HvmState(rtype, Vm.GUEST, None, value).pack()).state
        assert carried(back) == value, attr
    pic = {"master": state.platform.pic_master, "slave": state.platform.pic_slave}
    assert carried(HvmState.unpack_as(RecordType.PIC, HvmState(RecordType.PIC, Vm.GUEST, None, pic).pack()).state) == pic
    # and what comes back applies: resume from the decoded state
    decoded = {attr: HvmState.unpack_as(rt, HvmState(rt, Vm.GUEST, 0, getattr(vcpu, attr)).pack()).state
               for rt, attr in carried_fields.items()}
    for attr, value in decoded.items():
        setattr(vcpu, attr, value)
    memory, stub_memory = bytes(dom.memory), bytes(dom.stub_memory)
    dom.destroy()
    dst = Domain.restore(state, memory, stub_memory)
    domains.append(dst)
    dst.resume()
    dst.console.wait_for("ledger ok gen=4 ", 10)
