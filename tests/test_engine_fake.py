"""The engine's paths on a domain without KVM (migrate.engine.fake.FakeDomain): stop-and-copy,
live pre-copy, cancel and the clean-up after a failure, then restore. Not marked kvm: these
run on any machine, and KVM is made unavailable while they do."""
import importlib
import os
import random
import threading
import time

import pytest

from migrate.config import Convergence, DomainConfig, DomainError, DomainStatus
from migrate.dataplane import DataplaneError
from migrate.engine import (
    FileChunks, RestoreError, SaveCancelled, SaveError, SaveTimeout, file_chunks, restore, save, save_to_file,
    save_to_stream,
)
from migrate.engine.contract import MemorySpace, VmPart
from migrate.engine.fake import STUB_PAGES, FakeDomain
from migrate.engine.sinks import FileSink
from migrate.stream.reader import BufferPool
from migrate.kvm import system
from migrate.stream import (
    DONE, NEED_DATA, DeviceState, End, HvmState, MemoryLayout, PageBatch, RecordType, StreamError,
    StreamReader, StreamTruncated, StreamWriter, Vm,
)

MIB = 1 << 20


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    """Any use of /dev/kvm fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the engine opened /dev/kvm for a fake domain")
    monkeypatch.setattr(system.Kvm, "__init__", refuse)


def fake(stub=True, memory=32 * MIB, vcpus=1, running=True):
    dom = FakeDomain(DomainConfig("fake", "idle", memory, stub=stub, vcpus=vcpus))
    if running:
        dom.resume()
    return dom


def records(path):
    """Every record of the stream file ``path`` (its pages decoded)."""
    reader, out = StreamReader(), []
    for chunk in file_chunks(path):
        reader.feed(chunk)
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            out.append(record)
    reader.eof()
    return out


def pages_in(recs, space=Vm.GUEST):
    """pfn -> data of the last copy of each page of ``space`` the stream sends."""
    out = {}
    for record in recs:
        if isinstance(record, PageBatch) and record.space is space:
            out.update(record.pages)
    return out


def test_both_vms_of_the_pair_are_the_same_kind_of_part():
    dom = fake()
    guest, stub = dom.parts()
    assert (guest.vm, stub.vm) == (Vm.GUEST, Vm.STUB) and type(guest) is type(stub)
    assert all(isinstance(p, VmPart) and isinstance(p, MemorySpace) for p in dom.parts())
    assert [p.vm for p in fake(stub=False).parts()] == [Vm.GUEST]


def test_stop_and_copy_round_trip(tmp_path):
    src = fake(vcpus=2)
    for pfn in (0, 1, 7, 4000):
        src.guest.write(pfn, bytes([pfn % 251 + 1]) * 4096)
    src.guest.write(9, bytes(4096))                 # written, but zero: a ZERO entry
    src.stub.write(2, b"device model")
    path = tmp_path / "f.hvm"
    stats = save_to_file(src, path)
    assert src.status is DomainStatus.PAUSED and src.pauses == 1 and src.captures == 1
    assert src.prepared == 0                        # only a live save warms the capture up
    assert stats.reason == "offline" and stats.rounds == 1
    assert stats.pages_sent == 5 and stats.pages_zero == 1        # guest 4 + stub 1; the zero page
    assert stats.pages_holes == (32 * MIB >> 12) - 5 + STUB_PAGES - 1     # never written: not sent
    recs = records(path)
    layouts = {r.space: r.ranges for r in recs if isinstance(r, MemoryLayout)}
    assert layouts == {Vm.GUEST: ((0, 8192),), Vm.STUB: ((0, STUB_PAGES),)}
    sent = pages_in(recs)
    assert sorted(sent) == [0, 1, 7, 9, 4000] and sent[7] == bytes([8]) * 4096
    assert pages_in(recs, Vm.STUB)[2][:12] == b"device model"
    hvm = [r for r in recs if isinstance(r, HvmState)]
    assert {(r.vm, r.vcpu_id) for r in hvm if r.vcpu_id is not None} == {(Vm.GUEST, 0), (Vm.GUEST, 1), (Vm.STUB, 0)}
    assert [r.device for r in recs if isinstance(r, DeviceState)] == ["fake-uart"]

    dst, rstats = restore(file_chunks(path), make_domain=FakeDomain, fresh_stub=False)
    assert rstats.guest_bytes == 32 * MIB and dst.fresh_stub is False
    for pfn in range(8192):
        assert dst.guest.page(pfn) == src.guest.page(pfn), pfn
    assert dst.stub.page(2) == src.stub.page(2)
    assert [v.regs["rip"] for v in dst.applied.vcpus] == [1, 1]         # capture 1, both vCPUs
    assert dst.applied.stub.devices[0]["fields"] == {"lcr": 3, "scratch": b"\x01\x02"}


def test_a_file_restore_reads_its_batches_into_buffers_used_again(tmp_path, monkeypatch):
    """A restore reads a file's page batches straight into a pool's buffers (FileChunks,
    StreamReader.read_from) and uses each again once its batch is placed: more batches
    than are ever in flight take fewer buffers, and every page placed is the file's."""
    src = fake(memory=64 * MIB)
    rng = random.Random(5)
    for pfn in range(12000):                        # 12 batches of up to 1024 pages
        src.guest.write(pfn, rng.randbytes(4096))
    path = tmp_path / "p.hvm"
    save_to_file(src, path, compress="none")
    taken = []
    real_get = BufferPool.get

    def get(self, size):
        view = real_get(self, size)
        taken.append(view.obj)
        return view
    monkeypatch.setattr(BufferPool, "get", get)
    dst, _ = restore(file_chunks(path), make_domain=FakeDomain, fresh_stub=False)
    for pfn in range(12000):
        assert dst.guest.page(pfn) == src.guest.page(pfn), pfn
    assert len(taken) >= 11                         # the batches gathered apart
    assert len({id(buf) for buf in taken}) <= 8     # the queue, the placer and the reader's


