"""Dirty-page bitmaps as KVM hands them out, with fast iteration.

Bit i of a :class:`DirtyBitmap` is page ``base_pfn + i`` (one memory slot); a
:class:`DirtyLog` is the bitmaps of several slots as one set of pages.  Counting and union work on the
whole bitmap as one Python int (linear, in C inside CPython); listing the set
pages uses a C loop over 64-bit words (ctz), which runs at the speed of the
number of words plus the number of dirty pages (tools/bench_dirty_bitmap.py).
"""
from __future__ import annotations

from array import array

from ._lib import ffi, lib


class DirtyBitmap:
    __slots__ = ("npages", "base_pfn", "_bits")

    def __init__(self, bits: bytes, npages: int, base_pfn: int = 0):
        nbytes = (npages + 63) // 64 * 8
        if len(bits) != nbytes:
            raise ValueError(f"bitmap of {npages} pages needs {nbytes} bytes, got {len(bits)}")
        self._bits = bytes(bits)
        self.npages = npages
        self.base_pfn = base_pfn

    @classmethod
    def empty(cls, npages: int, base_pfn: int = 0) -> "DirtyBitmap":
        return cls(bytes((npages + 63) // 64 * 8), npages, base_pfn)

    @classmethod
    def from_pfns(cls, pfns, npages: int, base_pfn: int = 0) -> "DirtyBitmap":
        value = 0
        for pfn in pfns:
            i = pfn - base_pfn
            if not 0 <= i < npages:
                raise ValueError(f"pfn {pfn:#x} outside [{base_pfn:#x}, {base_pfn + npages:#x})")
            value |= 1 << i
        return cls(value.to_bytes((npages + 63) // 64 * 8, "little"), npages, base_pfn)

    def tobytes(self) -> bytes:
        return self._bits

    def count(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def __len__(self) -> int:
        return self.count()

    def __bool__(self) -> bool:
        return self._bits.count(0) != len(self._bits)      # in C: any() walks it in Python

    def pfns(self) -> array:
        """The dirty page numbers, ascending, as an ``array('Q')``."""
        out = array("Q", bytes(8 * self.count()))
        if out:
            n = lib.hvm_bitmap_pfns(
                ffi.from_buffer("uint64_t[]", self._bits), len(self._bits) // 8,
                self.base_pfn, ffi.from_buffer("uint64_t[]", out))
            assert n == len(out)
        return out

    def __iter__(self):
        return iter(self.pfns())

    def __contains__(self, pfn: int) -> bool:
        i = pfn - self.base_pfn
        return 0 <= i < self.npages and bool(self._bits[i >> 3] >> (i & 7) & 1)

    def _check_same_shape(self, other: "DirtyBitmap") -> None:
        if (self.npages, self.base_pfn) != (other.npages, other.base_pfn):
            raise ValueError("dirty bitmaps of different ranges")

    def __or__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        self._check_same_shape(other)
        if not other:           # the common case (a stub's window log), without the int round trip
            return self
        if not self:
            return other
        value = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        return DirtyBitmap(value.to_bytes(len(self._bits), "little"), self.npages, self.base_pfn)

    def __eq__(self, other) -> bool:
        return (isinstance(other, DirtyBitmap) and self.npages == other.npages
                and self.base_pfn == other.base_pfn and self._bits == other._bits)

    def __repr__(self) -> str:
        return f"DirtyBitmap({self.count()} of {self.npages} pages from pfn {self.base_pfn:#x})"


def pfns_bitmap(pfns: array, lo: int, hi: int, base_pfn: int, npages: int) -> bytearray:
    """A bitmap of ``npages`` pages from ``base_pfn`` (bit i: page ``base_pfn + i``) with
    the bits of ``pfns[lo:hi]`` set (an ``array('Q')``; pfns outside are skipped)."""
    nwords = (npages + 63) // 64
    bits = bytearray(nwords * 8)
    if hi > lo:
        lib.hvm_pfns_bitmap(ffi.from_buffer("uint64_t[]", pfns) + lo, hi - lo, base_pfn,
                            ffi.from_buffer("uint64_t[]", bits), nwords)
    return bits


def merged_pfns(bitmaps: list, others: list | None, bases: list[int]) -> array:
    """The pages set in slot bitmaps (``bitmaps[i]``, bit j: page ``bases[i] + j``; each
    ORed in place with ``others[i]`` first, when given), ascending, as an ``array('Q')``: a
    DirtyLog's ``pfns()`` without building it, in two C passes over each bitmap."""
    counts = []
    for i, bits in enumerate(bitmaps):
        words = ffi.from_buffer("uint64_t[]", bits)
        if others is not None and len(others[i]) != len(bits):   # C reads len(bits) of it
            raise ValueError(f"slot {i}: bitmaps of {len(bits)} and {len(others[i])} bytes")
        other = ffi.from_buffer("uint64_t[]", others[i]) if others is not None else words
        counts.append(lib.hvm_bitmap_or(words, other, len(bits) // 8))
    out = array("Q", bytes(8 * sum(counts)))
    into = ffi.from_buffer("uint64_t[]", out)
    at = 0
    for bits, base, count in zip(bitmaps, bases, counts):
        if count:
            lib.hvm_bitmap_pfns(ffi.from_buffer("uint64_t[]", bits), len(bits) // 8, base, into + at)
            at += count
    return out


class DirtyLog:
    """The dirty pages of several memory slots as one set: ``parts`` are the slots'
    DirtyBitmaps, in ascending pfn order, apart (a VM's RAM in several slots, e.g. below the
    32-bit MMIO hole and above 4 GiB)."""
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = tuple(parts)
        for a, b in zip(self.parts, self.parts[1:]):
            if a.base_pfn + a.npages > b.base_pfn:
                raise ValueError(f"dirty bitmaps out of order or overlapping at pfn {b.base_pfn:#x}")

    def count(self) -> int:
        return sum(part.count() for part in self.parts)

    def __len__(self) -> int:
        return self.count()

    def __bool__(self) -> bool:
        return any(self.parts)

    def pfns(self) -> array:
        """The dirty page numbers of all parts, ascending, as an ``array('Q')``."""
        if len(self.parts) == 1:
            return self.parts[0].pfns()
        out = array("Q")
        for part in self.parts:
            out.extend(part.pfns())
        return out

    def __iter__(self):
        return iter(self.pfns())

    def __contains__(self, pfn: int) -> bool:
        return any(pfn in part for part in self.parts)

    def __or__(self, other: "DirtyLog") -> "DirtyLog":
        if len(self.parts) != len(other.parts):
            raise ValueError("dirty logs of different slots")
        return DirtyLog(a | b for a, b in zip(self.parts, other.parts))

    def __eq__(self, other) -> bool:
        return isinstance(other, DirtyLog) and self.parts == other.parts

    def __repr__(self) -> str:
        return f"DirtyLog({self.count()} pages in {len(self.parts)} slots)"
