"""Restore a domain from a stream, checking it as it goes (specs/stream-format.md,
"Reading" and "Ordering").

The domain is created when DOMAIN_CONFIG, the CPU records and the guest's MEMORY_LAYOUT
have arrived and agree: the domain is given the saved CPUs and refuses, before it builds
anything, a host that cannot run them (specs/cpu-models.md; a version-1 stream, which
describes no CPU, restores with this host's). Pages are written into its RAM as their
batches arrive (the last copy of a page wins): the reader hands each batch's body over
and the data plane (``migrate.dataplane.Target``) checks all of it, its data included,
before it writes the pages into the guest's memory file. HVM context records are
collected; the domain resumes only after END has been read and validated (counts and
digest), and the state is applied then, except that a relocation (``warm``) applies the
CPU state as soon as all of it is here, while its last pages are still on their way
(specs/stream-format.md, "Restore"). Any error destroys whatever was built and propagates:
StreamError for bad bytes, RestoreError for a valid stream this build cannot restore.

The stub: its MEMORY_LAYOUT must match the stub RAM the domain built, its pages go
into that RAM, its HvmState records (``vm=Vm.STUB``) and the DEVICE_STATE records are
collected, and at END the pair resumes one of two ways (specs/device-state.md): from
the stub's memory image as it is, or (``fresh_stub``) with a newly booted stub that
loads the device state. ``fresh_stub=None`` chooses by itself: a fresh stub when the
stream's ``stub_build`` is not this host's stub build.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

from .. import trace
from ..cpu import legacy_policy, this_host
from ..dataplane import DataplaneError, Range, Target
from ..domain import Domain, DomainConfig, DomainError, guest_layout
from ..stream import (
    DONE, NEED_DATA, Channels, CpuidPolicy, CpuModel, DeviceState, End, HvmState, MemoryLayout,
    MsrPolicy, RecordType, StreamError, StreamReader, Vm,
)
from ..stream.reader import BufferPool
from ..stream import Creator
from ..stream.pages import RawPageBatch
from ..stream import DomainConfig as ConfigRecord
from ..stub import abi, devstate, stub_build_id
from .contract import RestorableDomain, part_of
from . import warm
from .warm import GcHold
from .save import layout_of
from .state import CpuCollector, RestoreError, StateCollector, config_from_record, stub_build_of


CHANNELS_TIMEOUT = 60.0     # seconds the data channels may take to end after the main stream's END


@dataclass
class RestoreStats:
    stream_bytes: int = 0
    records: int = 0
    pages_total: int = 0
    pages_zero: int = 0
    guest_bytes: int = 0
    seconds: float = 0.0
    end_at: float = 0.0             # time.monotonic() when END had been read and checked
    applied_at: float = 0.0         # time.monotonic() when the state had been applied
    state_early: bool = False       # the CPU state went in before the pages were settled (apply_early)

    @property
    def throughput(self) -> float:
        return self.guest_bytes / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "throughput": self.throughput}


class _Placer:
    """Places a stream's page batches on threads of its own while the caller reads and
    checks the records that follow. Each of its threads takes the next batch and has the
    data plane check it and decompress it (in C, without the GIL, side by side with the
    other thread and the reader); the data plane then writes the checked batches into
    guest memory one at a time, in stream order, so the last copy of a page wins. At most
    DEPTH batches wait. A batch the data plane refuses fails the restore with the stream
    error at its position, raised at the next :meth:`put`, :meth:`settle` or :meth:`stop`;
    the batches after it are not placed (and their own errors do not hide it)."""
    DEPTH = 4
    WORKERS = 2             # the target's slots: the machines this runs on have two cores.
                            # One thread, and one per further slot from the first compressed
                            # batch on (raw ones cost more in a second thread than they gain)

    def __init__(self, target: Target, pool: BufferPool):
        self.target = target
        self.pool = pool                    # where a placed batch's buffer goes back
        self.work: queue.Queue = queue.Queue(self.DEPTH)
        self.error: StreamError | None = None
        self.error_lock = threading.Lock()
        self.zeros = [0] * target.slots     # zero pages placed (holes punched or cleared), by thread
        self.queued = 0                     # batches put so far: the next one's turn
        self.threads: list[threading.Thread] = []
        self._start()

    @property
    def zero(self) -> int:
        return sum(self.zeros)

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, args=(len(self.threads),),
                                  name=f"page-placer-{len(self.threads)}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _fail(self, error: StreamError) -> None:
        with self.error_lock:
            if self.error is None:
                self.error = error

    def _run(self, slot: int) -> None:
        while True:
            item = self.work.get()
            try:
                if item is None:
                    return
                self._place(slot, *item)
            finally:
                self.work.task_done()

    def _place(self, slot: int, turn: int, record_type, body, where: tuple) -> None:
        if self.error is not None:          # failed or stopped: pass the turn, check nothing
            self.target.fail(turn)
            return
        try:
            self.target.decode(slot, record_type, body)
        except Exception as exc:            # not only DataplaneError: the turn must pass on
            if self.target.fail(turn):
                reason = exc if isinstance(exc, DataplaneError) else repr(exc)
                self._fail(StreamError(f"{record_type.name} {reason}", *where))
            return
        try:
            placed = self.target.write(slot, turn)      # waits for the batches before it
        except DataplaneError as exc:                   # the first failure; its turn passed
            self._fail(StreamError(f"{record_type.name} {exc}", *where))
            return
        except Exception as exc:            # a bug: its turn may not have passed, so stop
            self.target.stop()
            self._fail(StreamError(f"{record_type.name} {exc!r}", *where))
            return
        if placed is not None:
            self.zeros[slot] += placed[1]
        try:
            self.pool.put(body)             # placed: the data plane holds no pointer into it
        except Exception as exc:            # a bug: fail the restore rather than this thread
            self.target.stop()
            self._fail(StreamError(f"{record_type.name} {exc!r}", *where))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, record_type, body: bytes, where: tuple) -> None:
        self._raise()
        if record_type is RecordType.PAGE_DATA_ZSTD and len(self.threads) < self.target.slots:
            self._start()       # decompression is worth a second thread; raw batches are not
        self.work.put((self.queued, record_type, body, where))
        self.queued += 1

    def settle(self) -> None:
        """Wait until every batch put so far is placed (before the target changes, and at
        the end of the stream)."""
        self.work.join()
        self._raise()

    def stop(self) -> None:
        """Place nothing more and end the threads (idempotent); the target is free after."""
        if any(thread.is_alive() for thread in self.threads):
            self._fail(StreamError("the restore stopped"))
            self.target.stop()
            for _ in self.threads:
                self.work.put(None)
            for thread in self.threads:
                thread.join()


class _Restorer:
    def __init__(self, name: str | None, make_domain: Callable[..., Any],
                 fresh_stub: bool | None, reader: StreamReader, channels=None, warm: bool = False):
        self.name, self.make_domain, self.fresh_stub = name, make_domain, fresh_stub
        self.warm = warm
        self.gc = GcHold()                  # held from a live move's first state record to the end
        self.reader = reader
        self.channels = channels            # a ChannelIntake: the pages on data channels
        self.channels_record: Channels | None = None
        self.config: DomainConfig | None = None
        self.stub_build = ""
        self.domain: RestorableDomain | None = None
        self.target: Target | None = Target(_Placer.WORKERS)    # where page batches go (the data plane)
        self.placer: _Placer | None = None          # its threads, from the first batch on
        self.collector = StateCollector()
        self.stub_collector = StateCollector("stub")
        self.cpus = CpuCollector()
        self.devices: list[dict] = []
        self.device_bytes = 0                # their size in the stub's binary form
        self.state_seen = 0                  # HVM context records collected
        self.state_tried = 0                 # state_seen at the last try of apply_early
        self.state_applied: int | None = None    # state_seen when apply_early applied them
        self.applied_records: dict | None = None    # and the records it applied
        self.stats = RestoreStats()
        self.end_seen = False
        self._dispatch = {
            ConfigRecord: self.on_config, MemoryLayout: self.on_layout, RawPageBatch: self.on_pages,
            HvmState: self.on_hvm, DeviceState: self.on_device_state, Creator: lambda r: None,
            CpuModel: self.cpus.add, CpuidPolicy: self.cpus.add, MsrPolicy: self.cpus.add,
            Channels: self.on_channels, End: self.on_end,
        }

    def handle(self, record) -> None:
        self.stats.records += 1
        self._dispatch[type(record)](record)

    def on_config(self, record: ConfigRecord) -> None:
        self.config = config_from_record(record, self.name)
        self.collector.max_vcpus = self.config.vcpus
        self.stub_build = stub_build_of(record)
        if self.fresh_stub is None:
            self.fresh_stub = self.config.stub and self.stub_build != stub_build_id()

    def on_layout(self, record: MemoryLayout) -> None:
        if record.space is Vm.STUB:
            if record.nr_pages == 0:
                if self.config.stub:
                    raise RestoreError("DOMAIN_CONFIG asks for a device-model stub but the stream "
                                       "carries none (stub memory of 0 pages)")
                return
            if not self.config.stub:
                raise RestoreError(f"stream carries a stub of {record.nr_pages} pages but "
                                   "DOMAIN_CONFIG says the domain has none")
            if self.domain is None:
                raise RestoreError("the stub's MEMORY_LAYOUT comes before the guest's")
            ranges = [Range(*r) for r in part_of(self.domain, Vm.STUB).memory_ranges()]
            if record.ranges != layout_of(ranges):
                raise RestoreError(f"stub MEMORY_LAYOUT is {_pfn_ranges(record.ranges)}; this build's stub "
                                   f"is {_pfn_ranges(layout_of(ranges))}")
            if self.fresh_stub:              # a fresh stub boots its own image: check and drop
                ranges = [Range(r.first_pfn, r.npages) for r in ranges]
            self.settle()
            self.target.set_space(Vm.STUB, ranges)
            return
        want = guest_layout(self.config.memory)
        if record.ranges != want:
            raise RestoreError(f"guest MEMORY_LAYOUT has {record.nr_pages} pages in "
                               f"{len(record.ranges)} ranges ({_ranges_text(record.ranges)}); "
                               f"DOMAIN_CONFIG's {self.config.memory >> 20} MiB are {_ranges_text(want)}")
        self.domain = self.make_domain(self.config, **self.cpu_policies())
        self.settle()
        self.target.set_space(Vm.GUEST, [Range(*r) for r in part_of(self.domain, Vm.GUEST).memory_ranges()])
        if self.channels is not None:
            self.channels.attach(self.domain, bool(self.fresh_stub))
        self.stats.guest_bytes = self.config.memory
        if self.warm:           # the downtime reads the state: run its paths now (warm.py)
            warm.restore_paths()

    def cpu_policies(self) -> dict:
        """The CPUs the domain is given: the stream's, or for a version-1 stream (it has
        none) this host's (``legacy_policy``)."""
        guest, stub = self.cpus.policy(Vm.GUEST), self.cpus.policy(Vm.STUB)
        if self.reader.header.version >= 2:
            if guest is None or (self.config.stub and stub is None):
                raise RestoreError("version-2 stream lacks the CPU records (CPU_MODEL, CPUID_POLICY, "
                                   f"MSR_POLICY) of the {'guest' if guest is None else 'stub'}")
            return {"cpu": guest, "stub_cpu": stub}
        legacy = legacy_policy(this_host())
        return {"cpu": legacy, "stub_cpu": legacy if self.config.stub else None}

    def on_pages(self, batch: RawPageBatch) -> None:
        """The data plane checks the batch's data (its length, the zstd frame) and places
        its pages, in C, on the placer's thread; a stub's pages are checked and dropped
        when the stub is fresh. With data channels every page comes on them: a batch in
        the main stream would be placed on another path, in no order with theirs (a copy
        of a page there could land after a newer one on a channel)."""
        if self.channels is not None:
            raise RestoreError("a page batch in the main stream of a relocation with data channels "
                               "(its pages come on the channels)")
        if self.placer is None:
            self.placer = _Placer(self.target, self.reader.pool)
        self.placer.put(batch.TYPE, batch.body, self.reader.last)
        self.stats.pages_total += batch.count

    def settle(self) -> None:
        """Every batch so far placed (or its error raised)."""
        if self.placer is not None:
            self.placer.settle()
            self.stats.pages_zero = self.placer.zero

    def on_hvm(self, record: HvmState) -> None:
        if self.warm:               # a live move's state: the source is paused from here on
            self.gc.hold()
        self.state_seen += 1
        if record.vm is Vm.GUEST:
            self.collector.add(record)
        elif not self.config.stub:
            raise RestoreError(f"stream carries stub context ({record.type.name}) for a "
                               "domain without a stub")
        else:
            self.stub_collector.add(record)

    def on_hvm_run(self, records: list) -> None:
        """:meth:`on_hvm` for each of ``records`` (StreamReader.take_run), counted."""
        self.stats.records += len(records)
        for record in records:
            self.on_hvm(record)

    def on_device_state(self, record: DeviceState) -> None:
        if not self.config.stub:
            raise RestoreError(f"stream carries device state {record.device}.{record.instance} "
                               "for a domain without a stub")
        device = {"device": record.device, "instance": record.instance,
                  "version": record.version, "min_version": record.min_version,
                  "fields": record.fields}
        self.device_bytes += devstate.binary_size(device)
        if len(self.devices) == devstate.MAX_RECORDS or \
                self.device_bytes > abi.STATE_SIZE - devstate.HEADER.size:
            raise RestoreError(f"device state {record.device}.{record.instance} does not fit the "
                               f"stub's state buffer ({devstate.MAX_RECORDS} records, "
                               f"{abi.STATE_SIZE} bytes)")
        self.devices.append(device)

    def on_channels(self, record: Channels) -> None:
        if self.channels is None:
            raise RestoreError("the stream's pages came on data channels, which this restore "
                               "did not receive (CHANNELS)")
        self.channels_record = record

    def on_end(self, record: End) -> None:
        trace.mark("R END read")
        if self.warm:       # the state came in END's chunk: still apply it before the last pages are in
            self.apply_early()
        self.settle()
        if self.channels is not None:
            if self.channels_record is None:
                raise RestoreError("data channels were opened but the stream has no CHANNELS")
            self.channels.finish(self.channels_record, CHANNELS_TIMEOUT)
        self.stats.end_at = time.monotonic()
        trace.mark("R pages all placed")
        self.stats.state_early = self.state_applied == self.state_seen
        records = self.applied_records if self.stats.state_early else self.state_records()
        if self.config.stub and not self.devices:
            raise RestoreError("stream carries a stub but no device state")
        if self.fresh_stub:
            self.release()                   # the stub boots afresh: no views of it held
        # Otherwise the data plane is released when the stream ends (restore()), after
        # on_applied and on_complete: closing channels joins their threads, which may take
        # milliseconds to be scheduled, and that is no part of the downtime. Nothing is
        # placed after a channel's FINAL sync, and every batch so far has been placed (settle).
        fresh = bool(self.fresh_stub)
        if not self.stats.state_early:
            self.domain.apply_state(records, fresh)
        self.domain.finish_apply(self.devices, fresh, self.stub_build)
        self.stats.applied_at = time.monotonic()
        trace.mark("R state applied")
        self.end_seen = True

    def state_records(self) -> dict:
        """Each VM's HVM context records, complete (else RestoreError, naming what lacks)."""
        records = {Vm.GUEST: self.collector.records(self.config, Vm.GUEST)}
        if self.config.stub:
            records[Vm.STUB] = self.stub_collector.records(self.config, Vm.STUB)
        return records

    def apply_early(self) -> None:
        """Between two chunks of a relocation's stream, and at END before the data
        channels' last pages are awaited (the state may come in END's chunk): once every
        HVM context record the restore requires is here, apply them
        (RestorableDomain.apply_state, ``early``), so that once the pages are in only
        :meth:`finish_apply` is left, off the downtime the last pages take to come. The domain has not run and resumes only after END; a record that
        comes after this (an optional one) has END apply the whole state again, and so has
        a failure here, which END then reports."""
        if self.domain is None or self.state_seen == self.state_tried:
            return
        self.state_tried = self.state_seen
        try:
            records = self.state_records()
        except RestoreError:
            return                      # not all here yet
        trace.mark("R state complete")
        try:
            if self.domain.apply_state(records, bool(self.fresh_stub), early=True):
                self.state_applied, self.applied_records = self.state_seen, records
                trace.mark("R state applied early")
        except (RestoreError, DomainError, OSError):     # OSError: KvmError
            pass                        # END applies it again, and fails with this error then

    def earlier_error(self, exc: StreamError | RestoreError) -> StreamError | None:
        """The error of a page batch before the record ``exc`` is about, when one failed
        too: the placer checks batches behind the reader, so the restore may fail on a
        later record first, and the stream's first error is the one to report. Waits for
        the batches put so far (at most _Placer.DEPTH and the two being placed)."""
        if self.placer is None:
            return None
        try:
            self.placer.settle()
        except StreamError as placed:
            if not isinstance(exc, StreamError) or (placed.offset is not None and exc.offset is not None
                                                    and placed.offset < exc.offset):
                return placed
        return None

    def release(self) -> None:
        """Drop the data plane and its views of guest and stub RAM (a live view keeps the
        mapping exported, and the domain could not unmap it on destroy); collections run
        again (every way out of a restore comes here)."""
        self.gc.release()
        if self.placer is not None:
            self.placer.stop()
            self.placer = None
        if self.target is not None:
            self.target.close()
            self.target = None
        if self.channels is not None:
            self.channels.close()
            self.channels = None

    def discard(self) -> None:
        self.release()
        if self.domain is not None:
            self.domain.destroy()