def test_file_chunks_reads_its_files_in_turn_and_closes_them(tmp_path):
    """FileChunks reads its paths and descriptors one after the other, whatever the
    reads' sizes; it closes each at its end, and close() closes what was not read;
    a path that cannot be opened is a RestoreError when it is reached."""
    (tmp_path / "a").write_bytes(b"0123456789")
    (tmp_path / "b").write_bytes(b"abcdef")
    fd = os.open(tmp_path / "b", os.O_RDONLY)
    chunks = FileChunks([tmp_path / "a", fd])
    got, buf = b"", bytearray(4)
    while n := chunks.readinto(memoryview(buf)):
        got += buf[:n]
    assert got == b"0123456789abcdef"
    with pytest.raises(OSError):
        os.fstat(fd)                                # closed at its end
    fd = os.open(tmp_path / "b", os.O_RDONLY)
    FileChunks([tmp_path / "a", fd]).close()
    with pytest.raises(OSError):
        os.fstat(fd)                                # never read, closed all the same
    assert b"".join(bytes(c) for c in FileChunks([tmp_path / "a"], 3)) == b"0123456789"
    with pytest.raises(RestoreError, match="cannot read"):
        FileChunks([tmp_path / "missing"]).readinto(memoryview(buf))
    directory = os.open(tmp_path, os.O_RDONLY)      # a descriptor no file object takes
    with pytest.raises(RestoreError, match="cannot read descriptor"):
        FileChunks([directory]).readinto(memoryview(buf))
    with pytest.raises(OSError):
        os.fstat(directory)                         # closed all the same
    fds = [os.open(tmp_path / name, os.O_RDONLY) for name in "ab"]
    chunks = iter(FileChunks(fds, 3))
    assert bytes(next(chunks)) == b"012"
    chunks.close()                                  # a reader that stopped early
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_failed_restore_closes_the_files_it_was_given(tmp_path):
    """hvm restore's stream: a head the launcher read, then the rest (FileChunks of two
    descriptors); a restore that fails on the head closes both, the second never read."""
    (tmp_path / "head").write_bytes(b"not a stream at all")
    (tmp_path / "rest").write_bytes(b"")
    fds = [os.open(tmp_path / name, os.O_RDONLY) for name in ("head", "rest")]
    with pytest.raises(StreamError, match="bad magic"):
        restore(FileChunks(fds), make_domain=FakeDomain)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_relocation_with_channels_refuses_pages_in_its_main_stream(tmp_path):
    """Every page of a relocation with data channels comes on them; a page batch in the
    main stream (the independent reader allows it) would be placed on another path, in
    no order with the channels' copies: refused."""
    class Intake:                   # channels received: nothing comes on them here
        attached = closed = False

        def attach(self, domain, fresh_stub):
            self.attached = True

        def close(self):
            self.closed = True

    src = fake()
    src.guest.write(3, b"\x03" * 4096)
    save_to_file(src, tmp_path / "m.hvm")
    intake = Intake()
    with pytest.raises(RestoreError, match="^a page batch in the main stream of a relocation with data channels"):
        restore(file_chunks(tmp_path / "m.hvm"), make_domain=FakeDomain, fresh_stub=False, channels=intake)
    assert intake.attached and intake.closed


