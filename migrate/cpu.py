"""CPU models: the CPU a VM is given, and whether a host can give it (specs/cpu-models.md).

A :class:`CpuPolicy` is everything a VM's CPU looks like to the guest: the CPUID leaves it
was given, the MSRs a capture carries (with the values of the feature MSRs, which describe
the CPU like CPUID does), its TSC frequency and whether that frequency is promised. It is
made from a named model at create time (:func:`policy_for`), travels in the stream (three
records per VM) and is applied as it is on the host that restores it, after
:func:`compatibility` has said this host can run it.

:class:`HostCpu` is what this host offers (KVM_GET_SUPPORTED_CPUID, the MSRs a vCPU here can
save, the feature MSR values, the TSC frequency and whether KVM can scale it), probed once
per process through the KVM layer. This module holds the policy; it issues no ioctls itself.
"""
from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .config import DEFAULT_MODEL, MODEL_NAME, MODELS, STUB_MODEL  # noqa: F401  (re-exported)

TSC_TOLERANCE_PPM = 250            # KVM's own tolerance before it needs TSC scaling

SIGNIFICANT_INDEX = 1              # KVM_CPUID_FLAG_SIGNIFCANT_INDEX


class CpuModelError(Exception):
    """A CPU model cannot run here, or a saved CPU cannot be given here; the message says
    what is missing."""


class CpuidEntry(NamedTuple):
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class MsrEntry(NamedTuple):
    """An MSR a capture carries. ``feature``: the value describes the CPU (like CPUID) and a
    host must offer every bit of it (``value``); other MSRs carry ``value`` 0 here (their
    values are vCPU state)."""
    index: int
    feature: bool = False
    value: int = 0


REGS = ("eax", "ebx", "ecx", "edx")

# -- names, for messages ------------------------------------------------------------------
_BIT_NAMES = {
    (1, 0, "edx"): "FPU VME DE PSE TSC MSR PAE MCE CX8 APIC - SEP MTRR PGE MCA CMOV PAT PSE36 PSN "
                   "CLFSH - DS ACPI MMX FXSR SSE SSE2 SS HTT TM - PBE",
    (1, 0, "ecx"): "SSE3 PCLMULQDQ DTES64 MONITOR DS_CPL VMX SMX EST TM2 SSSE3 CNXT_ID SDBG FMA CX16 "
                   "XTPR PDCM - PCID DCA SSE4_1 SSE4_2 X2APIC MOVBE POPCNT TSC_DEADLINE AES XSAVE "
                   "OSXSAVE AVX F16C RDRAND HYPERVISOR",
    (7, 0, "ebx"): "FSGSBASE TSC_ADJUST SGX BMI1 HLE AVX2 FDP_EXCPTN_ONLY SMEP BMI2 ERMS INVPCID RTM "
                   "PQM ZERO_FCS_FDS MPX PQE AVX512F AVX512DQ RDSEED ADX SMAP AVX512IFMA - CLFLUSHOPT "
                   "CLWB INTEL_PT AVX512PF AVX512ER AVX512CD SHA AVX512BW AVX512VL",
    (7, 0, "ecx"): "PREFETCHWT1 AVX512VBMI UMIP PKU OSPKE WAITPKG AVX512_VBMI2 CET_SS GFNI VAES "
                   "VPCLMULQDQ AVX512_VNNI AVX512_BITALG TME AVX512_VPOPCNTDQ - LA57 - - - - - RDPID "
                   "KL - CLDEMOTE - MOVDIRI MOVDIR64B ENQCMD SGX_LC PKS",
    (7, 0, "edx"): "- - AVX512_4VNNIW AVX512_4FMAPS FSRM UINTR - - AVX512_VP2INTERSECT - MD_CLEAR - - "
                   "- SERIALIZE HYBRID TSXLDTRK - PCONFIG - CET_IBT - AMX_BF16 AVX512_FP16 AMX_TILE "
                   "AMX_INT8 SPEC_CTRL INTEL_STIBP FLUSH_L1D ARCH_CAPABILITIES CORE_CAPABILITIES "
                   "SPEC_CTRL_SSBD",
    (0x80000001, 0, "ecx"): "LAHF_LM CMP_LEGACY SVM EXTAPIC CR8_LEGACY ABM SSE4A MISALIGNSSE "
                            "3DNOWPREFETCH OSVW IBS XOP SKINIT WDT - LWP FMA4 TCE - NODEID_MSR - TBM "
                            "TOPOEXT PERFCTR_CORE PERFCTR_NB - BPEXT PTSC PERFCTR_LLC MWAITX",
    (0x80000001, 0, "edx"): "- - - - - - - - - - - SYSCALL - - - - - - - MP NX - MMXEXT - - FXSR_OPT "
                            "PDPE1GB RDTSCP - LM 3DNOWEXT 3DNOW",
    (0x80000007, 0, "edx"): "- - - - - - - - INVARIANT_TSC",
}
BIT = {(key, name): 1 << bit for key, names in _BIT_NAMES.items()
       for bit, name in enumerate(names.split()) if name != "-"}
