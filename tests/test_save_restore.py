"""Save/restore round trips of real guests through stream files, in process and
through domain processes; failures leave the source running and nothing behind."""
import io
import re
import time

import pytest

from migrate.domain import Domain, DomainConfig
from migrate.engine import RestoreError, SaveError, restore, save, save_to_file
from migrate.engine.files import file_chunks
from migrate.guest import check
from migrate.host import control
from migrate.host.control import ControlError
from migrate.stream import StreamError, StreamTruncated

pytestmark = pytest.mark.kvm




def config(name, workload, mib, args=(), **kw):
    return DomainConfig(name, workload, mib << 20, args=list(args) + [0] * (8 - len(args)), **kw)


def save_bytes(dom, **options):
    """The stream of a save, in memory (relayed out of the data plane)."""
    from migrate.engine.sinks import RelaySink
    out = io.BytesIO()
    sink = RelaySink(out.write, lambda: None)
    try:
        stats = save(dom, sink, **options)
    finally:
        sink.close()
    return out.getvalue(), stats


def restored(data, domains, chunk=1 << 20, **kw):
    dom, stats = restore((data[i:i + chunk] for i in range(0, len(data), chunk)), **kw)
    domains.append(dom)
    return dom, stats


def last_ledger(dom):
    line = [ln for ln in dom.console.lines() if ln.startswith("ledger ok")][-1]
    return [int(x) for x in re.search(r"gen=(\d+) .*ticks=(\d+)", line).groups()]


@pytest.mark.parametrize("compress", [None, 3])
def test_ledger_round_trip(domains, tmp_path, compress):
    src = Domain.boot(config("led", "ledger", 32, [5, 0]))
    domains.append(src)
    src.resume()
    src.console.wait_for("ledger ok gen=2 ", 20)
    path = tmp_path / "led.hvm"
    stats = save_to_file(src, path, compress=compress)
    assert src.status == "paused"
    assert stats.pages_total + stats.pages_holes == (32 << 8) + src.stub.ram.npages
    assert stats.pages_zero > 0 and stats.pages_holes > 0       # the stub's untouched RAM
    assert stats.pages_sent + stats.pages_zero == stats.pages_total
    assert stats.stream_bytes == path.stat().st_size
    hdr = check.ledger_header(src.memory)
    gen, ticks = last_ledger(src)
    src.destroy()

    dst, rstats = restore(file_chunks(path))
    domains.append(dst)
    assert rstats.pages_total == stats.pages_total
    bad, total = check.ledger_verify(dst.memory)
    assert bad == -1
    if hdr.phase == 0:       # every page holds gen: the host's sum is that generation's
        assert total == check.ledger_sum(hdr.seed, hdr.gen, hdr.npages)
    mark = dst.console.next_index
    dst.resume()
    m = dst.console.wait_for(r"ledger ok gen=(\d+) sum=([0-9a-f]+) ticks=(\d+)", 20, start=mark)
    new_gen = int(m.group(1))
    # no rollback: the first line is the pass the save caught, or the next one if that pass
    # had ended (passes counted) and its line may have gone out before the save
    ended = hdr.phase == 1 or hdr.passes > hdr.gen
    assert hdr.gen + hdr.phase <= new_gen <= hdr.gen + ended and new_gen >= gen, (new_gen, hdr)
    assert int(m.group(2), 16) == check.ledger_sum(hdr.seed, new_gen, hdr.npages)
    assert int(m.group(3)) > ticks
    dst.console.wait_for(rf"ledger ok gen={new_gen + 1} ", 20)
    assert not any("CORRUPT" in ln for ln in dst.console.lines())


def test_pagetouch_round_trip(domains):
    src = Domain.boot(config("pt", "pagetouch", 32))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"pagetouch pass=\d+", 20)
    data, _ = save_bytes(src)
    assert check.pagetouch_check(src.memory) == []
    src.destroy()
    dst, _ = restored(data, domains, chunk=4093)          # odd chunks: records split anywhere
    assert check.pagetouch_check(dst.memory) == []
    dst.resume()
    dst.console.wait_for(r"pagetouch pass=\d+", 10)
    time.sleep(0.3)
    dst.pause()
    assert check.pagetouch_check(dst.memory) == []