def test_a_domain_without_stub_says_so(tmp_path):
    src = fake(stub=False)
    src.guest.write(3, b"x")
    save_to_file(src, tmp_path / "n.hvm")
    recs = records(tmp_path / "n.hvm")
    assert [(r.space, r.nr_pages) for r in recs if isinstance(r, MemoryLayout)] == [(Vm.GUEST, 8192), (Vm.STUB, 0)]
    assert not [r for r in recs if isinstance(r, DeviceState) or getattr(r, "vm", None) is Vm.STUB]
    dst, _ = restore(file_chunks(tmp_path / "n.hvm"), make_domain=FakeDomain)
    assert dst.stub is None and bytes(dst.guest.page(3)[:1]) == b"x"


def shrinking_writer(dom, counts, cancel_at=None, cancel=None):
    """An after_round that writes counts[k] pages after pre-copy round k (fresh data each
    time, so a stale copy shows) and reports no lag; sets ``cancel`` after round cancel_at."""
    calls = []

    def after_round():
        k = len(calls)
        calls.append(k)
        for i in range(counts[k] if k < len(counts) else 0):
            dom.guest.write(100 + i, f"round {k} page {i}".encode())
        if cancel is not None and k == cancel_at:
            cancel.set()
        return 0.0
    return after_round, calls


def test_live_precopy_resends_what_the_guest_dirtied(tmp_path):
    src = fake()
    for pfn in range(100, 140):
        src.guest.write(pfn, b"before")
    after_round, calls = shrinking_writer(src, [40, 30, 20, 2])
    conv = Convergence(small_pages=5, downtime=0.0)         # switch only on a small dirty set
    stats = save_to_file(src, tmp_path / "l.hvm", live=True, convergence=conv, after_round=after_round)
    assert len(calls) == 4 and stats.rounds == 5 and stats.reason == "small"
    assert stats.dirty_history == [40, 30, 20, 2]           # the rounds after round 0, the last paused
    assert len(stats.history) == 5 and [r.index for r in stats.history] == [0, 1, 2, 3, 4]
    assert stats.history[-1].lag is None and stats.history[0].lag == 0.0
    assert len(stats.estimate_history) == 4 and len(stats.lag_history) == 4
    assert stats.as_dict()["dirty_history"] == [40, 30, 20, 2]
    assert stats.as_dict()["round_starts"] == [(r.start, r.start_bytes) for r in stats.history]
    assert src.prepared == 1 and src.status is DomainStatus.PAUSED
    assert src.guest.calls[0] == "logging on" and src.guest.calls[-1] == "logging off"
    assert src.stub.calls[-1] == "logging off"
    dst, _ = restore(file_chunks(tmp_path / "l.hvm"), make_domain=FakeDomain, fresh_stub=False)
    for pfn in range(100, 140):         # the last copy of each page, the one at the pause
        assert dst.guest.page(pfn) == src.guest.page(pfn), pfn
    assert bytes(dst.guest.page(100)[:14]) == b"round 3 page 0"