XSAVE_COMPONENTS = ("x87", "SSE", "AVX", "MPX_BNDREGS", "MPX_BNDCSR", "AVX512_OPMASK",
                    "AVX512_ZMM_HI256", "AVX512_HI16_ZMM", "PT", "PKRU", "PASID", "CET_U", "CET_S",
                    "HDC", "UINTR", "LBR", "HWP", "AMX_TILECFG", "AMX_TILEDATA")
MSR_NAMES = {
    0x10: "IA32_TSC", 0x11: "KVM_WALL_CLOCK", 0x12: "KVM_SYSTEM_TIME", 0x34: "SMI_COUNT",
    0x3A: "IA32_FEATURE_CONTROL", 0x3B: "IA32_TSC_ADJUST", 0x8B: "IA32_UCODE_REV",
    0xCE: "PLATFORM_INFO", 0x10A: "IA32_ARCH_CAPABILITIES", 0x140: "MISC_FEATURES_ENABLES",
    0x174: "IA32_SYSENTER_CS", 0x175: "IA32_SYSENTER_ESP", 0x176: "IA32_SYSENTER_EIP",
    0x17A: "IA32_MCG_STATUS", 0x17B: "IA32_MCG_CTL", 0x1A0: "IA32_MISC_ENABLE",
    0x1D9: "IA32_DEBUGCTL", 0x1FC: "POWER_CTL", 0x277: "IA32_PAT", 0x345: "IA32_PERF_CAPABILITIES",
    0x6E0: "IA32_TSC_DEADLINE", 0xC0000081: "STAR", 0xC0000082: "LSTAR", 0xC0000083: "CSTAR",
    0xC0000084: "SFMASK", 0xC0000102: "KERNEL_GS_BASE", 0xC0010015: "AMD_HWCR",
    0xC0010117: "AMD_VM_HSAVE_PA", 0xC001011F: "AMD_VIRT_SPEC_CTRL",
}


def bit_name(leaf: int, sub: int, reg: str, bit: int) -> str:
    for (key, name), mask in BIT.items():
        if key == (leaf, sub, reg) and mask == 1 << bit:
            return f"{name} (CPUID {leaf:#x}.{sub} {reg.upper()} bit {bit})"
    return f"CPUID {leaf:#x}.{sub} {reg.upper()} bit {bit}"


def msr_name(index: int) -> str:
    name = MSR_NAMES.get(index)
    return f"MSR {index:#x} ({name})" if name else f"MSR {index:#x}"