def test_idle_ticks_continue(domains):
    src = Domain.boot(config("idle", "idle", 16))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"idle ticks=200", 10)
    data, _ = save_bytes(src)
    src.destroy()
    dst, _ = restored(data, domains, name="idle2")
    assert dst.config.name == "idle2"
    dst.resume()
    m = dst.console.wait_for(r"idle ticks=(\d+)", 10)
    assert int(m.group(1)) >= 300


def test_checkpoint_save_keeps_source_running(domains):
    src = Domain.boot(config("ck", "ledger", 16, [3, 0]))
    domains.append(src)
    src.resume()
    src.console.wait_for("ledger ok gen=1 ", 20)
    data, _ = save_bytes(src)
    src.resume()                                         # what checkpoint mode does
    gen, _ = last_ledger(src)
    src.console.wait_for(rf"ledger ok gen={gen + 2} ", 20)
    dst, _ = restored(data, domains)
    dst.resume()
    dst.console.wait_for(r"ledger ok gen=\d+ ", 20)
    assert not any("CORRUPT" in ln for ln in dst.console.lines())


@pytest.mark.parametrize("workload,args", [("pagetouch", []), ("dirtier", [4 << 20, 20 << 20])])
def test_live_save_of_running_guest(domains, workload, args):
    src = Domain.boot(config("live", workload, 32, args))
    domains.append(src)
    src.resume()
    src.console.wait_for(rf"{workload} start", 10)
    seen = []
    data, stats = save_bytes(src, live=True, stats_cb=lambda s: seen.append(s.phase))
    assert stats.rounds >= 2 and "precopy" in seen and seen[-1] == "done"
    assert stats.pages_total + stats.pages_holes >= 32 << 8
    assert src.status == "paused"
    if workload == "pagetouch":
        assert check.pagetouch_check(src.memory) == []
    expected = bytes(src.memory)
    src.destroy()
    dst, _ = restored(data, domains)
    assert bytes(dst.memory) == expected                 # last copy of every page wins
    if workload == "pagetouch":
        assert check.pagetouch_check(dst.memory) == []
    dst.resume()
    dst.console.wait_for(rf"{workload} (pass|writes)=", 10)


def test_failed_save_leaves_domain_running_and_no_file(domains, tmp_path):
    src = Domain.boot(config("fail", "idle", 16))
    domains.append(src)
    src.resume()
    with pytest.raises(SaveError, match="does not exist"):
        save_to_file(src, tmp_path / "missing" / "x.hvm")
    assert src.status == "running"

    def boom(stats):
        if stats.pages_total:
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        save_to_file(src, tmp_path / "x.hvm", stats_cb=boom)
    assert src.status == "running"
    assert list(tmp_path.iterdir()) == [tmp_path / "missing"] or list(tmp_path.iterdir()) == []