def test_a_round_clears_each_piece_just_before_it_goes(tmp_path):
    """Pre-copy fetches a round's pages without clearing them and clears each piece as it
    sends it: a page the guest writes between the fetch and its piece goes once (with that
    write), not again in the next round; a page written after its piece went goes again."""
    src = fake()
    for pfn in range(100, 140):
        src.guest.write(pfn, b"before")
    rounds = []

    def after_round():
        rounds.append(None)
        if len(rounds) == 1:            # after round 0: round 1 sends 100..109
            for pfn in range(100, 110):
                src.guest.write(pfn, b"round 1")
        elif len(rounds) == 2:          # round 1 went: 101 again
            src.guest.write(101, b"after round 1")
        return 0.0

    fetch = src.guest.fetch_dirty

    def fetch_then_write(clear=True):
        dirty = fetch(clear)
        if len(rounds) == 1:            # round 1's pages fetched, not yet sent: 100 written
            src.guest.write(100, b"late in round 1")
        return dirty

    src.guest.fetch_dirty = fetch_then_write
    conv = Convergence(small_pages=5, downtime=0.0)
    stats = save_to_file(src, tmp_path / "p.hvm", live=True, convergence=conv, after_round=after_round)
    assert stats.dirty_history == [10, 1] and stats.reason == "small"     # not 100 again
    dst, _ = restore(file_chunks(tmp_path / "p.hvm"), make_domain=FakeDomain, fresh_stub=False)
    assert bytes(dst.guest.page(100)[:15]) == b"late in round 1"
    assert bytes(dst.guest.page(101)[:13]) == b"after round 1"
    for pfn in range(100, 140):
        assert dst.guest.page(pfn) == src.guest.page(pfn), pfn


def test_a_receiver_still_being_built_after_round_0_is_asked_again(tmp_path):
    """Round 0 of a nearly empty guest goes out before the destination's domain exists: the
    SYNC after it waits for that build, which no later round pays. A lag longer than round
    0 itself is measured again (a second SYNC, nothing sent between), and the downtime
    estimate adds the second; a lag no longer than the round is taken as it is."""
    lags = [0.5, 0.002]

    def after_round():
        return lags.pop(0) if lags else 0.001

    conv = Convergence(small_pages=5, downtime=0.0)
    stats = save_to_file(fake(), tmp_path / "b.hvm", live=True, convergence=conv, after_round=after_round)
    assert lags == [] and stats.history[0].lag == 0.002
    assert stats.reason == "small" and stats.downtime_estimate < 0.1      # 0.5 s not in it

    lags = [0.0, 0.5]
    stats = save_to_file(fake(), tmp_path / "c.hvm", live=True, convergence=conv, after_round=after_round)
    assert lags == [0.5] and stats.history[0].lag == 0.0


def test_live_save_may_keep_dirty_logging_on(tmp_path):
    src = fake()
    save_to_file(src, tmp_path / "k.hvm", live=True, keep_dirty_logging=True)
    assert all(p.calls[-1] != "logging off" for p in src.parts())
    src.guest.write(5, b"after")
    assert 5 in src.guest.fetch_dirty()


def assert_clean(dom, tmp_path, status=DomainStatus.RUNNING):
    """After a failed save: the domain as it was, dirty logging off, no file left."""
    assert dom.status is status
    assert all(p.calls[-1] == "logging off" for p in dom.parts()), [p.calls[-3:] for p in dom.parts()]
    assert os.listdir(tmp_path) == []


def test_cancel_during_precopy_resumes_the_guest(tmp_path):
    src = fake()
    cancel = threading.Event()
    after_round, calls = shrinking_writer(src, [40, 30, 20, 10], cancel_at=1, cancel=cancel)
    with pytest.raises(SaveCancelled):
        save_to_file(src, tmp_path / "c.hvm", live=True, cancel=cancel, after_round=after_round,
                     convergence=Convergence(small_pages=5, downtime=0.0))
    assert len(calls) == 2 and src.pauses == 0 and src.captures == 0
    assert_clean(src, tmp_path)


