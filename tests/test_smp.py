"""Real guest shapes (issue 14): several vCPUs and RAM above the 32-bit MMIO hole.

The layout and CPUID rules without KVM; then real guests: vCPUs that boot with distinct
LAPIC ids and each run a ledger on their own region; the smp workload (tokens passed
around a ring with locked instructions and IPIs) through save/restore, with its checks
shown to catch a lost and a doubled IPI and a lost page; RAM above 4 GiB saved, restored
and dirty-logged slot by slot; a 16 GiB guest with little touched; and the restore's
refusals of streams whose vCPUs or memory ranges do not match their configuration."""
import fcntl
import io
import os
import re
import struct
import time

import pytest

from migrate.cpu import CpuidEntry, baseline_cpuid, cpuid_for_vcpu
from migrate.domain import Domain, DomainConfig, DomainError, guest_layout
from migrate.engine import RestoreError, restore, save, save_to_file
from migrate.engine.files import file_chunks
from migrate.guest import boot as gboot
from migrate.guest import check
from test_relocation import hosts, pki  # noqa: F401 (fixtures)
from test_save_restore import save_bytes

GIB = 1 << 30
SMP_LINE = re.compile(r"^smp (ok round=(\d+) |BAD |STALL )")


# -- without KVM -----------------------------------------------------------------------

def test_pc_layout_and_the_page_tables_that_map_it():
    assert guest_layout(3 * GIB) == ((0, 786432),)
    assert guest_layout(3 * GIB + (2 << 20)) == ((0, 786432), (0x100000, 512))
    assert guest_layout(64 * GIB) == ((0, 786432), (0x100000, 61 * 262144))
    assert gboot.workload_region(gboot.ram_layout(256 << 20)) == (0x400000, (256 << 20) - 0x400000)
    assert gboot.workload_region(gboot.ram_layout(8 * GIB)) == (4 * GIB, 5 * GIB)
    pieces = dict(gboot._page_tables(4 * GIB + 5 * GIB))        # RAM to 9 GiB
    head, high = pieces[gboot.PML4_ADDR], pieces[gboot.HIGH_PD_ADDR]
    pdpt = struct.unpack_from("<512Q", head, gboot.PDPT_ADDR - gboot.PML4_ADDR)
    assert [e & ~0xFFF for e in pdpt[:9]] == [0x4000, 0x5000, 0x6000, 0x7000] + \
        [0x10000 + i * 0x1000 for i in range(5)] and pdpt[9:] == (0,) * 503
    leaves = struct.unpack(f"<{len(high) // 8}Q", high)
    assert len(leaves) == 5 * 512 and leaves[0] == (4 * GIB) | 0xE7 and leaves[-1] == (9 * GIB - (2 << 20)) | 0xE7
    assert list(dict(gboot._page_tables(0))) == [gboot.PML4_ADDR]     # small guests: as before
    gboot._page_tables(gboot.MAP_MAX)
    with pytest.raises(ValueError, match="page tables reach"):
        gboot._page_tables(gboot.MAP_MAX + 1)


def test_config_bounds():
    DomainConfig("a", "smp", 240 * GIB, vcpus=64).validate()
    for bad, msg in [(dict(vcpus=0), "vcpus must be 1 to 64"), (dict(vcpus=65), "vcpus must be 1 to 64"),
                     (dict(vcpus=True), "vcpus must be 1 to 64"),
                     (dict(memory=240 * GIB + (2 << 20)), "memory size .* out of range")]:
        kw = {"memory": 64 << 20, **bad}
        with pytest.raises(DomainError, match=msg):
            DomainConfig("a", "smp", **kw).validate()


def test_cpuid_names_each_vcpu_and_nothing_else():
    leaves = baseline_cpuid() + (CpuidEntry(0xB, 0, 1, 1, 1, 0x100, 0), CpuidEntry(0xB, 1, 1, 4, 8, 0x201, 0))
    assert cpuid_for_vcpu(leaves, 0) == leaves         # baseline: vCPU 0 gets it as it is
    for apic_id in (1, 7, 63):
        mine = cpuid_for_vcpu(leaves, apic_id)
        changed = [(a, b) for a, b in zip(leaves, mine) if a != b]
        assert [(a.function, b.ebx >> 24, b.edx) for a, b in changed] == \
            [(1, apic_id, leaves[1].edx), (0xB, 0, apic_id), (0xB, 0, apic_id)]
        assert mine[1].ebx & 0xFFFFFF == leaves[1].ebx & 0xFFFFFF


