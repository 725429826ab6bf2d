"""Save/restore of the pair: guest + device-model stub, with a disk, through
stream files: both stub resume paths, the automatic choice by stub build, a
live save while the stub does DMA, and a domain without a stub."""
import errno
import importlib
import os
import re
import threading
import time

import pytest

from migrate.config import DomainStatus
from migrate.domain import Domain, DomainConfig
from migrate.engine import SaveError, restore, save_to_file
from migrate.engine.files import file_chunks
from migrate.guest import check

pytestmark = pytest.mark.kvm
restore_mod = importlib.import_module("migrate.engine.restore")   # the module, not the function


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(2 << 20))
    return path


def ledger(domains, disk, pages=0, memory=32 << 20):
    dom = Domain.boot(DomainConfig("pair", "ledger", memory, args=[21, pages], disk=str(disk)))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for(r"ledger ok gen=2 .* journal=ok$", 20)
    return dom


def last_gen(dom) -> int:
    line = [ln for ln in dom.console.lines() if ln.startswith("ledger ok")][-1]
    return int(re.search(r"gen=(\d+)", line).group(1))


def check_continues(dst, gen_before):
    dst.resume()
    m = dst.console.wait_for(r"ledger ok gen=(\d+) sum=([0-9a-f]+) ticks=\d+ journal=ok$", 20)
    gen = int(m.group(1))
    assert gen >= gen_before
    hdr = check.ledger_header(dst.memory)
    assert int(m.group(2), 16) == check.ledger_sum(hdr.seed, gen, hdr.npages)
    dst.console.wait_for(rf"ledger ok gen={gen + 3} .* journal=ok$", 20)
    dst.send_input(b"after restore\n")
    dst.console.wait_for(r"^ledger input: after restore$", 10)
    assert not any("CORRUPT" in ln or "JOURNAL BAD" in ln for ln in dst.console.lines())


@pytest.mark.parametrize("fresh_stub", [False, True], ids=["stub-image", "fresh-stub"])
def test_pair_round_trip_through_a_file(domains, disk, tmp_path, fresh_stub):
    src = ledger(domains, disk)
    path = tmp_path / "pair.hvm"
    stats = save_to_file(src, path)
    gen = last_gen(src)
    src.destroy()
    assert stats.pages_total + stats.pages_holes == (32 << 8) + 2048   # guest + stub pages
    dst, _ = restore(file_chunks(path), fresh_stub=fresh_stub)
    domains.append(dst)
    assert check.ledger_verify(dst.memory)[0] == -1
    check_continues(dst, gen)


def test_stub_build_decides_the_path(domains, disk, tmp_path, monkeypatch):
    src = ledger(domains, disk)
    path = tmp_path / "pair.hvm"
    save_to_file(src, path)
    src.destroy()
    chosen = []
    real_finish = Domain.finish_apply

    def spy(self, devices, fresh_stub=False, stub_build=""):
        chosen.append(fresh_stub)
        return real_finish(self, devices, fresh_stub=fresh_stub, stub_build=stub_build)

    monkeypatch.setattr(Domain, "finish_apply", spy)
    dom, _ = restore(file_chunks(path))                     # same build: the image
    domains.append(dom)
    dom.destroy()
    monkeypatch.setattr(restore_mod, "stub_build_id", lambda: "another-build")
    dom, _ = restore(file_chunks(path))                     # other build: fresh stub
    domains.append(dom)
    assert chosen == [False, True]
    check_continues(dom, 0)


def test_live_save_while_the_stub_does_dma(domains, disk, tmp_path):
    src = ledger(domains, disk, memory=64 << 20)
    path = tmp_path / "live.hvm"
    stats = save_to_file(src, path, live=True)
    assert stats.rounds >= 2 and stats.downtime > 0
    gen = last_gen(src)
    src.destroy()
    dst, _ = restore(file_chunks(path))
    domains.append(dst)
    assert check.ledger_verify(dst.memory)[0] == -1
    check_continues(dst, gen)


@pytest.mark.parametrize("live, failing", [(False, "every"), (True, "every"), (True, "first")],
                         ids=["stop-and-copy", "live", "live-early-flush"])
def test_a_save_waits_for_the_disk_flush_of_its_pause(domains, disk, tmp_path, monkeypatch, live, failing):
    """The pause starts the disk's fdatasync on the back end's thread and the save goes on
    with the capture and the last pages; it waits for the flush before END. A flush that
    fails fails the save (no file left) and the guest runs on, also when only the flush
    prepare_capture starts before a live save's pause fails (the kernel tells one fdatasync
    only, and the pause's then succeeds); one that succeeds was made on that thread, and
    the file restores with the journal the guest checks."""
    src = ledger(domains, disk)
    real, flushes = os.fdatasync, []

    def fdatasync(fd):
        on_thread = threading.current_thread().name.startswith("disk-flush")
        flushes.append(threading.current_thread().name)
        if fail and on_thread and (failing == "every" or flushes.count(flushes[-1]) == 1):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    fail = True
    with pytest.raises(SaveError, match=r"the disk's flush failed: disk image .*disk.img: flush failed: "
                                        r"Input/output error"):
        save_to_file(src, tmp_path / "x.hvm", live=live)
    assert src.status is DomainStatus.RUNNING and list(tmp_path.glob("*.hvm*")) == []
    src.console.wait_for(rf"ledger ok gen={last_gen(src) + 2} .* journal=ok$", 20)
    fail, flushes[:] = False, []
    save_to_file(src, tmp_path / "ok.hvm", live=live)
    assert flushes and all(name.startswith("disk-flush") for name in flushes), flushes
    gen = last_gen(src)
    src.destroy()
    dst, _ = restore(file_chunks(tmp_path / "ok.hvm"))
    domains.append(dst)
    check_continues(dst, gen)