# -- what a host must offer for a policy ----------------------------------------------------
# Feature bitmaps: every bit a policy sets here, the host's KVM_GET_SUPPORTED_CPUID must set.
FEATURE_REGISTERS = (
    (1, 0, "ecx"), (1, 0, "edx"), (6, 0, "eax"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
    (7, 1, "eax"), (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"),
    (0x80000007, 0, "edx"), (0x80000008, 0, "ebx"), (0x80000021, 0, "eax"),
)
# Bits that are not host features: OSXSAVE and OSPKE mirror CR4 and HYPERVISOR is a pure
# software flag (KVM does not act on it): a policy may set them whatever the host offers.
NOT_HOST_FEATURES = {(1, 0, "ecx"): (1 << 27) | (1 << 31), (7, 0, "ecx"): 1 << 4}
# Feature MSRs whose value is a bitmap of CPU properties: a host must offer every bit.
BITMAP_FEATURE_MSRS = frozenset({0x10A, 0x345})
# MSRs a host may lack that are dropped when they hold their reset value (the guest never
# changed them, and reads of an absent MSR are the only thing it could notice; see the
# spec's "Dropping MSRs"); any other value refuses the restore.
DROPPABLE_MSRS = {0x3A: 0, 0x140: 0, 0x1D9: 0, 0xC0010117: 0, 0xC001011F: 0}


@dataclass(frozen=True)
class CpuPolicy:
    """The CPU of one VM (specs/cpu-models.md). ``cpuid`` is sorted by (function, index),
    ``msrs`` by index (a feature MSR's value is what the VM's vCPUs are given); ``tsc_khz`` is the rate its TSC ran at when it was made or saved;
    ``strict_tsc``: the model promises that rate (a host that cannot keep it refuses);
    ``host_vendor``/``host_signature``: the CPU of the host the policy was taken on."""
    model: str
    cpuid: tuple[CpuidEntry, ...]
    msrs: tuple[MsrEntry, ...]
    tsc_khz: int
    strict_tsc: bool
    host_vendor: str = ""
    host_signature: int = 0
    legacy: bool = False        # made up for a version-1 stream, which describes no CPU

    @property
    def msr_indices(self) -> list[int]:
        return [m.index for m in self.msrs]

    def leaf(self, function: int, index: int = 0) -> CpuidEntry | None:
        return _leaf(self.cpuid, function, index)

    def reg(self, function: int, index: int, reg: str) -> int:
        entry = self.leaf(function, index)
        return getattr(entry, reg) if entry else 0

    @property
    def vendor(self) -> str:
        return _vendor(self.cpuid)

    def without_msrs(self, indices) -> "CpuPolicy":
        drop = set(indices)
        return replace(self, msrs=tuple(m for m in self.msrs if m.index not in drop))


def _leaf(entries, function: int, index: int) -> CpuidEntry | None:
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & SIGNIFICANT_INDEX):
            return e
    return None


def _vendor(entries) -> str:
    leaf0 = _leaf(entries, 0, 0)
    if leaf0 is None:
        return ""
    return struct.pack("<3I", leaf0.ebx, leaf0.edx, leaf0.ecx).decode("ascii", "replace")


@dataclass(frozen=True)
class HostCpu:
    """What this host can give a VM."""
    cpuid: tuple[CpuidEntry, ...]           # KVM_GET_SUPPORTED_CPUID
    msrs: frozenset[int]                    # MSRs a vCPU here can save and restore
    feature_msrs: dict[int, int] = field(default_factory=dict)   # what KVM can offer of each
    feature_defaults: dict[int, int] = field(default_factory=dict)   # what a new vCPU reads
    tsc_khz: int = 0
    tsc_scaling: bool = False               # KVM_CAP_TSC_CONTROL: KVM_SET_TSC_KHZ works

    @property
    def vendor(self) -> str:
        return _vendor(self.cpuid)

    @property
    def signature(self) -> int:
        leaf1 = _leaf(self.cpuid, 1, 0)
        return leaf1.eax if leaf1 else 0

    def reg(self, function: int, index: int, reg: str) -> int:
        entry = _leaf(self.cpuid, function, index)
        return getattr(entry, reg) if entry else 0

    @classmethod
    def probe(cls, kvm) -> "HostCpu":
        """Ask KVM: a throwaway VM with one vCPU given everything KVM supports tells which
        MSRs can be saved here and the TSC frequency a vCPU runs at."""
        from .kvm import saveable_msrs
        from .kvm._lib import lib
        supported = supported_cpuid(kvm)
        vm = kvm.create_vm()
        try:
            vm.create_irqchip()
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(supported)
            msrs = frozenset(saveable_msrs(vcpu, kvm.get_msr_index_list()))
            defaults = vcpu.get_msrs(sorted(msrs & BITMAP_FEATURE_MSRS))
            tsc_khz = vcpu.get_tsc_khz()
        finally:
            vm.close()
        return cls(cpuid=tuple(sorted(supported, key=_order)), msrs=msrs,
                   feature_msrs=kvm.get_feature_msrs(kvm.get_msr_feature_index_list()),
                   feature_defaults=defaults, tsc_khz=tsc_khz,
                   tsc_scaling=bool(kvm.check_extension(lib.KVM_CAP_TSC_CONTROL)))

    def runnable_models(self) -> dict[str, str]:
        """Each model, with "" if this host can run it or the reason it cannot."""
        out = {}
        for model in MODELS:
            try:
                policy_for(model, self)
                out[model] = ""
            except CpuModelError as exc:
                out[model] = str(exc)
        return out


KVM_CAP_TSC_DEADLINE_TIMER = 72        # linux/kvm.h


def supported_cpuid(kvm) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID, with the TSC deadline timer where KVM has it: KVM reports
    that bit there only since early 2025 (commit 9be4ec35d668); before, it said so by
    KVM_CAP_TSC_DEADLINE_TIMER alone (the LAPIC is in the kernel here), and the baseline
    model, which needs it, would have been refused."""
    entries = [CpuidEntry(*e) for e in kvm.get_supported_cpuid()]
    if kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER):
        bit = BIT[((1, 0, "ecx"), "TSC_DEADLINE")]
        entries = [e._replace(ecx=e.ecx | bit) if (e.function, e.index) == (1, 0) else e for e in entries]
    return entries


def cpuid_for_vcpu(entries, apic_id: int) -> tuple[CpuidEntry, ...]:
    """A policy's CPUID leaves as vCPU ``apic_id`` is given them (specs/cpu-models.md,
    "Per-vCPU fields"): the initial APIC id in leaf 1 EBX[31:24], and the x2APIC id in EDX of
    every sub-leaf of the topology leaves 0xB and 0x1F if the policy has them, whatever the
    policy holds there. Nothing else differs between the vCPUs of a VM; a baseline policy
    holds APIC id 0, so vCPU 0 gets its leaves exactly as they are."""
    if not 0 <= apic_id <= 0xFF:
        raise ValueError(f"APIC id {apic_id} does not fit CPUID leaf 1")
    out = []
    for e in entries:
        e = CpuidEntry(*e)
        if e.function == 1:
            e = e._replace(ebx=(e.ebx & 0x00FFFFFF) | apic_id << 24)
        elif e.function in (0xB, 0x1F):
            e = e._replace(edx=apic_id)
        out.append(e)
    return tuple(out)


def _order(entry: CpuidEntry) -> tuple[int, int]:
    return entry.function, entry.index


@functools.cache
def this_host() -> HostCpu:
    """This host's CPU as KVM offers it, probed once per process."""
    from .kvm import Kvm
    with Kvm() as kvm:
        return HostCpu.probe(kvm)


