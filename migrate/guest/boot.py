"""Direct boot of a guest image in 64-bit mode (specs/guest-boot.md).

No firmware: the host writes the boot-info page, identity-mapping page
tables and a boot GDT into guest RAM, loads the flat image at 1 MiB and
gives the vCPU long-mode registers with RIP at the image's first byte.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..config import GIB, MAX_VCPUS, WORKLOADS  # noqa: F401  (re-exported)

PAGE_SIZE = 4096
BOOT_INFO_ADDR = 0x1000
PML4_ADDR = 0x2000
PDPT_ADDR = 0x3000
PD_ADDR = 0x4000            # four page directories: 4 GiB in 2 MiB pages
HIGH_PD_ADDR = 0x10000      # page directories of the addresses from 4 GiB on, if mapped
HIGH_PD_END = 0x100000
BOOT_GDT_ADDR = 0x8000
IMAGE_BASE = 0x100000
IMAGE_END = 0x300000        # the image file ends below this; its .bss reaches up to WORKLOAD_BASE (link.ld)
WORKLOAD_BASE = 0x400000
LOW_RAM_MAX = 3 * GIB       # RAM below the 32-bit MMIO hole: at most 3 GiB from address 0
HIGH_RAM_BASE = 4 * GIB     # the rest of a guest's RAM, from 4 GiB on
MAP_MAX = 4 * GIB + (HIGH_PD_END - HIGH_PD_ADDR) // PAGE_SIZE * GIB   # the most page tables can map

BOOT_INFO_MAGIC = 0x424D5648
BOOT_INFO_VERSION = 1
WL_STUB = 7                 # the stub's image runs this "workload": the device model
BOOT_F_UART = 1
BOOT_F_VIRTIO = 2
BOOT_F_NET = 4

# P | RW | US | A, and D | PS for the 2 MiB leaves: the accessed and dirty
# bits are preset so the CPU never writes page tables (which would show in
# the dirty log as pages the guest did not write).
_TABLE = 0x1 | 0x2 | 0x4 | 0x20
_LEAF = _TABLE | 0x40 | 0x80

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400


def image_path(name: str = "guest") -> Path:
    """The built image ``name``: "guest" here, "stub" in migrate/stub/images."""
    folder = Path(__file__).resolve().parent.parent / ("stub" if name == "stub" else "guest")
    path = folder / "images" / f"{name}.bin"
    if not path.exists():
        raise FileNotFoundError(f"guest image {path} is not built: run `make setup`")
    return path


@dataclass
class BootInfo:
    """The boot-info page (struct boot_info in src/bootinfo.h)."""
    workload: int
    timer_hz: int
    mem_size: int
    wl_base: int
    wl_size: int
    tsc_khz: int
    args: list[int] = field(default_factory=lambda: [0] * 8)
    flags: int = 0
    virtio_base: int = 0
    net_base: int = 0
    nr_cpus: int = 1
    high_size: int = 0

    LAYOUT = struct.Struct("<IIIIQQQQ8QQQQIIQ")   # 152 bytes

    def pack(self) -> bytes:
        args = list(self.args) + [0] * (8 - len(self.args))
        return self.LAYOUT.pack(BOOT_INFO_MAGIC, BOOT_INFO_VERSION, self.workload,
                                self.timer_hz, self.mem_size, self.wl_base,
                                self.wl_size, self.tsc_khz, *args, self.flags,
                                self.virtio_base, self.net_base, self.nr_cpus, 0, self.high_size)


def ram_layout(memory: int) -> list[tuple[int, int]]:
    """``(guest physical address, bytes)`` of each RAM range of a guest of ``memory`` bytes,
    as a PC lays it out: up to LOW_RAM_MAX from 0, below the 32-bit MMIO hole, and the rest
    from HIGH_RAM_BASE (specs/guest-boot.md, "Memory"). Each range is one memory slot."""
    low = min(memory, LOW_RAM_MAX)
    return [(0, low)] + ([(HIGH_RAM_BASE, memory - low)] if memory > low else [])


def workload_region(layout: list[tuple[int, int]]) -> tuple[int, int]:
    """``(wl_base, wl_size)``: the RAM above 4 GiB if the guest has some, else its RAM from
    WORKLOAD_BASE to the end of low RAM."""
    base, size = layout[-1]
    return (base, size) if base else (WORKLOAD_BASE, size - WORKLOAD_BASE)


def _gib_tables(map_top: int) -> int:
    gib = max(4, -(-map_top // GIB))
    if gib * GIB > MAP_MAX:
        raise ValueError(f"cannot map {map_top:#x} bytes: the page tables reach {MAP_MAX:#x}")
    return gib


def _pd_address(i: int) -> int:
    """Where the page directory of GiB ``i`` lives."""
    return PD_ADDR + i * PAGE_SIZE if i < 4 else HIGH_PD_ADDR + (i - 4) * PAGE_SIZE


def _page_tables(map_top: int) -> list[tuple[int, bytes]]:
    """``(address, bytes)`` pieces of an identity map of ``[0, max(4 GiB, map_top))`` rounded
    up to GiB, in 2 MiB pages."""
    gib = _gib_tables(map_top)
    head = bytearray(PD_ADDR + 4 * PAGE_SIZE - PML4_ADDR)
    struct.pack_into("<Q", head, 0, PDPT_ADDR | _TABLE)
    for i in range(gib):
        struct.pack_into("<Q", head, PDPT_ADDR - PML4_ADDR + 8 * i, _pd_address(i) | _TABLE)
    struct.pack_into("<2048Q", head, PD_ADDR - PML4_ADDR, *[(n << 21) | _LEAF for n in range(2048)])
    pieces = [(PML4_ADDR, bytes(head))]
    if gib > 4:
        pieces.append((HIGH_PD_ADDR, struct.pack(f"<{512 * (gib - 4)}Q",
                                                 *[(n << 21) | _LEAF for n in range(2048, 512 * gib)])))
    return pieces


_BOOT_GDT = struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)


def load_image(mem, boot_info: BootInfo, image: bytes, map_top: int = 0) -> None:
    """Write boot info, page tables (mapping at least ``map_top`` bytes), boot GDT and the
    image into low RAM ``mem``."""
    if len(image) > IMAGE_END - IMAGE_BASE:
        raise ValueError("guest image too large")
    mem[BOOT_INFO_ADDR:BOOT_INFO_ADDR + BootInfo.LAYOUT.size] = boot_info.pack()
    for address, tables in _page_tables(map_top):
        mem[address:address + len(tables)] = tables
    mem[BOOT_GDT_ADDR:BOOT_GDT_ADDR + len(_BOOT_GDT)] = _BOOT_GDT
    mem[IMAGE_BASE:IMAGE_BASE + len(image)] = image


def _segment(selector: int, type_: int, long_mode: bool) -> dict:
    return {"base": 0, "limit": 0xFFFFFFFF, "selector": selector, "type": type_,
            "present": 1, "dpl": 0, "db": 0 if long_mode else 1, "s": 1,
            "l": 1 if long_mode else 0, "g": 1, "avl": 0, "unusable": 0}


def entry_sregs(sregs: dict) -> dict:
    """Long-mode special registers for the entry, on top of the reset ones."""
    code = _segment(0x08, 0xB, True)
    data = _segment(0x10, 0x3, False)
    sregs = dict(sregs)
    sregs.update(cs=code, ds=data, es=data, fs=data, gs=data, ss=data)
    sregs["tr"] = {**sregs["tr"], "selector": 0, "type": 0xB, "present": 1, "s": 0,
                   "base": 0, "limit": 0xFFFF, "unusable": 0}
    sregs["gdt"] = {"base": BOOT_GDT_ADDR, "limit": len(_BOOT_GDT) - 1}
    sregs["idt"] = {"base": 0, "limit": 0}
    sregs["cr0"] = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs["cr3"] = PML4_ADDR
    sregs["cr4"] = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs["efer"] = EFER_LME | EFER_LMA
    return sregs


MP_STATE_RUNNABLE = 0       # KVM_MP_STATE_RUNNABLE
TSS_ADDR = 0xFFFBD000       # KVM's TSS pages: below 4 GiB, above any RAM and the MMIO this uses
RAM_SLOT = 0                # a machine's RAM at guest physical 0; more slots follow it


def new_machine(kvm, layout: list[tuple[int, int]], name: str, cpu, console_port: int | None = None,
                scale_tsc: bool = False, vcpus: int = 1, huge: bool = False):
    """A VM of the shape these images boot in, for the guest and the stub alike: TSS and
    in-kernel irqchip and PIT (all before the vCPUs), RAM of ``layout`` (``(address,
    bytes)`` ranges, one memfd-backed slot each, from RAM_SLOT, named ``name``), ``vcpus``
    vCPUs with ids 0.. (their LAPIC ids), each given the CPU of policy ``cpu``
    (specs/cpu-models.md: its CPUID leaves with the vCPU's own APIC id, its feature MSR
    values, and with ``scale_tsc`` its TSC frequency), whose MSRs are checked to be
    readable; ``huge``: RAM of 2 MiB huge pages. Returns (vm, ram, [vcpu, ...]); the VM is
    closed on failure."""
    from ..cpu import cpuid_for_vcpu
    from ..memory import Ram
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        ram = Ram.create(vm, layout, name, RAM_SLOT, huge=huge)
        made = []
        for vcpu_id in range(vcpus):
            vcpu = vm.create_vcpu(vcpu_id, console_port=console_port)
            vcpu.set_cpuid2(cpuid_for_vcpu(cpu.cpuid, vcpu_id))
            if scale_tsc:
                vcpu.set_tsc_khz(cpu.tsc_khz)
            vcpu.set_msrs({m.index: m.value for m in cpu.msrs if m.feature})
            vcpu.get_msrs(cpu.msr_indices)      # a capture reads them: KvmError names one it cannot
            made.append(vcpu)
        return vm, ram, made
    except BaseException:
        vm.close()
        raise


def boot_vcpus(vcpus, mem, boot_info: BootInfo, image: bytes, map_top: int = 0) -> None:
    """Load ``image`` into low RAM ``mem`` (page tables mapping at least ``map_top`` bytes)
    and point every vCPU at its entry in long mode: the same state for each, no INIT or
    SIPI (a vCPU finds out which one it is from its LAPIC id)."""
    load_image(mem, boot_info, image, map_top)
    for vcpu in vcpus:
        vcpu.set_sregs(entry_sregs(vcpu.get_sregs()))
        vcpu.set_regs(entry_regs())
        vcpu.set_mp_state(MP_STATE_RUNNABLE)    # KVM makes vCPUs but 0 wait for INIT/SIPI


def entry_regs() -> dict:
    regs = {name: 0 for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")}
    regs.update(rip=IMAGE_BASE, rdi=BOOT_INFO_ADDR, rflags=0x2)
    return regs
