"""The dirty log is exact: a guest that writes a known set of pages (the
pageset workload, between two sync points, timer off) produces that set."""
import random
import struct
import threading
import time

import pytest

from migrate.domain import Domain, DomainConfig
from migrate.guest.boot import PAGE_SIZE, WORKLOAD_BASE

pytestmark = pytest.mark.kvm

MEMORY = 64 << 20


def _run_pageset(domains, pfns):
    cfg = DomainConfig("pageset", "pageset", MEMORY, args=[len(pfns)], timer_hz=0)
    dom = Domain.boot(cfg)
    domains.append(dom)
    # the pfn list lives at the start of the workload region
    dom.memory[WORKLOAD_BASE:WORKLOAD_BASE + 8 * len(pfns)] = struct.pack(f"<{len(pfns)}Q", *pfns)
    logs = {}
    done = threading.Event()

    def on_sync(value):         # runs in the vCPU thread: the guest is stopped here
        logs[value] = dom.fetch_dirty()
        if value == 2:
            done.set()

    dom.on_sync = on_sync
    dom.set_dirty_logging(True)
    dom.resume()
    assert done.wait(20), dom.console.lines()
    dom.pause()
    return logs


def test_dirty_log_is_exactly_the_written_pages(domains):
    rng = random.Random(1234)
    first = (WORKLOAD_BASE + 64 * PAGE_SIZE) // PAGE_SIZE     # after the list itself
    pfns = sorted(rng.sample(range(first, MEMORY // PAGE_SIZE), 3000))
    logs = _run_pageset(domains, pfns)
    written = logs[2]
    assert written.count() == len(pfns)
    assert list(written.pfns()) == pfns
    # the data landed where the log says
    assert all(domains[0].memory[p * PAGE_SIZE + (i & 0xFFF)] == (i | 1) & 0xFF
               for i, p in enumerate(pfns))


def test_dirty_log_sees_a_single_page(domains):
    pfn = (WORKLOAD_BASE + 100 * PAGE_SIZE) // PAGE_SIZE
    logs = _run_pageset(domains, [pfn])
    assert list(logs[2].pfns()) == [pfn]


def test_a_fetch_that_leaves_the_log_and_clears_piece_by_piece(domains):
    """Manual protection (a pre-copy round's way, engine/save.py _send): a fetch with
    clear=False leaves the log as it was; clear_dirty clears exactly the pages named; a
    cleared page is tracked again (the guest's next write to it shows)."""
    dom = Domain.boot(DomainConfig("lazy", "dirtier", MEMORY, args=[4 << 20, 0]))
    domains.append(dom)
    assert dom.ram.vm.manual_protect, "KVM here lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
    dom.resume()
    dom.console.wait_for("dirtier start", 20)
    guest = dom.parts()[0]          # what the engine fetches and clears: the guest's RAM
    guest.set_dirty_logging(True)
    time.sleep(0.2)
    dom.pause()
    first = guest.fetch_dirty(clear=False).pfns()
    assert len(first) > 64
    assert guest.fetch_dirty(clear=False).pfns() == first        # paused, nothing cleared
    half = len(first) // 2
    guest.clear_dirty(first[:half])
    assert guest.fetch_dirty(clear=False).pfns() == first[half:]
    guest.clear_dirty(first[half:])
    assert len(guest.fetch_dirty(clear=False).pfns()) == 0
    dom.resume()                    # it goes on writing its working set, cleared pages too
    time.sleep(0.2)
    dom.pause()
    again = set(guest.fetch_dirty().pfns())
    assert len(again & set(first)) > half
    assert len(guest.fetch_dirty().pfns()) == 0                   # the plain fetch cleared


def test_dirty_pfns_lists_what_a_fetch_that_leaves_the_log_lists(domains, tmp_path):
    """VmSpace.dirty_pfns (a pause's last fetch: bitmaps kept per slot, the stub's window
    log ORed in, in C) against fetch_dirty(clear=False).pfns(), for the guest (whose pages
    the stub's disk DMA writes through its window too) and the stub; and it clears nothing."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    dom = Domain.boot(DomainConfig("pfns", "ledger", MEMORY, args=[21, 0], disk=str(disk)))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for(r"ledger ok gen=1 ", 20)
    guest, stub = dom.parts()
    dom.set_dirty_logging(True)
    for part in (guest, stub):
        part.fetch_dirty()
    dom.console.wait_for(r"ledger ok gen=3 ", 20)      # two more journal writes: DMA into the guest
    dom.pause()
    assert guest.also_writes.fetch_dirty(clear=False).pfns(), "the stub wrote no guest page"
    for part in (guest, stub):
        want = part.fetch_dirty(clear=False).pfns()
        assert len(want) and part.dirty_pfns() == want and part.dirty_pfns() == want
    guest.clear_dirty(guest.dirty_pfns())
    stub.clear_dirty(stub.dirty_pfns())
    assert len(guest.dirty_pfns()) == len(stub.dirty_pfns()) == 0