# -- the models --------------------------------------------------------------------------------
BASELINE_VENDOR = "GenuineIntel"
BASELINE_SIGNATURE = 0x00000F61      # family 15, model 6, stepping 1 (the identity of QEMU's kvm64)
BASELINE_BRAND = "hvm-migrate baseline x86-64 CPU"
BASELINE_PHYS_BITS, BASELINE_VIRT_BITS = 40, 48
BASELINE_FEATURES = {
    (1, 0, "edx"): ("FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 "
                    "CLFSH MMX FXSR SSE SSE2"),
    (1, 0, "ecx"): "CX16 X2APIC TSC_DEADLINE HYPERVISOR",
    (7, 0, "ebx"): "TSC_ADJUST",
    (0x80000001, 0, "ecx"): "LAHF_LM",
    (0x80000001, 0, "edx"): "SYSCALL NX LM",
}
BASELINE_MSRS = (0x10, 0x3B, 0x174, 0x175, 0x176, 0x17A, 0x1A0, 0x1D9, 0x277, 0x6E0,
                 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102)


def _mask(key, names: str) -> int:
    out = 0
    for name in names.split():
        out |= BIT[(key, name)]
    return out


def baseline_cpuid() -> tuple[CpuidEntry, ...]:
    """The baseline model's CPUID leaves: the same on every host."""
    f = {key: _mask(key, names) for key, names in BASELINE_FEATURES.items()}
    vendor = struct.unpack("<3I", BASELINE_VENDOR.encode())          # EBX, EDX, ECX
    brand = struct.unpack("<12I", BASELINE_BRAND.encode().ljust(48, b"\0"))
    leaves = [
        CpuidEntry(0, 0, 0, 7, vendor[0], vendor[2], vendor[1]),
        # EBX: CLFLUSH line 8 x 8 bytes; one logical processor; initial APIC id 0
        CpuidEntry(1, 0, 0, BASELINE_SIGNATURE, (1 << 16) | (8 << 8), f[(1, 0, "ecx")], f[(1, 0, "edx")]),
        CpuidEntry(7, 0, SIGNIFICANT_INDEX, 0, f[(7, 0, "ebx")], 0, 0),
        CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, f[(0x80000001, 0, "ecx")], f[(0x80000001, 0, "edx")]),
        *(CpuidEntry(0x80000002 + i, 0, 0, *brand[4 * i:4 * i + 4]) for i in range(3)),
        CpuidEntry(0x80000008, 0, 0, BASELINE_PHYS_BITS | (BASELINE_VIRT_BITS << 8), 0, 0, 0),
    ]
    return tuple(sorted(leaves, key=_order))