# -- real guests ---------------------------------------------------------------------

def smp_rounds(dom, start: int, count: int, timeout: float) -> list[int]:
    """The next ``count`` `smp ok` rounds after console line ``start``; fails on BAD or STALL."""
    rounds, deadline = [], time.monotonic() + timeout
    while len(rounds) < count:
        m = dom.console.wait_for(SMP_LINE.pattern, max(0.1, deadline - time.monotonic()), start=start)
        assert m.group(2), f"{m.string}\n" + "\n".join(dom.console.lines()[-12:])
        rounds.append(int(m.group(2)))
        start = _index_after(dom, m.string, start)
    return rounds


def _index_after(dom, line: str, start: int) -> int:
    lines = dom.console.lines(start)
    return start + lines.index(line) + 1


def bad_lines(dom) -> list[str]:
    return [ln for ln in dom.console.lines() if re.match(r"^(smp (BAD|STALL)|ledger CORRUPT|PANIC)", ln)]


@pytest.mark.kvm
def test_vcpus_boot_with_their_lapic_ids_and_each_runs_a_ledger(domains):
    dom = Domain.boot(DomainConfig("l4", "ledger", 64 << 20, args=[5, 256], vcpus=4, stub=False))
    domains.append(dom)
    dom.resume()
    for k in range(4):          # each vCPU checked that CPUID's APIC id is its LAPIC id
        dom.console.wait_for(rf"^ledger ok cpu={k} gen=1 ", 60)
    dom.pause()
    assert 0 <= dom.pause_skew < 0.5
    ids = [int.from_bytes(v.get_lapic()[0x20:0x24], "little") >> 24 for v in dom.vcpus]
    assert ids == [0, 1, 2, 3]
    info = gboot.BootInfo.LAYOUT.unpack_from(dom.memory, gboot.BOOT_INFO_ADDR)
    assert info[-3] == 4 and info[-1] == 0             # nr_cpus, high_size
    results = check.verify_ledgers(dom)
    assert [bad for bad, _ in results] == [-1] * 4
    seeds = [check.LedgerHeader(*struct.unpack_from("<9Q", dom.guest_view(a, 4096))).seed
             for a, _ in check.ledger_region_bounds(dom.config.memory, 4)]
    assert seeds == [5, 6, 7, 8]                       # no two vCPUs' pages alike
    # the check sees a page one vCPU wrote being lost
    address, _ = check.ledger_region_bounds(dom.config.memory, 4)[2]
    view = dom.guest_view(address + 4096 * 3, 4096)
    view[64] ^= 0x40
    view.release()
    assert check.verify_ledgers(dom)[2][0] == 2 and check.verify_ledgers(dom)[1][0] == -1
    assert not bad_lines(dom)


@pytest.mark.kvm
@pytest.mark.parametrize("fresh_stub", [False, True], ids=["stub-image", "fresh-stub"])
def test_smp_guest_through_live_save_and_restore(domains, fresh_stub):
    src = Domain.boot(DomainConfig("smp4", "smp", 64 << 20, vcpus=4))
    domains.append(src)
    src.resume()
    smp_rounds(src, 0, 1, 60)
    dom = src
    for _ in range(2):
        data, stats = save_bytes(dom, live=True, after_round=lambda: time.sleep(0.2))
        assert stats.vcpus == 4 and 0 <= stats.pause_skew < 0.5
        at_pause = smp_bytes(dom)
        dom.destroy()
        dom, _ = restore([data], fresh_stub=fresh_stub)
        domains.append(dom)
        assert smp_bytes(dom) == at_pause       # every page the vCPUs wrote, to the last
        mark = dom.console.next_index
        dom.resume()
        got = smp_rounds(dom, mark, 2, 60)
        assert got[1] == got[0] + 1 and got[0] >= 2, got
    assert not bad_lines(dom)


