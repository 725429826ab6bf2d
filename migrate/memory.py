"""A VM's RAM as the engine sees it: a memory space of page ranges, each a memory slot
backed by a memfd of its own, with a view per range, the page ranges that may hold data
and one dirty log over all of them (specs/guest-boot.md, "Memory"; specs/ioreq.md for the
stub's window onto a guest's RAM).

Policy over the KVM layer: which slots a machine's RAM is made of, and how their views,
holes and dirty bitmaps are put together. The ioctls stay in :mod:`migrate.kvm`.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import NamedTuple

from .kvm import DirtyLog, MemorySlot, pfns_bitmap

PAGE_SIZE = 4096


class RamRange(NamedTuple):
    """Pages ``first_pfn`` .. ``first_pfn + npages - 1`` of a memory space (one memory
    slot): a view of their bytes, and where they are in a memory file (the data plane's
    ``Range``, migrate.dataplane)."""
    first_pfn: int
    npages: int
    view: memoryview
    fd: int = -1
    offset: int = 0

    @property
    def end_pfn(self) -> int:
        return self.first_pfn + self.npages


class Ram:
    """The RAM of one VM: ``slots`` sorted by guest physical address, apart.

    ``offset``: these slots mirror another VM's RAM ``offset`` bytes higher in this VM's
    physical space (the stub's window onto guest RAM); pfns this object reports (dirty
    logs, ranges) are then the other VM's, i.e. ``(address - offset) / PAGE_SIZE``.
    """

    def __init__(self, vm, slots: list[MemorySlot], offset: int = 0):
        self.vm = vm
        self.slots = sorted(slots, key=lambda s: s.guest_phys_addr)
        self.offset = offset

    @classmethod
    def create(cls, vm, layout: list[tuple[int, int]], name: str, first_slot: int = 0,
               huge: bool = False) -> "Ram":
        """New RAM for ``vm``: one memfd-backed slot per ``(guest physical address, bytes)``
        of ``layout``, numbered from ``first_slot``; ``huge``: of 2 MiB huge pages. The
        caller closes the VM on failure (that closes the slots made so far)."""
        return cls(vm, [vm.add_memory(first_slot + i, gpa, size, name=name, huge=huge)
                        for i, (gpa, size) in enumerate(layout)])

    def mirror(self, vm, base: int, first_slot: int) -> "Ram":
        """This RAM as slots of another VM ``vm`` at ``base`` + each slot's address, the same
        pages (each slot's memfd mapped again; ``vm`` does not own them)."""
        return Ram(vm, [vm.add_memory(first_slot + i, base + s.guest_phys_addr, s.size, memfd=s.memfd,
                                      huge=s.huge)
                        for i, s in enumerate(self.slots)], offset=base)

    # -- shape ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes of RAM in all slots."""
        return sum(s.size for s in self.slots)

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def low(self) -> MemorySlot:
        """The slot at (mirrored) address 0, where a loader writes boot data."""
        first = self.slots[0]
        if first.guest_phys_addr != self.offset:
            raise ValueError("this RAM has no slot at address 0")
        return first

    @property
    def mem(self):
        """The mmap of the slot at address 0 (low RAM)."""
        return self.low.mem

    @property
    def memfd(self) -> int:
        return self.low.memfd

    def _first_pfn(self, slot: MemorySlot) -> int:
        return (slot.guest_phys_addr - self.offset) // PAGE_SIZE

    @property
    def huge(self) -> bool:
        """Of 2 MiB huge pages."""
        return any(s.huge for s in self.slots)

    def ranges(self) -> list[RamRange]:
        """Each slot as a range (a view and its memfd from offset 0), ascending. A slot of
        huge pages comes without its memfd (fd -1): hugetlbfs takes no write() and punches
        only whole huge pages, so the data plane copies into the view instead."""
        return [RamRange(self._first_pfn(s), s.npages, s.view(), -1 if s.huge else s.memfd, 0)
                for s in self.slots]

    def view(self, address: int, size: int) -> memoryview:
        """The bytes ``[address, address + size)``, which must lie in one slot."""
        for slot in self.slots:
            start = address + self.offset - slot.guest_phys_addr
            if 0 <= start and start + size <= slot.size:
                return slot.view()[start:start + size]
        raise ValueError(f"[{address:#x}, {address + size:#x}) is not inside one RAM slot")

    def data_ranges(self) -> list[tuple[int, int]]:
        """``[first, end)`` pfn ranges that may hold data; the other pages are holes of the
        memfds, zero without ever having been touched (found without reading memory)."""
        return [(first + base, end + base) for slot in self.slots
                for base in (self._first_pfn(slot),) for first, end in slot.data_ranges()]

    # -- dirty log -----------------------------------------------------------------------
    def set_dirty_logging(self, enabled: bool) -> None:
        for slot in self.slots:
            self.vm.set_dirty_logging(slot.slot, enabled)

    def fetch_dirty(self, clear: bool = True) -> DirtyLog:
        """Fetch the dirty bitmap of every slot: one log, in this RAM's pfns; and clear it,
        or with ``clear=False`` leave that to :meth:`clear_dirty` (where KVM has manual
        dirty-log protection; elsewhere the fetch clears)."""
        parts = []
        for slot in self.slots:
            bits = self.vm.get_dirty_log(slot.slot, clear)
            if self.offset:
                bits = type(bits)(bits.tobytes(), bits.npages, self._first_pfn(slot))
            parts.append(bits)
        return DirtyLog(parts)

    def first_pfns(self) -> list[int]:
        """Each slot's first page, in this RAM's pfns."""
        return [self._first_pfn(slot) for slot in self.slots]

    def dirty_buffers(self) -> list[bytearray]:
        """A dirty bitmap's worth of bytes per slot, for :meth:`read_dirty`."""
        return [bytearray((slot.npages + 63) // 64 * 8) for slot in self.slots]

    def read_dirty(self, into: list[bytearray]) -> None:
        """Each slot's dirty bitmap, as fetch_dirty(clear=False) fetches it, into the
        slot's buffer of ``into`` (:meth:`dirty_buffers`)."""
        for slot, buf in zip(self.slots, into):
            self.vm.read_dirty_log(slot.slot, buf)

    def clear_dirty(self, pfns: array) -> None:
        """Clear the dirty bits of ``pfns`` (ascending, this RAM's pfns) and track writes
        to those pages again: a write from now on shows at the next fetch. Called just
        before the pages are read, after a fetch with ``clear=False``, so that a page
        written between that fetch and its reading is not sent again in the next round
        (the reading took the write). A no-op where the fetch clears."""
        if not self.vm.manual_protect or not len(pfns):
            return
        for slot in self.slots:
            first = self._first_pfn(slot)
            lo, hi = bisect_left(pfns, first), bisect_left(pfns, first + slot.npages)
            if lo == hi:
                continue
            start = (pfns[lo] - first) & ~63
            end = min(slot.npages, ((pfns[hi - 1] - first) // 64 + 1) * 64)
            bits = pfns_bitmap(pfns, lo, hi, first + start, end - start)
            self.vm.clear_dirty_log(slot.slot, start, end - start, bits)


__all__ = ["PAGE_SIZE", "Ram", "RamRange"]