def policy_for(model: str, host: HostCpu) -> CpuPolicy:
    """The policy of a new VM of ``model`` on ``host``; CpuModelError if the host cannot
    give it (naming what it lacks) or the model is unknown."""
    if model == "baseline":
        policy = CpuPolicy("baseline", baseline_cpuid(), tuple(MsrEntry(i) for i in BASELINE_MSRS),
                           host.tsc_khz, strict_tsc=False,
                           host_vendor=host.vendor, host_signature=host.signature)
    elif model == "host":
        msrs = tuple(MsrEntry(i, True, host.feature_defaults.get(i, 0)) if i in BITMAP_FEATURE_MSRS
                     else MsrEntry(i) for i in sorted(host.msrs))
        policy = CpuPolicy("host", host.cpuid, msrs, host.tsc_khz, strict_tsc=True,
                           host_vendor=host.vendor, host_signature=host.signature)
    else:
        raise CpuModelError(f"unknown CPU model {model!r} (one of: {', '.join(MODELS)})")
    problems = compatibility(policy, host).problems
    if problems:
        raise CpuModelError(f"this host cannot run the {model} CPU model: {'; '.join(problems)}")
    return policy


def legacy_policy(host: HostCpu) -> CpuPolicy:
    """The CPU a version-1 stream (which describes none) restores with: this host's, as
    the ``host`` model gives it, with the TSC frequency not promised (it is not known)."""
    policy = policy_for("host", host)
    return replace(policy, strict_tsc=False, legacy=True)