def smp_bytes(dom) -> bytes:
    """The smp workload's memory (header, tokens, every vCPU's queue)."""
    view = dom.guest_view(_smp_base(dom), (2 + dom.config.vcpus) * 4096)
    try:
        return bytes(view)
    finally:
        view.release()


def _paused_smp(domains, vcpus=4):
    dom = Domain.boot(DomainConfig("smpx", "smp", 64 << 20, vcpus=vcpus, stub=False))
    domains.append(dom)
    dom.resume()
    smp_rounds(dom, 0, 1, 60)
    dom.pause()
    return dom


def _smp_base(dom) -> int:
    return gboot.workload_region(gboot.ram_layout(dom.config.memory))[0]


def _queue(dom, k: int) -> dict:
    """vCPU k's smp queue (specs/guest-boot.md, "smp") but its slots."""
    view = dom.guest_view(_smp_base(dom) + (2 + k) * 4096 + 64 * 8, 56)
    names = ("head", "tail", "parked", "parked_round", "doorbell", "ipis", "seen")
    try:
        return dict(zip(names, struct.unpack_from("<7Q", view)))
    finally:
        view.release()


def _irr_byte(vector: int) -> tuple[int, int]:
    """Offset in the LAPIC register page of the IRR byte holding ``vector``, and its bit."""
    return 0x200 + 0x10 * (vector // 32) + vector % 32 // 8, 1 << vector % 8


def _token_pending(dom, k: int) -> bool:
    at, bit = _irr_byte(40)
    return bool(dom.vcpus[k].get_lapic()[at] & bit)


def _paused_where(dom, choose, tries: int = 50):
    """Pause ``dom`` (running) at a moment ``choose(dom)`` gives a vCPU for; that vCPU."""
    for _ in range(tries):
        dom.pause()
        k = choose(dom)
        if k is not None:
            return k
        dom.resume()
        time.sleep(0.01)
    raise AssertionError("no pause gave a vCPU to work on")


@pytest.mark.kvm
def test_smp_checks_catch_a_lost_ipi(domains):
    """An IPI lost at the pause (its doorbell set and counted, nothing to deliver) stalls
    the ring, and vCPU 0 says so."""
    dom = _paused_smp(domains)
    dom.resume()

    def quiet(dom):             # no IPI on its way to it, and it has taken every one it was sent
        return next((k for k in range(1, 4) if (q := _queue(dom, k))["doorbell"] == 0
                     and q["seen"] == q["ipis"]), None)
    k = _paused_where(dom, quiet)
    view = dom.guest_view(_smp_base(dom) + (2 + k) * 4096 + 64 * 8, 56)
    struct.pack_into("<Q", view, 32, 1)                 # the doorbell says an IPI is on its way...
    struct.pack_into("<Q", view, 40, _queue(dom, k)["ipis"] + 1)    # ...one more sent: none will come
    view.release()
    mark = dom.console.next_index
    dom.resume()
    m = dom.console.wait_for(r"^smp (STALL|BAD)", 30, start=mark)
    assert m.group(1) == "STALL", m.string


@pytest.mark.kvm
def test_smp_checks_catch_an_ipi_taken_twice(domains):
    """A token IPI delivered again after a restore (an IRR bit set that was taken already)
    makes a vCPU's token interrupts outnumber the IPIs sent to it: BAD. The vCPU chosen
    has no IPI on its way and has taken all it was sent, and its doorbell is set as the
    duplicate goes in, so that no real IPI can come to merge with it (two interrupts of
    one vector pending are one, by the APIC's rules, and that nobody can see)."""
    dom = _paused_smp(domains)
    dom.resume()

    def quiet(dom):
        return next((k for k in range(4) if (q := _queue(dom, k))["doorbell"] == 0
                     and q["seen"] == q["ipis"] and not _token_pending(dom, k)), None)
    k = _paused_where(dom, quiet)
    view = dom.guest_view(_smp_base(dom) + (2 + k) * 4096 + 64 * 8, 56)
    struct.pack_into("<Q", view, 32, 1)                 # doorbell: senders ring no more
    view.release()
    lapic = bytearray(dom.vcpus[k].get_lapic())
    at, bit = _irr_byte(40)
    lapic[at] |= bit
    dom.vcpus[k].set_lapic(bytes(lapic))
    mark = dom.console.next_index
    dom.resume()
    m = dom.console.wait_for(r"^smp (STALL|BAD.*)", 30, start=mark)
    assert "token interrupts for" in m.group(0), m.string


@pytest.mark.kvm
def test_smp_checks_catch_a_lost_page(domains):
    """A queue page whose write was lost (a token gone from it): BAD, never a silent skip."""
    dom = _paused_smp(domains)
    for attempt in range(3):
        tokens = dom.guest_view(_smp_base(dom) + 4096, 4 * 16)
        hops = struct.unpack_from("<Q", tokens, 0)[0]
        struct.pack_into("<Q", tokens, 0, hops + 1)         # token 0's last hop as if one was repeated
        tokens.release()
        mark = dom.console.next_index
        dom.resume()
        try:
            m = dom.console.wait_for(r"^smp (STALL|BAD.*)", 10, start=mark)
            break
        except TimeoutError:
            # A vCPU paused between its check of token 0's hop and its write of it writes
            # the same value over ours (smp.c, receive): the page is whole again, nothing
            # to catch. Seen twice in full suite runs (2026-12-05); tamper again.
            dom.pause()
    else:
        pytest.fail("the guest never caught token 0's repeated hop in 3 tries")
    assert re.search(r"hop \d+ after hop \d+|made \d+ hops|reached the wrong cpu", m.group(0)), m.string


def ledger_bytes(dom) -> list[bytes]:
    """Every vCPU's ledger, its header page and the pages the header counts, as bytes (a
    consistent but stale copy passes the ledger's own check: compare with the source at its
    pause). Not the rest of its region: reading gigabytes the guest never wrote costs 20 s
    here, and makes the memfd allocate them."""
    out = []
    for address, size in check.ledger_region_bounds(dom.config.memory, dom.config.vcpus):
        view = dom.guest_view(address, size)
        try:
            npages = struct.unpack_from("<Q", view, 16)[0]          # LedgerHeader.npages
            out.append(bytes(view[:min(size, (1 + npages) * gboot.PAGE_SIZE)]))
        finally:
            view.release()
    return out


@pytest.mark.kvm
def test_ram_above_the_hole_is_saved_restored_and_dirty_logged(domains, tmp_path):
    cfg = DomainConfig("hi", "ledger", 4 * GIB + (512 << 20), args=[9, 512], vcpus=2, disk=None)
    src = Domain.boot(cfg)
    domains.append(src)
    assert [(r.first_pfn, r.npages) for r in src.memory_ranges()] == [(0, 786432), (0x100000, 393216)]
    src.resume()
    for k in range(2):
        src.console.wait_for(rf"^ledger ok cpu={k} gen=1 ", 60)
    src.set_dirty_logging(True)
    src.fetch_dirty()
    time.sleep(0.3)
    dirty = src.fetch_dirty()
    high = [p for p in dirty.pfns() if p >= 0x100000]
    assert high and len(dirty.parts) == 2                 # the guest writes above 4 GiB, and it shows
    src.set_dirty_logging(False)
    assert any(first >= 0x100000 for first, _ in src.data_ranges())
    path = tmp_path / "hi.hvm"
    # the guest runs on for a while after pre-copy: the last round must carry what its
    # vCPUs wrote above 4 GiB meanwhile, or the ledgers restored are stale
    stats = save_to_file(src, path, live=True, after_round=lambda: time.sleep(0.3))
    assert all(b == -1 for b, _ in check.verify_ledgers(src))
    at_pause = ledger_bytes(src)
    assert stats.pages_holes > 1_000_000                 # never-written pages are not sent
    from migrate.engine.inspect import Scan
    from migrate.stream import MemoryLayout, Vm
    [layout] = [e.record for e in Scan(path) if isinstance(e.record, MemoryLayout) and e.record.space is Vm.GUEST]
    assert layout.ranges == ((0, 786432), (0x100000, 393216))
    src.destroy()
    dst, _ = restore(file_chunks(path))
    domains.append(dst)
    assert ledger_bytes(dst) == at_pause                # as the source was when it stopped
    assert all(b == -1 for b, _ in check.verify_ledgers(dst))
    mark = dst.console.next_index
    dst.resume()
    for k in range(2):
        dst.console.wait_for(rf"^ledger ok cpu={k} gen=", 60, start=mark)
    assert not bad_lines(dst)


@pytest.mark.kvm
def test_sixteen_gib_guest_with_little_touched(domains, tmp_path):
    """Untouched memfd pages cost nothing: a 16 GiB guest runs, saves and restores on
    this 24 GiB host, and the save reads (allocates) none of the pages it never wrote."""
    src = Domain.boot(DomainConfig("big", "ledger", 16 * GIB, args=[3, 1024], vcpus=2))
    domains.append(src)
    src.resume()
    for k in range(2):
        src.console.wait_for(rf"^ledger ok cpu={k} gen=1 ", 60)
    src.pause()
    blocks = [os.fstat(s.memfd).st_blocks for s in src.ram.slots]
    stats = save_to_file(src, tmp_path / "big.hvm")
    assert [os.fstat(s.memfd).st_blocks for s in src.ram.slots] == blocks
    assert sum(blocks) * 512 < 64 << 20 and stats.pages_holes > 4_000_000
    assert (tmp_path / "big.hvm").stat().st_size < 32 << 20
    src.destroy()
    dst, _ = restore(file_chunks(tmp_path / "big.hvm"))
    domains.append(dst)
    assert all(b == -1 for b, _ in check.verify_ledgers(dst))
    assert sum(os.fstat(s.memfd).st_blocks for s in dst.ram.slots) * 512 < 64 << 20


def _stream(vcpus: int, records_fn, config=None):
    """A stream of a guest of ``vcpus`` vCPUs (idle, no stub; or ``config``) with the CPU
    records and what ``records_fn(writer, config)`` adds, made by the stream writer."""
    from migrate.cpu import policy_for, this_host
    from migrate.engine.state import config_record, cpu_records
    from migrate.stream import StreamWriter, Vm
    w = StreamWriter()
    cfg = config or DomainConfig("eng", "idle", 16 << 20, stub=False, vcpus=vcpus)
    out = [w.start(), w.record(config_record(cfg))]
    out += [w.record(r) for r in cpu_records(policy_for("baseline", this_host()), Vm.GUEST)]
    out += records_fn(w, cfg)
    out.append(w.finish())
    return b"".join(out)


@pytest.mark.kvm
def test_restore_refuses_vcpus_and_ranges_unlike_the_configuration(domains):
    from migrate.engine.state import state_records
    from migrate.stream import MemoryLayout, Vm
    src = Domain.boot(DomainConfig("eng", "idle", 16 << 20, stub=False, vcpus=2))
    domains.append(src)
    src.pause()
    state = src.capture()
    layouts = [MemoryLayout(Vm.GUEST, ((0, 4096),)), MemoryLayout(Vm.STUB, ())]

    def with_state(vcpu_ids):
        def records(w, cfg):
            picked = [v for v in state.vcpus if v.vcpu_id in vcpu_ids]
            return [w.record(r) for r in layouts] + [
                w.record(r) for r in state_records(type(state)(cfg, picked, state.platform))]
        return records
    with pytest.raises(RestoreError, match=r"state of guest vCPUs \[0\]; the guest has 2"):
        restore([_stream(2, with_state({0}))])
    with pytest.raises(RestoreError, match=r"VCPU_REGS of guest vcpu 1; the guest has 1 \(ids 0\.\.0\)"):
        restore([_stream(1, with_state({0, 1}))])
    dom, _ = restore([_stream(2, with_state({0, 1}))])
    domains.append(dom)
    assert len(dom.vcpus) == 2
    big = DomainConfig("eng", "idle", 4 * GIB, stub=False)
    for ranges in [((0, 1 << 20),), ((0, 786432), (0xD0000, 262144)), ((0, 786432), (0x100000, 262143))]:
        with pytest.raises(RestoreError, match="DOMAIN_CONFIG's 4096 MiB are 786432 pages from pfn 0x0, "
                                               "262144 pages from pfn 0x100000"):
            restore([_stream(1, lambda w, cfg: [w.record(MemoryLayout(Vm.GUEST, ranges)),
                                                w.record(MemoryLayout(Vm.STUB, ()))], config=big)])


# -- through the CLI and domain processes ------------------------------------------------

KVM_NMI = 0xAE9A                # _IO(KVMIO, 0x9a): an NMI for the vCPU, as LINT1 or an NMI IPI leaves it
MP_STATE_INIT_RECEIVED, MP_STATE_HALTED = 2, 3


@pytest.mark.kvm
def test_halted_and_init_waiting_vcpus_and_a_pending_nmi_survive_a_save(domains):
    """The vCPU states the smp workload never leaves (its APs are started by the host and
    it sends only fixed IPIs): a halted vCPU with an NMI pending, and an AP that took INIT
    and waits for its SIPI, through a save and a restore (the C capture and apply, stream
    records between), as the restored domain holds them before it runs."""
    src = Domain.boot(DomainConfig("mpst", "smp", 64 << 20, vcpus=2))
    domains.append(src)
    src.vcpus[0].set_mp_state(MP_STATE_HALTED)
    fcntl.ioctl(src.vcpus[0].fd, KVM_NMI)
    src.vcpus[1].set_mp_state(MP_STATE_INIT_RECEIVED)

    def held(dom):
        return [(v.get_mp_state(), v.get_vcpu_events()["nmi"]["pending"]) for v in dom.vcpus]
    assert held(src) == [(MP_STATE_HALTED, 1), (MP_STATE_INIT_RECEIVED, 0)]
    data, _ = save_bytes(src)
    dst, _ = restore([data], name="mpst2")
    domains.append(dst)
    assert held(dst) == [(MP_STATE_HALTED, 1), (MP_STATE_INIT_RECEIVED, 0)]


@pytest.mark.kvm
def test_cli_shows_vcpus_and_memory_ranges(state_dir, tmp_path):
    from click.testing import CliRunner
    from migrate.cli import hvm
    from migrate.host import control
    run = CliRunner().invoke
    try:
        res = run(hvm, ["create", "--workload", "smp", "--vcpus", "2", "--memory", "4G", "--name", "s2"])
        assert res.exit_code == 0 and "2 vCPUs" in res.output, res.output
        res = run(hvm, ["info", "s2"])
        assert "vcpus:         2" in res.output, res.output
        assert "memory_ranges: 3072 MiB at 0x0, 1024 MiB at 0x100000000" in res.output, res.output
        deadline = time.monotonic() + 60
        while "smp ok round=1 " not in (text := run(hvm, ["console", "s2"]).output):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        path = tmp_path / "s2.hvm"
        res = run(hvm, ["save", "s2", str(path), "--live"])
        assert res.exit_code == 0 and "2 vCPUs stopped within" in res.output, res.output
        res = run(hvm, ["stream", "inspect", str(path)])
        assert res.exit_code == 0, res.output
        assert "GUEST 1048576 pages (4096 MiB) in 2 ranges: 786432 from pfn 0x0, 262144 from pfn 0x100000" \
            in res.output
        assert "vCPUs: GUEST 2 (0-1), STUB 1 (0)" in res.output
        assert "vcpus=2" in run(hvm, ["stream", "dump", str(path)]).output
        res = run(hvm, ["restore", str(path), "--name", "s3"])
        assert res.exit_code == 0, res.output
        deadline = time.monotonic() + 60
        while not re.search(r"^smp ok round=\d+ ", text := run(hvm, ["console", "s3"]).output, re.M):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert "BAD" not in text and "STALL" not in text
    finally:
        for name in ("s2", "s3"):
            try:
                with control.DomainClient(name) as c:
                    c.call("destroy")
                control.wait_gone(name)
            except control.ControlError:
                pass


@pytest.mark.kvm
def test_smp_guest_relocates(pki, hosts, tmp_path):
    import json
    from click.testing import CliRunner
    from migrate.cli import hvm
    from migrate.host import control
    from test_relocation import wait_console
    src, dst, daemon = hosts
    b = daemon(dst)
    control.create_domain(DomainConfig("r4", "smp", 64 << 20, vcpus=4))
    wait_console("r4", src, r"^smp ok round=2 ", timeout=60)
    res = CliRunner().invoke(hvm, ["migrate", "r4", f"127.0.0.1:{b.address[1]}", "--tls-dir",
                                   str(pki / "ca" / "src"), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)["stats"]
    assert stats["vcpus"] == 4 and 0 <= stats["pause_skew"] < 0.5 and stats["save"]["pause_skew"] == stats["pause_skew"]
    [info] = control.list_domains(dst)
    assert info["vcpus"] == 4 and info["status"] == "running"
    m, _ = wait_console("r4", dst, r"^smp ok round=(\d+) ", timeout=60)
    m2, text = wait_console("r4", dst, rf"^smp ok round={int(m.group(1)) + 1} ", timeout=60)
    assert "BAD" not in text and "STALL" not in text


@pytest.mark.kvm
def test_the_stubs_window_reaches_ram_above_the_hole(domains, tmp_path):
    """Block DMA into RAM above 4 GiB lands there and in the merged dirty log (through the
    stub's second window slot, not the guest VM's log); a buffer in the MMIO hole, across
    the end of low RAM or past the end of high RAM fails the device, not the host."""
    from migrate.stub import abi
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(3 * 512) + b"\xa5" * 512 + bytes(1 << 20))
    dom = Domain.boot(DomainConfig("dma", "idle", 3 * GIB + (64 << 20), disk=str(disk)))
    domains.append(dom)
    stub, mem = dom.stub, dom.memory

    def mmio(offset, value=None):
        direction = abi.DIR_READ if value is None else abi.DIR_WRITE
        result, data, _ = stub.request(abi.TYPE_MMIO, abi.VIRTIO_BASE + offset, 4, direction, value or 0)
        assert result == 0
        return data
    desc, avail, used, hdr, status = 0x500000, 0x501000, 0x502000, 0x503000, 0x505000

    def submit(data_address):
        for offset, value in ((0x070, 0), (0x070, 1 | 2), (0x024, 1), (0x020, 1), (0x070, 1 | 2 | 8),
                              (0x030, 0), (0x038, 8), (0x080, desc), (0x084, 0), (0x090, avail),
                              (0x094, 0), (0x0A0, used), (0x0A4, 0), (0x044, 1), (0x070, 1 | 2 | 8 | 4)):
            mmio(offset, value)        # reset, features, the queue, DRIVER_OK
        mem[avail:avail + 4096] = bytes(4096)
        mem[used:used + 4096] = bytes(4096)
        struct.pack_into("<IIQ", mem, hdr, 0, 0, 3)                  # read sector 3
        for i, (addr, length, flags, nxt) in enumerate([(hdr, 16, 1, 1), (data_address, 512, 1 | 2, 2),
                                                        (status, 1, 2, 0)]):
            struct.pack_into("<QIHH", mem, desc + 16 * i, addr, length, flags, nxt)
        struct.pack_into("<HH", mem, avail + 2, 1, 0)
        mmio(0x050, 0)
        return mmio(0x070) & 0x40 == 0                               # not NEEDS_RESET

    high = 4 * GIB + 0x10000
    dom.set_dirty_logging(True)
    dom.fetch_dirty()
    assert submit(high) and mem[status] == 0
    view = dom.guest_view(high, 512)
    landed = bytes(view)
    view.release()
    assert landed == b"\xa5" * 512
    assert high >> 12 in dom.fetch_dirty()                           # merged: the stub's window log
    assert submit(high) and high >> 12 not in dom.ram.fetch_dirty()  # the guest VM's own log: no
    dom.set_dirty_logging(False)
    for bad in (0xC0000000, 3 * GIB - 256, 4 * GIB + (64 << 20) - 256, 4 * GIB + (64 << 20)):
        assert not submit(bad), hex(bad)
    assert submit(high)                                              # a reset brings it back
