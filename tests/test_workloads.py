"""Each workload boots and prints within seconds on a 256 MiB guest, and its
memory checks out from the host."""
import re
import time

import pytest

from migrate.domain import Domain, DomainConfig
from migrate.guest import check
from migrate.guest.boot import WORKLOAD_BASE
from test_qemu_elf import guest_symbol

pytestmark = pytest.mark.kvm

MEMORY = 256 << 20


def _boot(domains, workload, args=(), **kw):
    dom = Domain.boot(DomainConfig(workload, workload, MEMORY, args=list(args), **kw))
    domains.append(dom)
    dom.resume()
    return dom


def test_idle_counts_timer_ticks(domains):
    dom = _boot(domains, "idle")
    t0 = time.monotonic()
    dom.console.wait_for(r"^idle ticks=200$", 10)
    elapsed = time.monotonic() - t0
    assert 1.0 < elapsed < 6.0, f"200 ticks at 100 Hz took {elapsed:.2f}s"


def test_pagetouch_passes_qemu_check(domains):
    dom = _boot(domains, "pagetouch")
    dom.console.wait_for(r"pagetouch pass=\d+", 15)
    for _ in range(3):
        time.sleep(0.2)
        dom.pause()
        assert check.pagetouch_check(dom.memory) == []
        dom.resume()


def test_pagetouch_check_catches_a_bad_page(domains):
    dom = _boot(domains, "pagetouch", timer_hz=0)
    dom.console.wait_for(r"pagetouch pass=\d+", 15)
    dom.pause()
    page = WORKLOAD_BASE + 1000 * 4096
    dom.memory[page] = (dom.memory[page] + 7) & 0xFF
    assert check.pagetouch_check(dom.memory) != []


def test_dirtier_keeps_its_rate(domains):
    dom = _boot(domains, "dirtier", args=[32 << 20, 20 << 20])
    dom.console.wait_for(r"dirtier writes=", 10)
    m = dom.console.wait_for(r"dirtier writes=\d+ rate=(\d+) KB/s", 5, start=dom.console.next_index)
    rate = int(m.group(1))
    assert 0.8 * 20480 < rate < 1.2 * 20480, m.group(0)


def test_ledger_reports_sums_the_host_can_recompute(domains):
    dom = _boot(domains, "ledger", args=[99, 2048])
    m = dom.console.wait_for(r"ledger ok gen=([1-9]\d*) sum=([0-9a-f]{16})", 15)
    assert int(m.group(2), 16) == check.ledger_sum(99, int(m.group(1)), 2048)
    dom.pause()
    bad, _ = check.ledger_verify(dom.memory)
    assert bad == -1
    # a data page the guest will verify before rewriting it: both the host check and the guest see it
    _flip_a_page_and_see_it_reported(dom, lambda hdr: hdr.npages - 1 if hdr.phase == 0 and hdr.cursor < hdr.npages - 1
                                     else 0 if hdr.phase == 1 and hdr.cursor >= 2 else None)


def _flip_a_page_and_see_it_reported(dom, pick) -> None:
    """With the ledger guest ``dom`` paused: find a pause (letting it run a moment between
    tries) where ``pick(header)`` names a data page (None: none here), flip a bit of that
    page: the host check and then the guest report it."""
    for _ in range(200):
        hdr = check.ledger_header(dom.memory)
        if (page := pick(hdr)) is not None:
            break
        dom.resume()
        time.sleep(0.001)
        dom.pause()
    else:
        raise AssertionError(f"the ledger was never paused where a page fits: {hdr}")
    dom.memory[WORKLOAD_BASE + 4096 * (1 + page) + 64] ^= 0x40
    assert check.ledger_verify(dom.memory)[0] == page
    dom.resume()
    dom.console.wait_for(rf"ledger CORRUPT page={page} word=8 ", 15)


def test_the_ledger_checks_a_page_before_it_rewrites_it(domains):
    """A page the pass has checked already (below the check's cursor) or that the rewrite
    has not reached yet is read again before it is overwritten: a page a restore or a
    move got wrong there is reported, not silently replaced by the next generation."""
    dom = _boot(domains, "ledger", args=[7, 2048])
    dom.console.wait_for(r"ledger ok gen=1 ", 15)
    dom.pause()
    _flip_a_page_and_see_it_reported(dom, lambda hdr: 0 if hdr.phase == 0 and hdr.cursor >= 2
                                     else hdr.npages - 1 if hdr.phase == 1 and hdr.cursor < hdr.npages - 2 else None)


def test_the_journal_reads_back_older_generations_and_says_bad_ones(domains, tmp_path):
    """Journal sectors lost behind the guest's back (zeroed in the image while it is paused,
    all but the last two generations') are found by the read-back of an older generation,
    which picks any of the generations still on disk (it always took the last one), and a
    bad read-back stops the ledger with JOURNAL BAD (it was printed as "ledger ok ...
    journal=older-bad": "older-bad" starts with 'o', as "ok" and "off" do)."""
    disk = tmp_path / "j.img"
    disk.write_bytes(bytes(1 << 20))
    dom = _boot(domains, "ledger", args=[3, 16], disk=str(disk))
    dom.console.wait_for(r"ledger ok gen=40 .*journal=ok$", 30)
    dom.pause()
    gen = check.ledger_header(dom.memory).gen
    image = bytearray(disk.read_bytes())
    keep = {g % 2048: image[g % 2048 * 512:(g % 2048 + 1) * 512] for g in (gen - 1, gen)}
    image[:] = bytes(len(image))
    for sector, block in keep.items():
        image[sector * 512:(sector + 1) * 512] = block
    disk.write_bytes(image)
    mark = dom.console.next_index
    dom.resume()
    m = dom.console.wait_for(r"^ledger (JOURNAL BAD \S+|ok .*journal=(?!ok$)\S+$)", 30, start=mark)
    assert m.group(1).startswith("JOURNAL BAD older-bad"), m.string