# -- compatibility --------------------------------------------------------------------------
@dataclass
class Compatibility:
    """``problems``: why this host cannot run the policy (none: it can). ``notes``: what the
    guest will notice although it can (a TSC rate that changes, MSRs that may be dropped)."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped_msrs: list[int] = field(default_factory=list)   # absent here, droppable

    @property
    def ok(self) -> bool:
        return not self.problems


def compatibility(policy: CpuPolicy, host: HostCpu, what: str = "") -> Compatibility:
    """Can ``host`` give a VM ``policy``? (specs/cpu-models.md, "Compatibility")."""
    out = Compatibility()
    prefix = f"{what}: " if what else ""
    for leaf, sub, reg in FEATURE_REGISTERS:
        want = policy.reg(leaf, sub, reg) & ~NOT_HOST_FEATURES.get((leaf, sub, reg), 0)
        lacking = want & ~host.reg(leaf, sub, reg)
        for bit in range(32):
            if lacking >> bit & 1:
                out.problems.append(f"{prefix}lacks {bit_name(leaf, sub, reg, bit)}")
    _check_address_bits(policy, host, out, prefix)
    _check_xsave(policy, host, out, prefix)
    _check_msrs(policy, host, out, prefix)
    _check_tsc(policy, host, out, prefix)
    return out


def _check_address_bits(policy, host, out, prefix) -> None:
    want = policy.reg(0x80000008, 0, "eax") & 0xFF
    have = host.reg(0x80000008, 0, "eax") & 0xFF
    if want > have:
        out.problems.append(f"{prefix}guest physical addresses of {want} bits, this host has {have}")


def _check_xsave(policy, host, out, prefix) -> None:
    """Every XSAVE component the policy offers must be offered here, at the same place in
    the XSAVE area (the area travels as it is)."""
    want = policy.reg(0xD, 0, "eax") | policy.reg(0xD, 0, "edx") << 32
    have = host.reg(0xD, 0, "eax") | host.reg(0xD, 0, "edx") << 32 | 0x3    # x87 and SSE: always
    for comp in range(64):
        if not want >> comp & 1:
            continue
        name = XSAVE_COMPONENTS[comp] if comp < len(XSAVE_COMPONENTS) else f"component {comp}"
        if not have >> comp & 1:
            out.problems.append(f"{prefix}lacks XSAVE component {comp} ({name})")
        elif comp >= 2:
            mine = (policy.reg(0xD, comp, "eax"), policy.reg(0xD, comp, "ebx"))
            here = (host.reg(0xD, comp, "eax"), host.reg(0xD, comp, "ebx"))
            if mine != here:
                out.problems.append(f"{prefix}XSAVE component {comp} ({name}) is {mine[0]} bytes at "
                                    f"offset {mine[1]} in the stream, {here[0]} at {here[1]} here")


def _check_msrs(policy, host, out, prefix) -> None:
    for m in policy.msrs:
        if m.index not in host.msrs:
            if m.index in DROPPABLE_MSRS:
                out.dropped_msrs.append(m.index)
                out.notes.append(f"{prefix}{msr_name(m.index)} is not on this host: dropped if it "
                                 f"holds its reset value {DROPPABLE_MSRS[m.index]:#x}, else refused")
            else:
                out.problems.append(f"{prefix}lacks {msr_name(m.index)}")
        elif m.feature:
            offered = host.feature_msrs.get(m.index)
            if offered is None:
                out.problems.append(f"{prefix}cannot offer feature {msr_name(m.index)}")
            elif m.value & ~offered:
                out.problems.append(f"{prefix}{msr_name(m.index)} {m.value:#x} needs bits "
                                    f"{m.value & ~offered:#x} this host does not offer ({offered:#x})")


def tsc_differs(a_khz: int, b_khz: int) -> bool:
    return abs(a_khz - b_khz) * 1_000_000 > TSC_TOLERANCE_PPM * b_khz


def _check_tsc(policy, host, out, prefix) -> None:
    if policy.legacy:
        out.notes.append(f"{prefix}a version-1 stream does not say its TSC frequency: the guest's "
                         f"TSC runs at this host's {host.tsc_khz} kHz")
        return
    if not tsc_differs(policy.tsc_khz, host.tsc_khz):
        return
    if host.tsc_scaling:
        out.notes.append(f"{prefix}KVM scales the guest's TSC to its {policy.tsc_khz} kHz "
                         f"(this host's runs at {host.tsc_khz} kHz)")
    elif policy.strict_tsc:
        out.problems.append(f"{prefix}the guest's TSC runs at {policy.tsc_khz} kHz, this host's at "
                            f"{host.tsc_khz} kHz and KVM cannot scale it (no KVM_CAP_TSC_CONTROL)")
    else:
        ratio = host.tsc_khz / policy.tsc_khz - 1
        out.notes.append(f"{prefix}the guest's TSC will run at {host.tsc_khz} kHz instead of "
                         f"{policy.tsc_khz} kHz ({ratio:+.1%}): its value carries on, but time the "
                         f"guest derives from the TSC at its old rate is {abs(ratio):.1%} "
                         f"{'fast' if ratio > 0 else 'slow'}; the LAPIC timer is unaffected")


def msrs_to_apply(policy: CpuPolicy, saved: dict[int, int], host: HostCpu) -> tuple[dict[int, int], list[str]]:
    """The saved MSR values of one vCPU as this host takes them, and what was changed:
    MSRs this host lacks are dropped if they hold their reset value (else CpuModelError);
    for a version-1 stream (``policy.legacy``), a feature MSR whose bits this host does not
    offer keeps this host's value (its CPUID is this host's too)."""
    out, notes = {}, []
    for index, value in saved.items():
        if index not in host.msrs:
            if DROPPABLE_MSRS.get(index) == value:
                notes.append(f"dropped {msr_name(index)} (reset value {value:#x}; not on this host)")
                continue
            raise CpuModelError(f"{msr_name(index)} holds {value:#x} and this host lacks it")
        if policy.legacy and index in BITMAP_FEATURE_MSRS:
            offered = host.feature_msrs.get(index, 0)
            if value & ~offered:
                notes.append(f"{msr_name(index)} {value:#x} is not offered here: the guest "
                             f"reads this host's {offered:#x}")
                continue
        out[index] = value
    return out, notes


def msrs_as_saved(policy: CpuPolicy, host: HostCpu) -> list[int] | None:
    """The policy's MSR indices when a VCPU_MSRS record of exactly them goes to KVM here as
    it is: :func:`msrs_to_apply` keeps every value (not legacy, every MSR on this host) and
    the saved order, ascending, is the order KVM_SET_MSRS needs (``kvm.state.msr_order``).
    None otherwise, and the values are filtered as above."""
    from .kvm.state import msr_order
    indices = policy.msr_indices
    if policy.legacy or any(i not in host.msrs for i in indices):
        return None
    if not indices == sorted(set(indices)) == msr_order(indices):
        return None
    return indices


def implied_vendor(msr_indices) -> str:
    """The vendor a version-1 stream's MSRs point at ("" if they do not say)."""
    indices = set(msr_indices)
    if 0x3A in indices:
        return "GenuineIntel"
    if any(i >> 16 == 0xC001 for i in indices):
        return "AuthenticAMD"
    return ""


__all__ = ["CpuModelError", "CpuPolicy", "CpuidEntry", "Compatibility", "DEFAULT_MODEL", "HostCpu",
           "MODELS", "MsrEntry", "STUB_MODEL", "compatibility", "cpuid_for_vcpu", "implied_vendor", "legacy_policy",
           "msrs_as_saved", "msrs_to_apply", "policy_for", "this_host"]