def test_timeout_cancel_leaves_the_guest_running(tmp_path):
    src = fake()
    after_round, _ = shrinking_writer(src, [50] * 40)         # never converges
    with pytest.raises(SaveTimeout, match="not converging: the dirty set stopped shrinking"):
        save_to_file(src, tmp_path / "t.hvm", live=True, after_round=after_round,
                     convergence=Convergence(small_pages=5, downtime=0.0))
    assert_clean(src, tmp_path)


def test_a_timeout_stops_round_0_on_a_slow_link(tmp_path):
    """--timeout with --on-timeout cancel bounds pre-copy even inside round 0, whose first
    data plane call is 64 MiB: at 4 MB/s that call alone took 8.4 s past a 1 s timeout.
    The data plane is now stopped at the deadline."""
    src = fake()
    rnd = random.Random(7)
    for pfn in range(8192):                         # 32 MiB of data: 8 s at 4 MB/s
        src.guest.write(pfn, rnd.randbytes(4096))
    t0 = time.monotonic()
    with pytest.raises(SaveTimeout, match=r"^pre-copy did not converge within 1 s \(0 rounds"):
        save_to_file(src, tmp_path / "t.hvm", live=True, compress="none",
                     convergence=Convergence(max_bandwidth=4e6, timeout=1.0))
    assert time.monotonic() - t0 < 2.5
    assert_clean(src, tmp_path)


def test_a_deadline_that_passes_between_data_plane_calls_still_lets_a_round_switch(tmp_path):
    """The timeout stops the data plane only while it sends: a deadline that passes while
    the receiver places a round (after_round) leaves the save to decide, and a small dirty
    set still switches (decide() looks at it before the timeout). Stopping the data plane
    there turned a move about to end into a timeout."""
    src = fake()
    src.guest.write(100, b"x" * 4096)

    def slow_receiver():
        time.sleep(1.3)                     # the receiver places round 0 past the 1 s deadline
        src.guest.write(101, b"y" * 4096)  # one page dirtied meanwhile: a small set
        return 0.0

    stats = save_to_file(src, tmp_path / "d.hvm", live=True, after_round=slow_receiver,
                         convergence=Convergence(timeout=1.0))
    assert stats.reason == "small" and stats.rounds == 2


def test_a_failing_progress_callback_fails_the_save_and_cleans_up(tmp_path):
    src = fake()
    src.guest.write(1, b"x")

    def stats_cb(stats):
        if stats.phase == "precopy":
            raise SaveError("the client went away")
    with pytest.raises(SaveError, match="the client went away"):
        save_to_file(src, tmp_path / "p.hvm", live=True, stats_cb=stats_cb)
    assert_clean(src, tmp_path)


def test_a_failure_after_the_pause_resumes_a_running_guest(tmp_path):
    src = fake()

    def on_end(stats):
        assert src.status is DomainStatus.PAUSED
        raise SaveError("the destination refused")
    with pytest.raises(SaveError, match="the destination refused"):
        save_to_file(src, tmp_path / "e.hvm", live=True, on_end=on_end)
    assert src.pauses == 1
    assert_clean(src, tmp_path)


