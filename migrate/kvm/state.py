"""Complete vCPU and platform state as plain data, and its capture/apply.

Each component has a pure capture (``VcpuState.capture(vcpu, msr_indices)``,
``PlatformState.capture(vm)``) returning plain data (ints, bytes, lists,
dicts keyed by the kernel's field names), and an ``apply`` taking what the
state does not carry (the target vCPU or VM) as an argument.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import KvmError

# MSRs that must be written before the others: the TSC first, so that
# MSRs derived from it (TSC_ADJUST, TSC_DEADLINE) are interpreted against
# the restored TSC.
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
PDPTRS_VALID = 1            # KVM_SREGS2_FLAGS_PDPTRS_VALID


def saveable_msrs(vcpu, indices: list[int]) -> list[int]:
    """The MSRs of ``indices`` (KVM_GET_MSR_INDEX_LIST) this vCPU can read: the ones a
    capture carries. KVM_GET_MSRS stops at the first refused index, so ask one by one."""
    saveable = []
    for index in indices:
        try:
            vcpu.get_msrs([index])
        except KvmError:
            continue
        saveable.append(index)
    return saveable


@dataclass
class VcpuState:
    vcpu_id: int
    regs: dict
    sregs: dict
    xsave: bytes          # carries the legacy FPU/SSE area too: no separate KVM_GET_FPU
    xcrs: dict
    msrs: dict
    lapic: bytes
    events: dict
    mp_state: int
    debugregs: dict
    # the PAE page-directory pointers KVM holds ({"flags", "pdptrs"}: KVM_GET_SREGS2; flags
    # PDPTRS_VALID when the vCPU is in PAE paging); None: not known (KVM without
    # KVM_CAP_SREGS2, or a stream without the record)
    pdptrs: dict | None = None

    @classmethod
    def capture(cls, vcpu, msr_indices: list[int]) -> "VcpuState":
        """Capture from a vCPU that is not running.

        Order: nothing here changes state, so any order is correct; the
        vCPU must have left KVM_RUN through an immediate_exit re-entry so
        pending port/MMIO reads are complete (Vcpu.kick guarantees it).
        """
        return cls(
            vcpu_id=vcpu.id,
            regs=vcpu.get_regs(),
            sregs=vcpu.get_sregs(),
            xsave=vcpu.get_xsave(),
            xcrs=vcpu.get_xcrs(),
            msrs=vcpu.get_msrs(msr_indices),
            lapic=vcpu.get_lapic(),
            events=vcpu.get_vcpu_events(),
            mp_state=vcpu.get_mp_state(),
            debugregs=vcpu.get_debugregs(),
            pdptrs=_pdptrs(vcpu.get_sregs2()) if vcpu.vm.kvm.has("KVM_CAP_SREGS2") else None,
        )

    def apply(self, vcpu) -> None:
        """Apply to a vCPU that has CPUID set and has not run since.

        Order (each step depends on the ones before it):
          1. sregs      - CR0/CR4/EFER decide how the rest is interpreted
          1a. pdptrs    - in PAE paging, KVM_SET_SREGS loaded the PDPTRs from guest memory at
                          CR3, which the guest may have changed since it loaded CR3: the ones
                          it was using, if known and valid (KVM_SET_SREGS2 with the sregs
                          just set); else left as loaded
          2. regs       - RFLAGS/RIP after the mode is known
          3. xsave      - FPU/SSE/AVX (supersedes KVM_SET_FPU where present)
          4. xcrs       - XCR0 after the xsave image it describes
          5. lapic      - before MSRs: TSC_DEADLINE needs the LAPIC mode set
          6. msrs       - TSC first, then the rest
          7. mp_state   - runnable/halted after the registers are in place
          8. events     - pending exceptions/interrupts/NMI last but one
          9. debugregs
        """
        step = "sregs"
        try:
            vcpu.set_sregs(self.sregs)
            if self.pdptrs is not None and self.pdptrs["flags"] & PDPTRS_VALID                     and vcpu.vm.kvm.has("KVM_CAP_SREGS2"):
                step = "pdptrs"
                vcpu.set_sregs2({**vcpu.get_sregs2(), **self.pdptrs})
            step = "regs"
            vcpu.set_regs(self.regs)
            step = "xsave"
            vcpu.set_xsave(self.xsave)
            step = "xcrs"
            vcpu.set_xcrs(self.xcrs)
            step = "lapic"
            vcpu.set_lapic(self.lapic)
            step = "msrs"
            set_msrs(vcpu, self.msrs)
            step = "mp_state"
            vcpu.set_mp_state(self.mp_state)
            step = "events"
            vcpu.set_vcpu_events(self.events)
            step = "debugregs"
            vcpu.set_debugregs(self.debugregs)
        except KvmError as exc:
            raise KvmError(exc.ioctl, exc.errno, f"applying vCPU {self.vcpu_id} state, step {step}") from exc


def msr_order(indices) -> list[int]:
    """The order KVM_SET_MSRS takes MSRs in: the TSC first (KVM sets them in the order
    given), the rest as they come."""
    return ([MSR_IA32_TSC] if MSR_IA32_TSC in indices else []) + [i for i in indices if i != MSR_IA32_TSC]


def set_msrs(vcpu, msrs: dict[int, int]) -> None:
    """KVM_SET_MSRS, in :func:`msr_order`."""
    vcpu.set_msrs({i: msrs[i] for i in msr_order(msrs)})


def _pdptrs(sregs2: dict) -> dict:
    return {"flags": sregs2["flags"], "pdptrs": list(sregs2["pdptrs"])}


@dataclass
class PlatformState:
    pic_master: dict
    pic_slave: dict
    ioapic: dict
    pit: dict
    clock: dict

    @classmethod
    def capture(cls, vm) -> "PlatformState":
        return cls(
            pic_master=vm.get_irqchip("pic_master"),
            pic_slave=vm.get_irqchip("pic_slave"),
            ioapic=vm.get_irqchip("ioapic"),
            pit=vm.get_pit2(),
            clock=vm.get_clock(),
        )

    def apply(self, vm) -> None:
        """Apply to a VM with an irqchip and PIT, before its vCPUs run.

        Order: irqchips (PIC master, slave, IOAPIC), then the PIT whose
        output feeds them, then kvmclock last so the guest's clock does
        not advance across the rest of the restore.
        """
        step = "pic_master"
        try:
            vm.set_irqchip("pic_master", self.pic_master)
            step = "pic_slave"
            vm.set_irqchip("pic_slave", self.pic_slave)
            step = "ioapic"
            vm.set_irqchip("ioapic", self.ioapic)
            step = "pit"
            vm.set_pit2(self.pit)
            step = "clock"
            vm.set_clock(self.clock)
        except KvmError as exc:
            raise KvmError(exc.ioctl, exc.errno, f"applying platform state, step {step}") from exc
