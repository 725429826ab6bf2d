"""Warming a pause's state paths before the pause (migrate/engine/warm.py): what it runs
covers every record type a pause writes and reads, it touches no real stream or domain,
and it runs where a downtime follows (a live save, a relocation's restore) and not
elsewhere. Not marked kvm: a fake domain."""
import pytest

from migrate.config import Convergence, DomainConfig, DomainStatus
from migrate.engine import file_chunks, restore, save_to_file, warm
from migrate.engine.fake import FakeDomain
from migrate.kvm import system
from migrate.stream import DONE, Channels, DeviceState, End, HvmState, StreamReader, StreamTruncated, Vm
from migrate.stream.hvm import CODECS


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("warming opened /dev/kvm")
    monkeypatch.setattr(system.Kvm, "__init__", refuse)


def test_the_sample_state_covers_every_record_type_of_both_vms():
    reader = StreamReader(raw_pages="bodies", hvm_bodies=True)
    reader.feed(warm._stream())
    seen, devices, last = {Vm.GUEST: set(), Vm.STUB: set()}, [], []
    while (record := reader.next_record()) is not DONE:
        if isinstance(record, HvmState):
            seen[record.vm].add(record.type)
        elif isinstance(record, DeviceState):
            devices.append(record.device)
        last = [*last[-1:], type(record)]
    assert seen == {Vm.GUEST: set(CODECS), Vm.STUB: set(CODECS)}
    assert devices == ["uart16550a", "virtio-blk"]
    assert last == [Channels, End]                  # a relocation's stream ends so
    warm.save_paths(runs=2)             # and both paths run through (each raises on a bad record)
    warm.restore_paths(runs=2)


def counting(monkeypatch, dom=None):
    calls = []
    monkeypatch.setattr(warm, "save_paths", lambda: calls.append(("save", dom.status if dom else None)))
    monkeypatch.setattr(warm, "restore_paths", lambda: calls.append("restore"))
    return calls


def test_a_live_save_warms_before_its_pause_and_an_offline_one_does_not(tmp_path, monkeypatch):
    dom = FakeDomain(DomainConfig("fake", "idle", 32 << 20, stub=True))
    calls = counting(monkeypatch, dom)
    dom.resume()
    save_to_file(dom, tmp_path / "live.hvm", live=True, convergence=Convergence(downtime=1.0))
    assert calls == [("save", DomainStatus.RUNNING)]        # while the guest still ran
    save_to_file(dom, tmp_path / "off.hvm")
    assert len(calls) == 1


def test_warming_never_fails_what_it_warms(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("no sample today")
    monkeypatch.setattr(warm, "_write", broken)
    monkeypatch.setattr(warm, "_read", broken)
    warm.save_paths()
    warm.restore_paths()
    assert [r.message for r in caplog.records] == [
        "warming a save's state paths failed: no sample today",
        "warming a restore's state paths failed: no sample today"]


def test_a_restore_warms_only_when_asked_and_once_its_domain_is_built(tmp_path, monkeypatch):
    dom = FakeDomain(DomainConfig("fake", "idle", 32 << 20, stub=True))
    dom.guest.write(3, b"warm")
    save_to_file(dom, tmp_path / "s.hvm")
    calls = counting(monkeypatch)
    built = []

    def make(config, **cpu):
        calls.append("built")
        built.append(FakeDomain(config, **cpu))
        return built[-1]
    restore(file_chunks(tmp_path / "s.hvm"), make_domain=make, fresh_stub=False)
    assert calls == ["built"]
    back, _ = restore(file_chunks(tmp_path / "s.hvm"), make_domain=make, fresh_stub=False, warm=True)
    assert calls == ["built", "built", "restore"]
    assert bytes(back.guest.page(3)[:4]) == b"warm"         # and the restore is the same


def test_no_collection_from_a_live_saves_pause_on_and_collections_again_after(tmp_path, monkeypatch):
    """The cyclic collector is off from a live save's pause to its end, on again after it
    (failing or not); an offline save leaves it alone."""
    import gc
    dom = FakeDomain(DomainConfig("fake", "idle", 32 << 20, stub=True))
    counting(monkeypatch, dom)
    seen = []
    pause, capture = dom.pause, dom.capture_records

    def watched_pause(**options):
        seen.append(("pause", gc.isenabled()))
        return pause(**options)

    def watched_capture():
        seen.append(("capture", gc.isenabled()))
        return capture()
    monkeypatch.setattr(dom, "pause", watched_pause)
    monkeypatch.setattr(dom, "capture_records", watched_capture)
    dom.resume()
    assert gc.isenabled()
    save_to_file(dom, tmp_path / "live.hvm", live=True, convergence=Convergence(downtime=1.0))
    assert seen == [("pause", False), ("capture", False)] and gc.isenabled()
    seen.clear()
    save_to_file(dom, tmp_path / "off.hvm")
    assert seen == [("pause", True), ("capture", True)] and gc.isenabled()
    dom.resume()

    def broken():
        raise RuntimeError("capture failed")
    monkeypatch.setattr(dom, "capture_records", broken)
    with pytest.raises(RuntimeError):
        save_to_file(dom, tmp_path / "bad.hvm", live=True, convergence=Convergence(downtime=1.0))
    assert gc.isenabled()


def test_no_collection_while_a_live_moves_state_is_read_and_applied(tmp_path, monkeypatch):
    """A relocation's receiver (warm) holds the collector off from the first state record
    to the end of the restore, and turns it on again after, failing or not."""
    import gc
    dom = FakeDomain(DomainConfig("fake", "idle", 32 << 20, stub=True))
    save_to_file(dom, tmp_path / "s.hvm")
    counting(monkeypatch)
    seen = []

    def make(config, **cpu):
        built = FakeDomain(config, **cpu)
        apply = built.finish_apply

        def watched(*args, **kwargs):
            seen.append(gc.isenabled())
            return apply(*args, **kwargs)
        built.finish_apply = watched
        return built
    restore(file_chunks(tmp_path / "s.hvm"), make_domain=make, fresh_stub=False, warm=True)
    restore(file_chunks(tmp_path / "s.hvm"), make_domain=make, fresh_stub=False)
    assert seen == [False, True] and gc.isenabled()
    data = (tmp_path / "s.hvm").read_bytes()
    with pytest.raises(StreamTruncated, match="input ended before END"):
        restore([data[:-40]], make_domain=make, fresh_stub=False, warm=True)      # cut before END
    assert gc.isenabled()


def test_a_callers_hold_outlasts_the_save(tmp_path):
    """With the caller's GcHold (a relocation's, released after its handoff), the save
    holds it from its pause on and leaves it held."""
    import gc
    import os
    from migrate.engine import save
    from migrate.engine.sinks import FileSink
    dom = FakeDomain(DomainConfig("fake", "idle", 32 << 20, stub=True))
    dom.resume()
    hold = warm.GcHold()
    fd = os.open(tmp_path / "s.hvm", os.O_WRONLY | os.O_CREAT, 0o600)
    sink = FileSink(fd)
    try:
        save(dom, sink, live=True, convergence=Convergence(downtime=1.0), gc_hold=hold)
        assert hold.held and not gc.isenabled()
    finally:
        hold.release()
        sink.close()
        os.close(fd)
    assert gc.isenabled()
