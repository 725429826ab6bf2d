"""The KVM layer: errors, state get/set identity, dirty bitmaps."""
import errno
import random

import pytest

from migrate.kvm import DirtyBitmap, Kvm, KvmError
from migrate.kvm.dirty import merged_pfns
from migrate.kvm.state import PlatformState, VcpuState


def test_kvm_error_names_ioctl_and_errno():
    err = KvmError("KVM_SET_REGS", errno.EINVAL)
    assert "KVM_SET_REGS" in str(err) and "EINVAL" in str(err)
    assert err.errno == errno.EINVAL


def test_dirty_bitmap_pfns_count_union():
    base = 0x100
    pfns = [base + i for i in (0, 5, 63, 64, 1000, 1030)]
    a = DirtyBitmap.from_pfns(pfns, 1031, base_pfn=base)
    assert list(a.pfns()) == pfns and a.count() == len(pfns)
    assert base + 5 in a and base + 6 not in a and 0 not in a
    b = DirtyBitmap.from_pfns([base + 6, base + 5], 1031, base_pfn=base)
    assert list((a | b).pfns()) == sorted(set(pfns) | {base + 6})
    assert not DirtyBitmap.empty(1031, base) and bool(a)


def test_dirty_bitmap_matches_a_python_scan():
    rng = random.Random(7)
    bits = bytes(rng.getrandbits(8) & rng.getrandbits(8) for _ in range(8 * 300))
    bm = DirtyBitmap(bits, 300 * 64)
    expect = [i for i in range(300 * 64) if bits[i // 8] >> (i % 8) & 1]
    assert list(bm.pfns()) == expect


def test_merged_pfns_ors_the_other_bitmap_in_and_refuses_another_shape():
    """kvm.dirty.merged_pfns: each slot's bitmap ORed in place with the other (the stub's
    window of the guest), its pages listed in order from the slot's base; a pair of bitmaps
    of different sizes is refused (C reads the other for the first's length)."""
    own = [bytearray(16), bytearray(8)]
    other = [bytearray(16), bytearray(8)]
    own[0][0], other[0][9], other[1][0] = 0b101, 0b1, 0b10
    assert list(merged_pfns(own, other, [0, 1000])) == [0, 2, 72, 1001]
    assert own[0][9] == 1 and own[1][0] == 0b10
    assert list(merged_pfns(own, None, [0, 1000])) == [0, 2, 72, 1001]
    with pytest.raises(ValueError, match="slot 1: bitmaps of 8 and 16 bytes"):
        merged_pfns(own, [bytearray(16), bytearray(16)], [0, 1000])


def test_dirty_bitmap_rejects_bad_input():
    with pytest.raises(ValueError):
        DirtyBitmap(b"\0" * 7, 64)
    with pytest.raises(ValueError):
        DirtyBitmap.from_pfns([64], 64)
    with pytest.raises(ValueError):
        DirtyBitmap.empty(64) | DirtyBitmap.empty(128)


@pytest.mark.kvm
def test_every_state_ioctl_round_trips_on_a_fresh_vm():
    """Every state ioctl, get then set, on a vCPU of the baseline model (its leaves and its
    MSRs, as a domain's: what the host's own CPUID and MSR list hold differs by host)."""
    from migrate import cpu
    policy = cpu.policy_for("baseline", cpu.this_host())
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vm.set_tss_addr(0xFFFBD000)
            vm.create_irqchip()
            vm.create_pit2()
            vm.add_memory(0, 0, 2 << 20)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(cpu.cpuid_for_vcpu(policy.cpuid, 0))
            state = VcpuState.capture(vcpu, policy.msr_indices)
            assert sorted(state.msrs) == sorted(policy.msr_indices)
            state.regs["rax"] = 0x1234
            state.apply(vcpu)
            again = VcpuState.capture(vcpu, policy.msr_indices)
            ticking = {0x10}             # IA32_TSC goes on
            assert again.regs["rax"] == 0x1234
            assert {i: v for i, v in again.msrs.items() if i not in ticking} == \
                {i: v for i, v in state.msrs.items() if i not in ticking}
            assert again.sregs == state.sregs and again.xcrs == state.xcrs
            assert again.lapic == state.lapic and again.debugregs == state.debugregs
            platform = PlatformState.capture(vm)
            platform.ioapic["id"] = 0
            platform.apply(vm)
            assert PlatformState.capture(vm).ioapic["redirtbl"] == platform.ioapic["redirtbl"]
            with pytest.raises(KvmError, match="KVM_GET_MSRS.*0xdeadbeef"):
                vcpu.get_msrs([0xDEADBEEF])
        finally:
            vm.close()


@pytest.mark.kvm
def test_overlapping_slot_is_a_named_error():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vm.add_memory(0, 0, 1 << 20)
            with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION.*(EEXIST|EINVAL)"):
                vm.add_memory(1, 0x80000, 1 << 20)
            assert 1 not in vm.slots
        finally:
            vm.close()
