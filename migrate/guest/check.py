"""Host-side checks of a paused guest's memory: what tests and tools use to
see, from outside, that a workload's memory is what it should be."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ._check import ffi, lib
from .boot import PAGE_SIZE, WORKLOAD_BASE, ram_layout, workload_region

_LEDGER_HEADER = struct.Struct("<9Q")


@dataclass(frozen=True)
class LedgerHeader:
    magic: int
    seed: int
    npages: int
    gen: int
    phase: int
    cursor: int
    sum: int
    passes: int
    target: int


def ledger_header(memory) -> LedgerHeader:
    return LedgerHeader(*_LEDGER_HEADER.unpack_from(memory, WORKLOAD_BASE))


def ledger_verify(memory) -> tuple[int, int]:
    """(first bad page or -1 when consistent (-2: bad header), sum) of the ledger of a
    one-vCPU guest without RAM above 4 GiB: ``memory`` is its RAM from address 0."""
    return ledger_verify_region(memoryview(memory)[WORKLOAD_BASE:])


def ledger_verify_region(region) -> tuple[int, int]:
    """(first bad page or -1 when consistent (-2: bad header), sum) of one ledger region."""
    sum_out = ffi.new("uint64_t *")
    bad = lib.hvm_ledger_verify(ffi.from_buffer(region), len(region), sum_out)
    return bad, sum_out[0]


def ledger_region_bounds(memory: int, vcpus: int) -> list[tuple[int, int]]:
    """(guest address, bytes) of each vCPU's ledger region of a guest of ``memory`` bytes
    (specs/guest-boot.md, "ledger")."""
    base, size = workload_region(ram_layout(memory))
    share = size // vcpus // PAGE_SIZE * PAGE_SIZE
    return [(base + k * share, share) for k in range(vcpus)]


def verify_ledgers(domain) -> list[tuple[int, int]]:
    """``ledger_verify_region`` of every vCPU's ledger region of a paused domain, in vCPU
    order: a consistent guest gives ``(-1, sum)`` for each."""
    out = []
    for address, size in ledger_region_bounds(domain.config.memory, domain.config.vcpus):
        view = domain.guest_view(address, size)
        try:
            out.append(ledger_verify_region(view))
        finally:
            view.release()
    return out


def ledger_sum(seed: int, gen: int, npages: int) -> int:
    """The sum a ledger guest must print for generation ``gen``."""
    return lib.hvm_ledger_sum(seed, gen, npages)


def pagetouch_check(memory, base: int = WORKLOAD_BASE, size: int | None = None) -> list[int]:
    """QEMU's migration-test check on a paused pagetouch guest.

    Every page's first byte equals the previous page's, except at most one
    place where it is one less (the pass in progress).  Returns the page
    indices that break this (empty when the memory is consistent).
    """
    mem = memoryview(memory)
    end = len(mem) if size is None else base + size
    firsts = mem[base:end:PAGE_SIZE].tobytes()
    steps = [i for i in range(1, len(firsts)) if firsts[i] != firsts[i - 1]]
    bad = [i for i in steps if (firsts[i - 1] - firsts[i]) & 0xFF != 1]
    if not bad and len(steps) > 1:
        bad = steps[1:]
    return bad