def test_a_pause_that_saves_nothing_does_not_flush_the_disk(domains, disk, monkeypatch):
    """A throttle's pause (``durable=False``) only holds the vCPUs back: no fdatasync on
    the pausing thread nor on the back end's flush thread (the guest's own FLUSH requests
    run on its vCPU threads), where a plain pause makes the disk durable on the pausing
    thread; the guest runs on after either, its journal intact."""
    src = ledger(domains, disk)
    real, by_caller = os.fdatasync, []
    caller = threading.current_thread()

    def fdatasync(fd):
        thread = threading.current_thread()
        if thread is caller or thread.name.startswith("disk-flush"):
            by_caller.append(thread.name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    src.pause(durable=False)
    src.stub.backend.flushed()                      # any flush it may have begun, done
    assert src.status is DomainStatus.PAUSED and by_caller == []
    src.resume()
    src.pause()
    assert by_caller == [caller.name]
    src.resume()
    src.console.wait_for(rf"ledger ok gen={last_gen(src) + 2} .* journal=ok$", 20)


def test_domain_without_stub_round_trips(domains, tmp_path):
    src = Domain.boot(DomainConfig("bare", "idle", 16 << 20, stub=False))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"idle ticks=100", 10)
    path = tmp_path / "bare.hvm"
    save_to_file(src, path)
    src.destroy()
    dst, _ = restore(file_chunks(path))
    domains.append(dst)
    assert dst.stub is None
    dst.resume()
    dst.console.wait_for(r"idle ticks=(2|3)00", 10)


def test_save_does_not_allocate_memory_the_guest_never_touched(domains, tmp_path):
    """Holes of the memfd are sent as ZERO entries without being read: a save must not
    make the source allocate the guest's untouched RAM (it would before)."""
    import os
    src = Domain.boot(DomainConfig("sparse", "idle", 256 << 20))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"idle ticks=100", 10)
    before = os.fstat(src.ram.memfd).st_blocks * 512
    assert before < 16 << 20                    # idle touched a few MiB at most
    stats = save_to_file(src, tmp_path / "sparse.hvm")
    after = os.fstat(src.ram.memfd).st_blocks * 512
    assert after - before < 1 << 20, (before, after)
    assert stats.pages_total + stats.pages_holes == (256 << 8) + 2048
    assert stats.pages_holes > 250 << 8 and stats.stream_bytes < 1 << 20    # holes cost nothing
    ranges = src.data_ranges()
    assert ranges and all(0 <= a < b <= 256 << 8 for a, b in ranges)
    src.destroy()
    dst, _ = restore(file_chunks(tmp_path / "sparse.hvm"))
    domains.append(dst)
    dst.resume()
    dst.console.wait_for(r"idle ticks=(2|3)00", 10)


def test_the_stubs_warm_up_save_is_done_before_the_pause(domains, disk):
    """prepare_capture returns once the stub's SAVE has run (on the calling thread, the one
    that will capture): a pause asked while it ran would wait for it with the guest already
    stopped."""
    dom = ledger(domains, disk)
    real, runs = dom.stub.warm_capture, []

    def slow_save():
        runs.append("begun")
        time.sleep(0.05)            # so that a return before it ends cannot pass by luck
        out = real()
        runs.append(threading.current_thread() is threading.main_thread())
        return out
    dom.stub.warm_capture = slow_save
    dom.prepare_capture()
    assert runs == ["begun", True]          # done, on this thread
    assert dom.status is DomainStatus.RUNNING
    dom.console.wait_for(rf"ledger ok gen={last_gen(dom) + 1} ", 20)      # and the guest runs on


def test_the_guest_runs_on_while_the_stubs_warm_up_save_runs(domains):
    """The warm-up SAVE holds up the stub only: the guest's vCPU goes on running meanwhile
    (before, the guest's vCPU thread ran it, and the guest stood still for it just before
    the pause, in no downtime). pagetouch adds one to the first byte of every page, pass
    after pass: the first page's byte moves on while a slow SAVE runs."""
    dom = Domain.boot(DomainConfig("touch", "pagetouch", 32 << 20))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for(r"^pagetouch pass=\d+ ", 20)
    real, seen = dom.stub.warm_capture, []

    def slow_save():
        first = dom.memory[check.WORKLOAD_BASE]
        deadline = time.monotonic() + 5
        while dom.memory[check.WORKLOAD_BASE] == first and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(dom.memory[check.WORKLOAD_BASE] != first)
        return real()
    dom.stub.warm_capture = slow_save
    dom.prepare_capture()
    assert seen == [True]
    assert dom.status is DomainStatus.RUNNING