def _ranges_text(ranges) -> str:
    return ", ".join(f"{n} pages from pfn 0x{first:x}" for first, n in ranges) or "no pages"


def _closed_after(source):
    """A source with ``readinto`` (a FileChunks, whose files this restore owns) closed when
    the restore ends, read or not; any other left to its caller."""
    return contextlib.closing(source) if hasattr(source, "readinto") else contextlib.nullcontext()


def _intake(source, reader: StreamReader) -> Iterator[int]:
    """Bring the stream's bytes into ``reader``, yielding how many came each time: a
    source with ``readinto`` (a FileChunks) is read straight into the reader's buffers
    (StreamReader.read_from); any other is iterated and fed."""
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        for chunk in source:
            reader.feed(chunk)
            yield len(chunk)
        return
    while n := reader.read_from(readinto):
        yield n


def restore(source: Iterable[bytes], *, name: str | None = None,
            make_domain: Callable[..., Any] = Domain, fresh_stub: bool | None = None,
            progress: Callable[[RestoreStats], None] | None = None,
            on_applied: Callable[[Any, RestoreStats], None] | None = None,
            on_complete: Callable[[Any, RestoreStats], None] | None = None,
            channels=None, warm: bool = False) -> tuple[Any, RestoreStats]:
    """Build a domain from the stream whose bytes ``source`` yields; returns the domain,
    paused and never run, with its statistics. ``name`` overrides the saved name;
    ``make_domain(config, cpu=, stub_cpu=)`` builds the empty domain with those CPU
    policies (default: :class:`Domain`);
    ``fresh_stub``: True boots a new stub and loads the device state, False resumes the
    stub's memory image, None (default) decides by the stub build (module docstring).
    ``source`` may instead have a ``readinto`` method (a :class:`~.files.FileChunks`): it
    is then read straight into the reader's buffers, and closed at the end.
    ``progress(stats)`` is called after each chunk of ``source``; ``on_applied(domain,
    stats)`` once END has been read and checked and the state applied, before the end of
    ``source`` is seen (``stats.stream_bytes`` is then the stream's exact length: a chunk
    with bytes after END fails first). The restore can still fail after it, on bytes that
    follow in a later chunk. ``on_complete(domain, stats)`` once the whole stream has been
    read and checked, when nothing can fail the restore any more, before the data plane is
    released (a relocation's GO may resume the domain there, with no clean-up in its way).
    ``channels``: a :class:`~.channels.ChannelIntake`, when the
    stream's pages come on data channels (it is closed when the restore ends). ``warm``:
    the state comes inside a downtime (a relocation): once the domain is built, run the
    paths that read it on sample records first (:mod:`.warm`)."""
    with _closed_after(source):
        t0 = time.monotonic()
        reader = StreamReader(raw_pages="bodies", hvm_bodies=True, pool=BufferPool())
        work = _Restorer(name, make_domain, fresh_stub, reader, channels, warm)
        try:
            for n in _intake(source, reader):
                work.stats.stream_bytes += n
                while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
                    work.handle(record)
                    if record.__class__ is HvmState:        # the rest of its run, checked with it
                        work.on_hvm_run(reader.take_run())
                if warm and not work.end_seen:
                    work.apply_early()                      # while the last pages come
                if work.end_seen and on_applied is not None:
                    work.stats.seconds = time.monotonic() - t0
                    on_applied(work.domain, work.stats)
                    on_applied = None
                if progress is not None:
                    work.stats.seconds = time.monotonic() - t0
                    progress(work.stats)
            reader.eof()
            if not work.end_seen:       # eof() passes only after END; belt and braces
                raise RestoreError("stream ended without END")
        except BaseException as exc:
            first = work.earlier_error(exc) if isinstance(exc, (StreamError, RestoreError)) else None
            work.discard()
            if first is not None:
                raise first from None
            raise
        try:
            if on_complete is not None:     # from here on the domain is the caller's, failing or not
                work.stats.seconds = time.monotonic() - t0
                on_complete(work.domain, work.stats)
        finally:
            work.release()
        work.stats.seconds = time.monotonic() - t0
        return work.domain, work.stats


def _pfn_ranges(ranges, shown: int = 4) -> str:
    """MEMORY_LAYOUT ranges as words: "2048 pages from pfn 0x0" (the first ``shown``)."""
    words = [f"{n} pages from pfn {first:#x}" for first, n in ranges[:shown]]
    more = f" and {len(ranges) - shown} more ranges" if len(ranges) > shown else ""
    return (", ".join(words) or "no pages") + more
