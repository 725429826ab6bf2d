"""The VM file descriptor: memory slots, irqchips, PIT, clock, dirty logs."""
from __future__ import annotations

import ctypes
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._lib import ffi, ioctl, lib
from .dirty import DirtyBitmap
from .structs import prepare, fill, from_plain, to_plain

PAGE_SIZE = 4096
IRQCHIPS = {"pic_master": "KVM_IRQCHIP_PIC_MASTER",
            "pic_slave": "KVM_IRQCHIP_PIC_SLAVE",
            "ioapic": "KVM_IRQCHIP_IOAPIC"}


HUGE_PAGE = 2 << 20          # the huge page size asked for (MFD_HUGE_2MB), whatever the host's default
HUGE_POOL = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE_PAGE >> 10}kB")     # its pool
HUGE_HINT = f"sysctl vm.nr_hugepages, or {HUGE_POOL}/nr_hugepages where 2 MiB is not the default size"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


class HugePagesError(OSError):
    """Huge pages asked for and the host has too few free (sysctl vm.nr_hugepages)."""


def huge_pages_free() -> tuple[int, int]:
    """(free, total) 2 MiB huge pages of this host, from the 2 MiB pool itself: /proc/meminfo
    counts the default size's, which a host booted with default_hugepagesz=1G has; (0, 0)
    without a 2 MiB pool."""
    try:
        return tuple(int((HUGE_POOL / name).read_text()) for name in ("free_hugepages", "nr_hugepages"))
    except (OSError, ValueError):
        return 0, 0