CPU_LAST_TSC = 40       # offsetof(struct cpu, last_tsc) (src/smp.h)


@pytest.mark.parametrize("workload", ["idle", "ledger"])
def test_a_tsc_set_back_is_reported(domains, workload):
    """Each vCPU compares the TSC at every timer tick with the one before, and a TSC that
    went back (a save, restore or move that set it back) is said once, as "clock CORRUPT",
    which every test and chaos check looks for. KVM here (PVM) gives the guest the host's
    TSC and takes no TSC write or offset from the host, so the TSC cannot be set back from
    outside: the vCPU's last reading is set ahead instead, which the next tick sees the same way."""
    dom = _boot(domains, workload, args=[1, 64] if workload == "ledger" else [])
    dom.console.wait_for(r"^(idle ticks=100|ledger ok gen=2 )", 15)
    dom.pause()
    at = guest_symbol("cpus") + CPU_LAST_TSC
    dom.memory[at:at + 8] = (1 << 63).to_bytes(8, "little")
    dom.resume()
    m = dom.console.wait_for(r"^clock CORRUPT cpu=0 tsc went back from (\d+) to (\d+)$", 15)
    assert int(m.group(1)) == 1 << 63 and int(m.group(2)) < 1 << 63
    assert sum("clock CORRUPT" in line for line in dom.console.lines()) == 1       # said once


def test_console_lines_are_whole(domains):
    dom = _boot(domains, "ledger", args=[1, 256])
    dom.console.wait_for(r"ledger ok gen=5", 15)
    for line in dom.console.lines():
        assert re.fullmatch(r"ledger (start seed=1 pages=256 gen=0 journal=0|"
                            r"ok gen=\d+ sum=[0-9a-f]{16} ticks=\d+ journal=off)", line), line


def test_bench_loop_matches_the_host_and_shuts_down(domains):
    from migrate.guest._check import ffi, lib
    dom = Domain.boot(DomainConfig("bench", "bench", 16 << 20, args=[64, 3], timer_hz=0))
    domains.append(dom)
    dom.resume()
    m = dom.console.wait_for(r"bench pages=64 rounds=3 cycles=\d+ sum=([0-9a-f]{16})", 20)
    assert dom.wait_stopped(5) and dom.status == "shutdown"
    assert int(m.group(1), 16) == lib.ledger_bench(ffi.new("uint64_t[]", 64 * 512), 64, 3)


def test_guest_panic_is_a_crash_with_a_reason(domains):
    dom = Domain.boot(DomainConfig("panic", "idle", 16 << 20))
    domains.append(dom)
    dom.memory[0x1000 + 8] = 99        # boot info: an unknown workload id
    dom.memory[0x1000 + 12] = 0        # no timer
    dom.resume()
    dom.console.wait_for(r"PANIC: unknown workload 99", 10)
    assert dom.wait_stopped(5) and dom.status == "crashed"
    assert "0xdead0200" in dom.crash_reason


def test_ledger_header_describes_memory_at_any_instruction(domains):
    """Pause a fast-cycling ledger at many arbitrary points: the host check
    must pass every time (each header store keeps it exact). At least 60 pauses, and
    on until both phases were hit: on a loaded host the rewrite, the shorter phase, can
    slip past 60 pauses (seen once in a full suite run)."""
    import random
    rng = random.Random(5)
    dom = _boot(domains, "ledger", args=[3, 1024], timer_hz=0)
    dom.console.wait_for(r"ledger ok gen=1 ", 10)
    phases = set()
    for count in range(1, 601):
        dom.pause()
        hdr = check.ledger_header(dom.memory)
        phases.add((hdr.phase, hdr.cursor in (0, hdr.npages)))
        bad, _ = check.ledger_verify(dom.memory)
        assert bad == -1, hdr
        dom.resume()
        if count >= 60 and {p for p, _ in phases} == {0, 1}:
            break
        time.sleep(rng.uniform(0, 0.005))
    assert {p for p, _ in phases} == {0, 1}, phases     # both verify and rewrite were hit


def test_iobench_reports_three_costs(domains, caplog):
    dom = Domain.boot(DomainConfig("iob", "iobench", 16 << 20, args=[50], timer_hz=0))
    domains.append(dom)
    dom.resume()
    m = dom.console.wait_for(r"iobench n=50 null=(\d+) host=(\d+) stub=(\d+)", 20)
    assert all(int(x) > 0 for x in m.groups())
    assert dom.wait_stopped(5) and dom.status == "shutdown"
    # port 0x80 is nobody's: read as all-ones, logged once, the guest carries on
    unclaimed = [r for r in caplog.records if "unhandled port 0x80" in r.getMessage()]
    assert len(unclaimed) == 1


@pytest.mark.kvm
def test_pause_and_resume_say_when_the_guest_stopped_and_went_back_in(domains):
    """pause() returns when the vCPU left the guest and entered() when it went back in:
    the ends of a downtime. A pause that lands before the vCPU thread went in at all
    returns its own time, not a stale one from an earlier pause."""
    dom = Domain.boot(DomainConfig("pz", "idle", 16 << 20))
    domains.append(dom)
    asked = time.monotonic()
    assert dom.pause() >= asked                     # never ran
    for _ in range(3):
        dom.resume()
        went_in = dom.entered()
        time.sleep(0.05)
        asked = time.monotonic()
        stopped = dom.pause()
        assert went_in is not None and went_in < asked <= stopped <= time.monotonic()
        dom.resume()
        asked = time.monotonic()
        assert dom.pause() >= asked                 # resumed and paused at once: not stale