@pytest.mark.parametrize("live", [False, True])
def test_the_stream_ends_only_once_the_disk_is_flushed(tmp_path, live):
    """The pause's disk flush runs beside the capture and the last pages; the save waits
    for it before END, and a failed flush fails the save with no END written, the guest
    resumed."""
    src = fake()
    src.flush_error = DomainError("disk image d.img: flush failed: Input/output error")
    fd = os.open(tmp_path / "s", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(SaveError, match="the disk's flush failed: disk image d.img: flush failed"):
            save_to_stream(src, fd, live=live)
    finally:
        os.close(fd)
    assert src.status is DomainStatus.RUNNING and not src.flush_pending
    with pytest.raises(StreamTruncated, match="input ended before END"):
        records(tmp_path / "s")
    src.flush_error = None
    save_to_file(src, tmp_path / "ok.hvm", live=live)
    assert not src.flush_pending and isinstance(records(tmp_path / "ok.hvm")[-1], End)


def test_a_paused_guest_stays_paused_after_a_failure(tmp_path):
    src = fake(running=False)
    with pytest.raises(SaveError, match="refused"):
        save_to_file(src, tmp_path / "q.hvm", on_end=lambda stats: (_ for _ in ()).throw(SaveError("refused")))
    assert src.status is DomainStatus.PAUSED and os.listdir(tmp_path) == []


def test_a_broken_output_fails_the_save_and_resumes(tmp_path):
    src = fake()
    for pfn in range(64):
        src.guest.write(pfn, os.urandom(4096))
    read, write = os.pipe()
    os.close(read)                      # nobody reads: every write fails (EPIPE)
    try:
        with pytest.raises((SaveError, DataplaneError), match="Broken pipe"):
            save_to_stream(src, write, live=True)
    finally:
        os.close(write)
    assert src.status is DomainStatus.RUNNING
    assert all(p.calls[-1] == "logging off" for p in src.parts())


def test_nothing_to_save_from_a_destroyed_domain(tmp_path):
    src = fake()
    src.destroy()
    sink = FileSink(os.open(tmp_path / "d", os.O_WRONLY | os.O_CREAT))
    try:
        with pytest.raises(SaveError, match="domain is destroyed: nothing to save"):
            save(src, sink)
    finally:
        os.close(sink.fd)


def test_restore_refuses_a_stream_cut_short_and_destroys_what_it_built(tmp_path):
    src = fake()
    src.guest.write(1, b"x")
    save_to_file(src, tmp_path / "s.hvm")
    data = (tmp_path / "s.hvm").read_bytes()
    built = []

    def make(config, **cpu):
        built.append(FakeDomain(config, **cpu))
        return built[-1]
    with pytest.raises(StreamTruncated):
        restore([data[:-100]], make_domain=make, fresh_stub=False)
    assert built and built[0].status is DomainStatus.DESTROYED


def test_restore_hands_over_the_domain_once_the_whole_stream_is_checked(tmp_path):
    """on_applied comes at END; on_complete only once nothing follows END (a relocation
    takes GO there, so nothing may fail the restore after it), and from then on the domain
    is the caller's: an error in on_complete does not destroy it."""
    src = fake()
    src.guest.write(1, b"x")
    save_to_file(src, tmp_path / "s.hvm")
    data = (tmp_path / "s.hvm").read_bytes()
    built, calls = [], []

    def make(config, **cpu):
        built.append(FakeDomain(config, **cpu))
        return built[-1]

    def seen(what):
        return lambda dom, stats: calls.append((what, dom.status, stats.end_at > 0))
    dom, _ = restore([data[:-64], data[-64:]], make_domain=make, fresh_stub=False,
                     on_applied=seen("applied"), on_complete=seen("complete"))
    assert calls == [("applied", DomainStatus.PAUSED, True), ("complete", DomainStatus.PAUSED, True)]
    assert dom.guest.views[0][4096:4097] == b"x"

    calls.clear()                               # bytes after END: applied, never complete
    with pytest.raises(Exception, match="after END"):
        restore([data, b"\0" * 64], make_domain=make, fresh_stub=False,
                on_applied=seen("applied"), on_complete=seen("complete"))
    assert [c[0] for c in calls] == ["applied"] and built[-1].status is DomainStatus.DESTROYED

    def fails(dom, stats):
        raise OSError("no room for config.json")
    with pytest.raises(OSError):
        restore([data], make_domain=make, fresh_stub=False, on_complete=fails)
    assert built[-1].status is DomainStatus.PAUSED       # the caller's to destroy


def test_the_throttle_lets_go_before_the_capture_is_prepared(tmp_path, monkeypatch):
    """A throttled guest is held paused for most of each period: prepare_capture must come
    after the throttle stops, or it finds the guest paused and warms nothing."""
    save_mod = importlib.import_module("migrate.engine.save")     # the module, not the function
    real = save_mod._Saver.precopy

    def throttled(self):
        real(self)
        self.throttle.set_percent(99)       # as a stalled pre-copy with --throttle ends
        time.sleep(0.12)
    monkeypatch.setattr(save_mod._Saver, "precopy", throttled)
    src = fake()
    seen = []
    monkeypatch.setattr(src, "prepare_capture", lambda: seen.append(src.status))
    save_to_file(src, tmp_path / "t.hvm", live=True, convergence=Convergence(downtime=1.0))
    assert seen == [DomainStatus.RUNNING]


def restream(path, extra, out_path):
    """The stream file ``path`` rewritten to ``out_path`` with ``extra`` records, each
    (record type, body, pages), after its page batches (before the vCPU state)."""
    writer = StreamWriter()
    parts, pending = [writer.start()], list(extra)
    for record in records(path):
        if isinstance(record, HvmState) and pending:
            parts += [writer.raw(rtype, body, pages) for rtype, body, pages in pending]
            pending = []
        if not isinstance(record, End):
            parts.append(writer.record(record))
    parts.append(writer.finish())
    out_path.write_bytes(b"".join(parts))
    return out_path


def text_pages(tag: int, count: int) -> list[bytes]:
    """Pages that zstd shrinks but takes a while over (a batch of them decodes slowly)."""
    return [(b"%d:%d " % (tag, i) * 1024)[:4096] for i in range(count)]


def test_compressed_batches_decoded_side_by_side_keep_the_last_copy(tmp_path):
    """The restore decodes batches on two threads: a slow compressed batch of 1024 pages,
    then a one-page raw batch over one of them, twenty times over; the raw copy, the later
    one, must win every time although it decodes far sooner."""
    from migrate.stream.pages import encode_batch
    src = fake(stub=False, memory=128 * MIB)
    save_to_file(src, tmp_path / "plain.hvm")
    extra = []
    for i in range(20):
        first = 8192 + 1024 * i
        extra.append((RecordType.PAGE_DATA_ZSTD,
                      encode_batch(Vm.GUEST, list(zip(range(first, first + 1024), text_pages(i, 1024))), True), 1024))
        later = (b"later copy %d" % i).ljust(4096, b"\0")
        extra.append((RecordType.PAGE_DATA, encode_batch(Vm.GUEST, [(first + 7, later)], False), 1))
    path = restream(tmp_path / "plain.hvm", extra, tmp_path / "raced.hvm")
    assert sum(isinstance(r, PageBatch) and r.compressed for r in records(path)) == 20
    dst, stats = restore(file_chunks(path), make_domain=FakeDomain)
    for i in range(20):
        first = 8192 + 1024 * i
        assert bytes(dst.guest.page(first + 7)[:16]).rstrip(b"\0") == b"later copy %d" % i, i
        assert bytes(dst.guest.page(first + 8)) == text_pages(i, 1024)[8]
    dst.destroy()


def test_the_first_bad_batch_is_the_error_even_when_a_later_one_fails_sooner(tmp_path):
    """A compressed batch whose frame fails only at its end (a bad checksum, found after
    decompressing it all), then a small batch with a bad entry, which two threads check
    first: the restore fails on the first, where it is in the stream."""
    import zstandard
    from migrate.stream.pages import BATCH_HEADER, PAGE_ENTRY
    src = fake(stub=False, memory=64 * MIB)
    save_to_file(src, tmp_path / "plain.hvm")
    data = b"".join(text_pages(1, 1024))
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)
    frame = frame[:-1] + bytes([frame[-1] ^ 1])
    bad_late = BATCH_HEADER.pack(Vm.GUEST, 1024) + b"".join(PAGE_ENTRY.pack(pfn, 2, 0) for pfn in range(1024)) + frame
    bad_soon = BATCH_HEADER.pack(Vm.GUEST, 1) + PAGE_ENTRY.pack(5, 9, 0)
    path = restream(tmp_path / "plain.hvm", [(RecordType.PAGE_DATA_ZSTD, bad_late, 1024),
                                             (RecordType.PAGE_DATA, bad_soon, 1)], tmp_path / "bad.hvm")
    at = next(i for i, r in enumerate(records(tmp_path / "plain.hvm")) if isinstance(r, HvmState))
    with pytest.raises(StreamError) as err:
        restore(file_chunks(path), make_domain=FakeDomain)
    assert "PAGE_DATA_ZSTD bad zstd frame" in err.value.msg, err.value
    assert (err.value.record_index, err.value.record_type) == (at, RecordType.PAGE_DATA_ZSTD), err.value


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def saved(tmp_path) -> tuple[FakeDomain, bytes]:
    src = fake()
    src.guest.write(1, b"x")
    save_to_file(src, tmp_path / "s.hvm")
    return src, (tmp_path / "s.hvm").read_bytes()