@dataclass
class MemorySlot:
    """Guest RAM backed by a memfd, so other processes and VMs can map it; ``huge``: a
    hugetlbfs memfd of 2 MiB pages (no write(), holes found by residency, not SEEK_DATA)."""
    slot: int
    guest_phys_addr: int
    size: int
    memfd: int
    mem: mmap.mmap = field(repr=False)
    flags: int = 0
    owns_memfd: bool = True
    huge: bool = False

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def base_pfn(self) -> int:
        return self.guest_phys_addr // PAGE_SIZE

    def view(self) -> memoryview:
        return memoryview(self.mem)

    def data_ranges(self) -> list[tuple[int, int]]:
        """[first, end) page ranges of the memfd that hold data; the pages between
        them are holes, zero without ever having been touched (SEEK_DATA/SEEK_HOLE,
        so finding them reads no memory and allocates none; for huge pages, which
        hugetlbfs does not report that way, the mapping's residency: mincore)."""
        if self.huge:
            return self._resident_ranges()
        ranges, offset = [], 0
        while offset < self.size:
            try:
                start = os.lseek(self.memfd, offset, os.SEEK_DATA)
            except OSError:             # ENXIO: no data after offset
                break
            end = min(os.lseek(self.memfd, start, os.SEEK_HOLE), self.size)
            ranges.append((start // PAGE_SIZE, -(-end // PAGE_SIZE)))
            offset = end
        return ranges

    def _resident_ranges(self) -> list[tuple[int, int]]:
        vec = ctypes.create_string_buffer(self.npages)
        anchor = ctypes.c_char.from_buffer(self.mem)
        try:
            if _libc.mincore(ctypes.addressof(anchor), self.size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor                  # the mapping must not stay exported
        return [(m.start(), m.end()) for m in re.finditer(rb"[^\x00]+", vec.raw)]


class Vm:
    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus = []
        self.manual_protect = self._enable_manual_protect()

    def _enable_manual_protect(self) -> bool:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on, where KVM has it: KVM_GET_DIRTY_LOG then
        leaves the log as it is, and pages are re-armed (write-protected again, their bits
        cleared) by KVM_CLEAR_DIRTY_LOG, range by range (:meth:`clear_dirty_log`). Set
        before any slot logs."""
        if not self.kvm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & 1:
            return False
        cap = ffi.new("struct kvm_enable_cap *")
        cap.cap = lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        cap.args[0] = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        ioctl(self.fd, "KVM_ENABLE_CAP", cap)
        return True

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for slot in self.slots.values():
            slot.mem.close()
            if slot.owns_memfd:
                os.close(slot.memfd)
        self.slots.clear()

    # -- creation ---------------------------------------------------------
    def create_vcpu(self, vcpu_id: int, console_port: int | None = None):
        """A vCPU whose run loop buffers `out`s to ``console_port`` (default 0xE9)."""
        from .vcpu import DEBUG_CONSOLE_PORT, Vcpu
        port = DEBUG_CONSOLE_PORT if console_port is None else console_port
        vcpu = Vcpu(self, vcpu_id, ioctl(self.fd, "KVM_CREATE_VCPU", vcpu_id), port)
        self.vcpus.append(vcpu)
        return vcpu

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, "KVM_SET_TSS_ADDR", addr)

    def create_irqchip(self) -> None:
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *"))

    # -- memory -----------------------------------------------------------
    def add_memory(self, slot: int, guest_phys_addr: int, size: int,
                   memfd: int | None = None, name: str = "guest-ram", huge: bool = False) -> MemorySlot:
        """Map a memfd as memory slot ``slot``: a new one, or ``memfd`` (another
        VM's RAM, e.g. the stub's window onto guest RAM; not closed here). ``huge``: of
        2 MiB huge pages (a new one: reserved now, HugePagesError if the host has too few)."""
        unit = HUGE_PAGE if huge else PAGE_SIZE
        if size <= 0 or size % unit or guest_phys_addr % unit:
            raise ValueError(f"slot {slot}: size and address must be multiples of {unit >> 10} KiB")
        own = memfd is None
        if own:
            memfd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_HUGETLB | os.MFD_HUGE_2MB if huge else 0))
            os.ftruncate(memfd, size)
        try:
            mem = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as exc:
            if own:
                os.close(memfd)
            if huge and own and isinstance(exc, OSError):
                free, total = huge_pages_free()
                raise HugePagesError(exc.errno, f"{size >> 20} MiB of 2 MiB huge pages are not available "
                                     f"here ({free} of {total} free; {HUGE_HINT})") from None
            raise
        region = MemorySlot(slot, guest_phys_addr, size, memfd, mem, owns_memfd=own, huge=huge)
        try:
            self._set_region(region)
        except BaseException:
            mem.close()
            if own:
                os.close(memfd)
            raise
        self.slots[slot] = region
        return region

    def _set_region(self, region: MemorySlot) -> None:
        arg = ffi.new("struct kvm_userspace_memory_region *")
        arg.slot = region.slot
        arg.flags = region.flags
        arg.guest_phys_addr = region.guest_phys_addr
        arg.memory_size = region.size
        arg.userspace_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(region.mem)))
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", arg)

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        region = self.slots[slot]
        flag = lib.KVM_MEM_LOG_DIRTY_PAGES
        region.flags = (region.flags | flag) if enabled else (region.flags & ~flag)
        self._set_region(region)

    def get_dirty_log(self, slot: int, clear: bool = True) -> DirtyBitmap:
        """The slot's dirty bitmap (KVM_GET_DIRTY_LOG): the pages written since their bits
        were last cleared; cleared, so that those pages are tracked again from now on.
        ``clear=False``, with manual protection (``manual_protect``): left as it is, for
        the caller to clear range by range (:meth:`clear_dirty_log`) just before it reads
        those pages; without manual protection KVM clears it anyway."""
        region = self.slots[slot]
        bits = bytearray((region.npages + 63) // 64 * 8)
        arg = ffi.new("struct kvm_dirty_log *")
        arg.slot = slot
        arg.dirty_bitmap = ffi.from_buffer(bits)
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", arg)
        dirty = DirtyBitmap(bytes(bits), region.npages, region.base_pfn)
        if clear and self.manual_protect and dirty:
            self.clear_dirty_log(slot, 0, region.npages, dirty.tobytes())
        return dirty

    def read_dirty_log(self, slot: int, into) -> None:
        """KVM_GET_DIRTY_LOG into ``into`` (a writable buffer of the slot's bitmap size), the
        bits left set where KVM leaves that to the caller (``manual_protect``): what
        get_dirty_log(clear=False) gives, into a buffer the caller keeps."""
        arg = ffi.new("struct kvm_dirty_log *")
        arg.slot = slot
        arg.dirty_bitmap = ffi.from_buffer(into, require_writable=True)
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", arg)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bits) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear and track again the pages of the slot from
        ``first_page`` (a multiple of 64) whose bits are set in ``bits`` (a bitmap of
        ``num_pages`` pages: a multiple of 64, or up to the slot's end). Only bits KVM has
        set are touched, so a page written since the last fetch that ``bits`` does not
        name stays dirty. Needs ``manual_protect``."""
        arg = ffi.new("struct kvm_clear_dirty_log *")
        arg.slot, arg.first_page, arg.num_pages = slot, first_page, num_pages
        arg.dirty_bitmap = ffi.from_buffer(bits)
        ioctl(self.fd, "KVM_CLEAR_DIRTY_LOG", arg)

    # -- interrupts and platform devices ---------------------------------
    def irq_line(self, irq: int, level: int) -> None:
        arg = ffi.new("struct kvm_irq_level *")
        arg.irq = irq
        arg.level = level
        ioctl(self.fd, "KVM_IRQ_LINE", arg)

    def get_irqchip(self, name: str) -> dict:
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = getattr(lib, IRQCHIPS[name])
        ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        payload = ffi.cast("char *", chip) + lib.HVM_IRQCHIP_CHIP_OFFSET
        if name == "ioapic":
            state = ffi.cast("struct kvm_ioapic_state *", payload)
            plain = to_plain(state[0])
            table = ffi.cast("uint64_t *", ffi.cast("char *", state) + lib.HVM_IOAPIC_REDIRTBL_OFFSET)
            plain["redirtbl"] = [table[i] for i in range(lib.HVM_IOAPIC_NUM_PINS)]
            return plain
        return to_plain(ffi.cast("struct kvm_pic_state *", payload)[0])

    def set_irqchip(self, name: str, plain: dict) -> None:
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = getattr(lib, IRQCHIPS[name])
        payload = ffi.cast("char *", chip) + lib.HVM_IRQCHIP_CHIP_OFFSET
        if name == "ioapic":
            state = ffi.cast("struct kvm_ioapic_state *", payload)
            fill(state[0], {k: v for k, v in plain.items() if k != "redirtbl"})
            table = ffi.cast("uint64_t *", ffi.cast("char *", state) + lib.HVM_IOAPIC_REDIRTBL_OFFSET)
            if len(plain["redirtbl"]) != lib.HVM_IOAPIC_NUM_PINS:
                raise ValueError("IOAPIC redirection table has the wrong length")
            for i, bits in enumerate(plain["redirtbl"]):
                table[i] = bits
        else:
            fill(ffi.cast("struct kvm_pic_state *", payload)[0], plain)
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> dict:
        arg = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, "KVM_GET_PIT2", arg)
        return to_plain(arg[0])

    def set_pit2(self, plain: dict) -> None:
        ioctl(self.fd, "KVM_SET_PIT2", from_plain("struct kvm_pit_state2", plain))

    def get_clock(self) -> dict:
        arg = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", arg)
        return to_plain(arg[0])

    def set_clock(self, plain: dict) -> None:
        # Only the clock value is applied; realtime/host_tsc would need
        # KVM_CLOCK_REALTIME support on both hosts and the same time base.
        arg = ffi.new("struct kvm_clock_data *")
        arg.clock = plain["clock"]
        ioctl(self.fd, "KVM_SET_CLOCK", arg)


prepare("struct kvm_pic_state", "struct kvm_ioapic_state", "struct kvm_pit_state2", "struct kvm_clock_data")