def test_restore_rejects_bad_streams_and_leaves_nothing(domains, monkeypatch):
    src = Domain.boot(config("bad", "idle", 16))
    domains.append(src)
    data, _ = save_bytes(src)
    built = []

    def make(cfg, **cpu):
        dom = Domain(cfg, **cpu)
        built.append(dom)
        return dom
    cases = [
        (data[:len(data) // 2], StreamTruncated, "input ended before END"),
        (data[:-72], StreamTruncated, "input ended before END"),        # END missing
        (data[:5000] + bytes([data[5000] ^ 1]) + data[5001:], StreamError, "CRC-32 mismatch"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            restore([bad], make_domain=make)
    assert built and all(d.status == "destroyed" for d in built)


def _stream(records_fn, cpu=True):
    """A stream with a guest config, the guest's CPU records (baseline) and what
    ``records_fn`` adds, made by the stream writer."""
    from migrate.cpu import policy_for, this_host
    from migrate.engine.state import config_record, cpu_records
    from migrate.stream import MemoryLayout, StreamWriter, Vm
    w = StreamWriter()
    cfg = config("eng", "idle", 16, stub=False)
    out = [w.start(), w.record(config_record(cfg))]
    if cpu:
        out += [w.record(r) for r in cpu_records(policy_for("baseline", this_host()), Vm.GUEST)]
    out += records_fn(w, lambda space, n: MemoryLayout.flat(space, n), Vm)
    out.append(w.finish())
    return b"".join(out)


def test_restore_engine_level_errors(domains):
    from migrate.stream.pages import PAGE_ENTRY, BATCH_HEADER
    from migrate.stream.records import RecordType
    with pytest.raises(RestoreError, match="no vCPU state"):
        restore([_stream(lambda w, ML, Vm: [w.record(ML(Vm.GUEST, 4096)), w.record(ML(Vm.STUB, 0))])])
    with pytest.raises(RestoreError, match="version-2 stream lacks the CPU records .* of the guest"):
        restore([_stream(lambda w, ML, Vm: [w.record(ML(Vm.GUEST, 4096)), w.record(ML(Vm.STUB, 0))],
                         cpu=False)])
    with pytest.raises(RestoreError, match="MEMORY_LAYOUT has 8 pages"):
        restore([_stream(lambda w, ML, Vm: [w.record(ML(Vm.GUEST, 8)), w.record(ML(Vm.STUB, 0))])])
    with pytest.raises(RestoreError, match="carries a stub of 4 pages but DOMAIN_CONFIG says the domain has none"):
        restore([_stream(lambda w, ML, Vm: [w.record(ML(Vm.GUEST, 4096)), w.record(ML(Vm.STUB, 4))])])
    beyond = BATCH_HEADER.pack(0, 1) + PAGE_ENTRY.pack(4096, 1, 0)   # a zero page past the end
    with pytest.raises(StreamError, match=r"outside GUEST memory \(4096 pages in 1 ranges\)"):
        restore([_stream(lambda w, ML, Vm: [w.record(ML(Vm.GUEST, 4096)), w.record(ML(Vm.STUB, 0)),
                                            w.raw(RecordType.PAGE_DATA, beyond, 1)])])


# -- through domain processes --------------------------------------------------

def _cleanup(names):
    for name in names:
        try:
            with control.DomainClient(name) as c:
                c.call("destroy")
            control.wait_gone(name)
        except ControlError:
            pass


def test_domain_process_save_modes_and_restore(state_dir, tmp_path):
    names = ["dp1", "dp2", "dp3"]
    try:
        control.create_domain(config("dp1", "ledger", 16, [9, 0]))
        with control.DomainClient("dp1") as c:
            c.sock.settimeout(20)
        path = tmp_path / "dp1.hvm"
        progress = []
        reply = control.save_domain("dp1", path, mode="checkpoint", progress=progress.append)
        assert reply["status"] == "running" and path.exists() and progress
        assert not (tmp_path / "dp1.hvm.partial").exists()
        # a save to a missing directory: clear error, domain still running, no file
        with pytest.raises(ControlError, match="does not exist"):
            control.save_domain("dp1", tmp_path / "nodir" / "x.hvm")
        with control.DomainClient("dp1") as c:
            assert c.call("info")["status"] == "running"
        reply = control.save_domain("dp1", path, mode="live")
        assert reply["status"] == "destroyed" and reply["stats"]["rounds"] >= 2
        assert control.wait_gone("dp1")
        info = control.restore_domain(path, name="dp2")
        assert info["status"] == "running" and info["workload"] == "ledger"
        info = control.restore_domain(path, name="dp3", paused=True)
        assert info["status"] == "paused"
        deadline = time.monotonic() + 20
        with control.DomainClient("dp2") as c:
            while b"ledger ok" not in c.call("console")["data"] and time.monotonic() < deadline:
                time.sleep(0.2)
            text = c.call("console")["data"]
        assert b"ledger ok" in text and b"CORRUPT" not in text
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dp1.hvm", "hvm-state"]
    finally:
        _cleanup(names)


def test_restore_of_bad_file_leaves_nothing(state_dir, tmp_path):
    src = Domain.boot(config("bf", "idle", 16))
    try:
        data, _ = save_bytes(src)
    finally:
        src.destroy()
    bad = tmp_path / "bad.hvm"
    bad.write_bytes(data[:len(data) - 100])
    with pytest.raises(ControlError, match=r"failed to restore: input ended before END .*\(offset \d+, record \d+"):
        control.restore_domain(bad)
    assert not (state_dir / "bf").exists()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    bad.write_bytes(flipped)
    with pytest.raises(ControlError, match="failed to restore: .*(CRC-32 mismatch|digest)"):
        control.restore_domain(bad, name="bf2")
    assert not (state_dir / "bf2").exists()
    with pytest.raises(ControlError, match="No such file"):
        control.restore_domain(tmp_path / "nothing.hvm")