def test_a_relocation_applies_the_state_while_its_last_pages_come(tmp_path):
    """A relocation's receiver (warm) applies the CPU state as soon as all of it has come,
    between two chunks, before the pages after it and END, or, with the state and END in
    one chunk, at END before it settles the pages; the domain is still handed over only
    after END. Without warm, END applies it, after the pages."""
    src, data = saved(tmp_path)
    for chunks in (pieces(data, 256), [data]):
        dom, stats = restore(chunks, make_domain=FakeDomain, fresh_stub=False, warm=True)
        assert stats.state_early and dom.applied_early is True
        assert dom.applied.vcpus[0].regs["rip"] == 1 and dom.guest.views[0][4096:4097] == b"x"
    dom, stats = restore(pieces(data, 256), make_domain=FakeDomain, fresh_stub=False, warm=False)
    assert not stats.state_early and dom.applied_early is False and dom.applied.vcpus[0].regs["rip"] == 1


def test_state_that_comes_after_the_early_apply_is_applied_at_end(tmp_path):
    """An optional record (VCPU_PDPTRS) after the state the restore requires: applied
    again between chunks if it comes in one of its own, else by END's early apply; never
    lost."""
    _, data = saved(tmp_path)
    (tmp_path / "plain.hvm").write_bytes(data)
    late = HvmState(RecordType.VCPU_PDPTRS, Vm.GUEST, 0, {"flags": 1, "pdptrs": [1, 2, 3, 4]})
    writer, parts = StreamWriter(), []
    parts.append(writer.start())
    for record in records(tmp_path / "plain.hvm"):
        if isinstance(record, End):
            at = len(b"".join(parts))
            parts.append(writer.record(late))
            end = len(b"".join(parts))
            parts.append(writer.finish())
        else:
            parts.append(writer.record(record))
    data = b"".join(parts)
    for chunks in ([*pieces(data[:at], 256), data[at:]], [*pieces(data[:at], 256), data[at:end], data[end:]]):
        dom, stats = restore(chunks, make_domain=FakeDomain, fresh_stub=False, warm=True)
        assert stats.state_early
        assert dom.applied.vcpus[0].pdptrs == {"flags": 1, "pdptrs": [1, 2, 3, 4]}


def test_a_domain_may_refuse_or_fail_the_early_apply(tmp_path, monkeypatch):
    """apply_state(early=True) returning False (applying would touch guest memory) or
    failing leaves the state to END, which reports the failure if it recurs."""
    _, data = saved(tmp_path)
    calls = []

    def declines(self, records, fresh_stub=False, early=False):
        calls.append(early)
        return False if early else real(self, records, fresh_stub, early)
    real = FakeDomain.apply_state
    monkeypatch.setattr(FakeDomain, "apply_state", declines)
    dom, stats = restore(pieces(data, 256), make_domain=FakeDomain, fresh_stub=False, warm=True)
    assert calls == [True, False] and not stats.state_early and dom.applied.vcpus[0].regs["rip"] == 1

    def fails(self, records, fresh_stub=False, early=False):
        calls.append(early)
        raise DomainError("KVM refuses MSR 0x1234")
    calls.clear()
    built = []
    monkeypatch.setattr(FakeDomain, "apply_state", fails)
    with pytest.raises(DomainError, match="MSR 0x1234"):
        restore(pieces(data, 256), make_domain=lambda c, **k: built.append(FakeDomain(c, **k)) or built[-1],
                fresh_stub=False, warm=True)
    assert calls == [True, False] and built[0].status is DomainStatus.DESTROYED
