"""Save a domain as one stream: stop-and-copy or live pre-copy (specs/stream-format.md,
"Ordering"; the records come from :mod:`migrate.engine.state`).

Order written: header, CREATOR, DOMAIN_CONFIG, the CPU records (guest, then stub),
MEMORY_LAYOUT (guest, stub); live, the
pre-copy page rounds (round 0 = every page, then the dirty pages of each later round);
then, paused, the guest's HVM context records, the stub's records, the last page round
(live: the pages dirtied since the last round; stop-and-copy: every page) and END. The
state goes before the last pages so that a reader at the other end of a link checks it
while those pages are still being sent (``flush``).

The engine talks to the domain through its contract (:mod:`.contract`,
:class:`~.contract.SaveableDomain`): ``config``, ``status``, ``pause()``, ``resume()``,
``prepare_capture()`` (called while the domain still runs, just before a live save's final
pause), ``capture_records()`` (the paused domain's state as records; a KVM domain
captures them in C), ``disk_flushed()`` (the disk's flush that ``pause(flush_later=True)``
started, waited for before END) and ``parts()``: the guest and, if it has one, the stub,
each a :class:`~.contract.VmPart` (its address space, CPU, memory ranges, data ranges, dirty log
and share of the captured state). ``pause()`` returns when the guest began to stop
(time.monotonic()), where the downtime starts, and ``pause_skew`` then says how long its
vCPUs took to stop, first to last.

The stub (specs/ioreq.md) travels in the same stream: its RAM as address space
Vm.STUB (its pages in the same rounds as the guest's, its own dirty log), its vCPU and
platform state as HvmState records with ``vm=Vm.STUB``, and its devices as
DEVICE_STATE records. The pair is captured *before* the last page round: capturing
asks the stub to write its device state, which changes stub memory, and the memory
image must match the stub vCPU state it is resumed with. Without a stub the stream
says so with a stub MEMORY_LAYOUT of 0 pages.
"""
from __future__ import annotations

import threading
import time
from array import array
from copy import deepcopy
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from ..config import DomainError, DomainStatus
from .. import trace
from ..dataplane import DataplaneError, RoundStats
from ..stream import PAGE_SIZE, Creator, MemoryLayout, StreamWriter, Vm
from .convergence import (
    Action, Convergence, OnTimeout, Reason, Round, VcpuThrottle, decide, final_lag,
)
from .sinks import Compression, Sink, memory_ranges
from .contract import SaveableDomain, VmPart
from . import warm
from .state import config_record, cpu_records

CREATOR_TEXT = "hvm-migrate 0.1.0 engine"


def disk_id_of(dom) -> dict | None:
    """DOMAIN_CONFIG's ``disk_id``: the identity of the disk image the domain has open (its
    block back end's descriptor), else of the file at its disk path; None without a disk,
    or on a filesystem that gives no birth time (a restore then needs --disk-map)."""
    from .compat import disk_identity      # compat imports files, which imports this module
    if dom.config.disk is None:
        return None
    fd = getattr(getattr(getattr(dom, "stub", None), "backend", None), "fd", -1)
    return disk_identity(fd if isinstance(fd, int) and fd >= 0 else dom.config.disk)


def net_id_of(dom) -> dict | None:
    """DOMAIN_CONFIG's ``net_id``: which interface of which boot of this host the NIC hung
    on (``engine.compat.interface_identity``); None without a NIC."""
    from .compat import interface_identity
    return interface_identity(dom.config.net["name"]) if dom.config.net else None


class SaveError(Exception):
    """A save could not complete; the message says why."""


class SaveCancelled(SaveError):
    pass


PAUSED_PHASES = ("state", "final", "done")     # SaveStats.phase from the pause on

CHUNK_PAGES = 16384         # the first data plane call of a save: 64 MiB
MIN_CHUNK, MAX_CHUNK = 1024, 1 << 20
CHUNK_SECONDS = 0.1         # later calls are sized to last about this long


class SaveTimeout(SaveCancelled):
    """Pre-copy did not converge within the timeout and on_timeout is cancel."""


@dataclass
class PageRound:
    """One page round of a save (round 0 first; a live save's last round is the paused one)."""
    index: int
    start: float                    # seconds from the save's start to the round's start
    start_bytes: int                # stream bytes written before it
    pages: int                      # pages it queued (holes not counted)
    throttle: int                   # vCPU throttle percent in force during it
    figures: dict                   # the data plane's figures (see _Saver.send_round)
    # pre-copy rounds only, filled in once the round is out:
    lag: float | None = None        # the receiver's lag behind it (after_round)
    estimate: float | None = None   # the downtime estimate made after it
    dirty_after: int | None = None  # pages dirtied during it: the next round's pages


@dataclass
class SaveStats:
    phase: str = "start"            # start, precopy, final, state, done
    round: int = 0
    rounds: int = 0                 # page rounds written (round 0 included)
    guest_bytes: int = 0            # guest RAM size
    pages_total: int = 0            # page entries written, resends included
    pages_sent: int = 0             # entries carrying data
    pages_zero: int = 0             # ZERO entries
    pages_holes: int = 0            # never-written pages, not sent (restore memory starts zeroed)
    pages_round: int = 0            # pages queued in the current round
    stream_bytes: int = 0
    seconds: float = 0.0
    synced: float = 0.0             # files.py: seconds from the start until the file was on disk
                                    # (fsynced; a save_to_file also renamed, its directory fsynced);
                                    # 0 for other sinks
    downtime: float = 0.0           # paused part of a live save (pause to END, on_end included)
    downtime_parts: dict = field(default_factory=dict)      # its seconds by step: stop, capture, state, pages, end
    pause_offset: float = 0.0       # seconds from the save's start to the (final) pause
    pause_skew: float = 0.0         # seconds from the first vCPU's stop to the last one's at that pause
    vcpus: int = 1                  # vCPUs of the guest
    start_time: float = 0.0         # time.monotonic() at the save's start, what the offsets count from
    downtime_estimate: float = 0.0  # the final round's estimate when pre-copy switched over
    estimate_lag: float = 0.0       # the part of it that is the receiver's lag (what the receiver says)
    downtime_target: float | None = None    # live: the target it was to stay under (seconds)
    over_target: bool = False       # live: the measured downtime exceeded the target
    reason: str = ""                # why pre-copy ended (convergence.py): small, downtime-target, ...
    throttle: int = 0               # vCPU throttle percent in force now
    history: list[PageRound] = field(default_factory=list)  # every page round so far

    @property
    def throughput(self) -> float:
        """Guest RAM bytes per second of the whole save."""
        return self.guest_bytes / self.seconds if self.seconds else 0.0

    # the per-round figures as lists, one entry per round of the kind each names
    @property
    def dirty_history(self) -> list[int]:
        """The dirty set each round after round 0 sent (a live save's)."""
        return [r.dirty_after for r in self.history if r.dirty_after is not None]

    @property
    def throttle_history(self) -> list[int]:
        """Throttle percent during each page round."""
        return [r.throttle for r in self.history]

    @property
    def estimate_history(self) -> list[float]:
        """The downtime estimate after each pre-copy round."""
        return [r.estimate for r in self.history if r.estimate is not None]

    @property
    def lag_history(self) -> list[float]:
        """The receiver's lag after each pre-copy round (after_round; 0 without)."""
        return [r.lag for r in self.history if r.lag is not None]

    @property
    def round_starts(self) -> list[tuple[float, int]]:
        """(seconds since start, stream bytes) at each round's start."""
        return [(r.start, r.start_bytes) for r in self.history]

    @property
    def round_pages(self) -> list[dict]:
        """Per round: the data plane's figures."""
        return [r.figures for r in self.history]

    def as_dict(self) -> dict:
        """Plain data, for progress messages and replies: the fields, the per-round lists
        (not the PageRound objects) and the throughput."""
        out = {f.name: deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "history"}
        for name in ("dirty_history", "throttle_history", "estimate_history", "lag_history",
                     "round_starts", "round_pages"):
            out[name] = deepcopy(getattr(self, name))
        out["throughput"] = self.throughput
        return out


class _Saver:
    def __init__(self, domain: SaveableDomain, sink: Sink, compression: Compression, stats_cb,
                 cancel: threading.Event | None, convergence: Convergence,
                 after_round: Callable[[], float | None] | None = None,
                 on_end: Callable[["SaveStats"], Any] | None = None, keep_dirty_logging: bool = False,
                 gc_hold: warm.GcHold | None = None, on_pause: Callable[["SaveStats"], Any] | None = None):
        self.domain, self.sink, self.compression = domain, sink, compression
        self.on_pause = on_pause
        self.stats_cb, self.cancel = stats_cb, cancel
        self.parts: dict[Vm, VmPart] = {part.vm: part for part in domain.parts()}   # guest first
        self.conv = convergence
        self.writer = StreamWriter()
        self.stats = SaveStats(guest_bytes=sum(r.npages for r in self.parts[Vm.GUEST].memory_ranges()) * PAGE_SIZE,
                               vcpus=domain.config.vcpus)
        self.t0 = self.stats.start_time = time.monotonic()
        self._last_cb = 0.0
        self.deadline: float | None = None      # pre-copy's timeout, as a monotonic time
        self.stop_lock = threading.Lock()       # _Stopper's look and the switch's end of the deadline
        self.stopped = False                    # _Stopper stopped the data plane
        self.in_dataplane = False               # a send_pages call runs (under stop_lock)
        self.pending: dict = {}                 # dirty pages fetched when pre-copy switched over
        self.after_round, self.on_end = after_round, on_end
        self.keep_dirty_logging = keep_dirty_logging
        self.throttle = VcpuThrottle(domain)
        self.chunk = CHUNK_PAGES                # pages per data plane call (see _send)
        self.gc = gc_hold or warm.GcHold()      # no collection from a live save's pause on

    # -- output -----------------------------------------------------------------
    def write(self, data: bytes, records: int = 1) -> None:
        self.sink.write(data, records)
        self.stats.stream_bytes = self.sink.bytes

    def check(self) -> None:
        """Raise if the save is cancelled, or past its timeout with on_timeout cancel
        (checked inside a round too: a round on a slow link may be long)."""
        if self.cancel is not None and self.cancel.is_set():
            raise SaveCancelled("save cancelled")
        if self.past_deadline():
            raise self.timed_out()

    def past_deadline(self) -> bool:
        """Pre-copy has run past its timeout, and on_timeout is cancel: it is to stop. The
        deadline is set when pre-copy starts and goes when it switches over (under
        ``stop_lock``), so this never stops a final round."""
        return self.deadline is not None and self.conv.on_timeout is OnTimeout.CANCEL and \
            time.monotonic() >= self.deadline

    def should_stop(self) -> bool:
        """What _Stopper stops the data plane for: a cancel, or :meth:`past_deadline` while
        a data plane call runs (``in_dataplane``). Between calls the saver's own checks see
        the deadline, and a round that has gone out may still switch (decide() looks at
        the dirty set before the timeout)."""
        return (self.cancel is not None and self.cancel.is_set()) or (self.in_dataplane and self.past_deadline())

    def timed_out(self, reason: Reason = Reason.TIMEOUT_CANCEL, dirty: int | None = None) -> SaveTimeout:
        """The error of pre-copy given up with on_timeout cancel, saying why (``reason``:
        the timeout, a stall, the round cap) and how far it got."""
        s = self.stats
        if reason is Reason.STALLED:
            why = "pre-copy is not converging: the dirty set stopped shrinking"
        elif reason is Reason.MAX_ROUNDS:
            why = f"pre-copy did not converge in {self.conv.max_rounds} rounds"
        else:
            why = f"pre-copy did not converge within {self.conv.timeout:g} s"
        if dirty is None:
            dirty = s.dirty_history[-1] if s.dirty_history else s.pages_round
        estimates = s.estimate_history
        estimate = (f"; estimated final round {estimates[-1] * 1000:.0f} ms, "
                    f"{self.conv.state_seconds * 1000:.0f} ms of it the fixed part") if estimates else ""
        return SaveTimeout(f"{why} ({s.rounds} rounds, last dirty set {dirty} pages{estimate}, target "
                           f"{self.conv.downtime * 1000:.0f} ms): cancelled (a higher --downtime-ms, "
                           f"--throttle, a --timeout to keep trying, or --on-timeout force can help)")

    def report(self, force: bool = False) -> None:
        self.check()
        now = time.monotonic()
        self.stats.seconds = now - self.t0
        if self.stats_cb is not None and (force or now - self._last_cb >= 0.1):
            self._last_cb = now
            self.stats_cb(self.stats)

    # -- pages --------------------------------------------------------------------
    def send_round(self, pfns_by_space: dict, paused: bool = False, holes: dict | None = None,
                   start: tuple[float, int] | None = None) -> None:
        """Send a round: ``pfns_by_space`` maps each space to its ascending pfns (an
        array('Q')). ``paused``: memory cannot change meanwhile, so the data plane may
        compress straight from it, and this is the last round. ``holes``: per space,
        pages never written (holes of the memory file): not sent at all, since a restore
        starts from zeroed memory; only counted. ``start``: where the round began (seconds
        since the save's start, stream bytes), if before this call: the last round begins
        at the pause and includes the state records."""
        holes = holes or {}
        self.stats.pages_holes += sum(len(p) for p in holes.values())
        self.stats.round = self.stats.rounds
        self.stats.pages_round = sum(len(p) for p in pfns_by_space.values())
        figures = {"zstd_batches": 0, "raw_batches": 0, "zstd_in": 0, "zstd_out": 0, "encode_seconds": 0.0,
                   "write_seconds": 0.0}
        at, nbytes = start or (time.monotonic() - self.t0, self.stats.stream_bytes)
        self.stats.history.append(PageRound(self.stats.rounds, at, nbytes, self.stats.pages_round,
                                            self.throttle.percent, figures))
        self._send(pfns_by_space, paused, figures)
        figures["compression"] = str(self.compression)
        figures["zstd_ratio"] = figures["zstd_out"] / figures["zstd_in"] if figures["zstd_in"] else None
        self.stats.stream_bytes = self.sink.bytes
        self.stats.rounds += 1

    def _send(self, pfns_by_space: dict, stable: bool, figures: dict) -> None:
        """A round's pages through the sink's data plane, every space's in pieces of
        ``self.chunk`` pages sized to last about CHUNK_SECONDS each, so that a cancel, a
        timeout and the progress reports are seen between them; the last piece ends the
        round (``stable``: the guest is paused, so this is the last round). A round that
        fits in one piece (a live save's last, for one) is one data plane call, its end
        included. While the guest runs, each piece's dirty bits are cleared just before it
        goes: a page written after the round's fetch but before its piece was read goes
        once, not again in the next round (what a guest writes over its memory in order
        while a round sweeps it)."""
        queue = [(space, pfns) for space, pfns in pfns_by_space.items() if len(pfns)]
        for space, pfns in queue:
            self.writer.check_pages(space, (pfns[0], pfns[-1]))
        at = 0                          # in queue[0]'s pfns
        while True:
            piece, room = {}, self.chunk
            while queue and room:
                space, pfns = queue[0]
                piece[space] = pfns[at:at + room]
                room -= len(piece[space])
                at += len(piece[space])
                if at == len(pfns):
                    queue.pop(0)
                    at = 0
            if not stable:
                for space, pfns in piece.items():
                    self.parts[space].clear_dirty(pfns)
            t = time.monotonic()
            with self.stop_lock:
                self.in_dataplane = True
            try:
                st = self.sink.send_pages(piece, self.compression, stable, end=not queue, final=stable)
            except DataplaneError as exc:
                self.check()                    # a cancel says so rather than the data plane's error
                raise SaveError(f"sending pages failed: {exc}") from None
            finally:
                with self.stop_lock:
                    self.in_dataplane = False
            took = time.monotonic() - t
            self._account(st, figures)
            sent = sum(len(pfns) for pfns in piece.values())
            if took > 0 and sent:           # an empty round's call (its syncs alone) says nothing of it
                self.chunk = max(MIN_CHUNK, min(MAX_CHUNK, int(sent * CHUNK_SECONDS / took)))
            self.report()
            if not queue:
                return

    def _account(self, st: RoundStats, figures: dict) -> None:
        s = self.stats
        s.pages_total += st.pages
        s.pages_zero += st.zero_pages
        s.pages_sent += st.data_pages
        s.stream_bytes = self.sink.bytes
        for key in figures:
            if key in ("zstd_batches", "raw_batches", "zstd_in", "zstd_out", "encode_seconds", "write_seconds"):
                figures[key] += getattr(st, key)

    def all_pages(self) -> tuple[dict, dict]:
        """Every page of each space, split into the ones that may hold data and the
        holes of the memory file (never written: zero, and never read here, so a
        save does not make the source allocate memory its guest never touched)."""
        data, holes = {}, {}
        for space, part in self.parts.items():
            present, absent = array("Q"), array("Q")
            found = sorted(part.data_ranges())
            for first_pfn, npages, *_ in part.memory_ranges():
                at, end = first_pfn, first_pfn + npages
                for first, last in found:
                    first, last = max(first, at), min(last, end)
                    if first < last:
                        absent.extend(range(at, first))
                        present.extend(range(first, last))
                        at = last
                absent.extend(range(at, end))
            data[space] = present
            if absent:
                holes[space] = absent
        return data, holes

    def dirty_pages(self) -> dict:
        """Per space, the pages dirtied since they were last cleared, their bits left set: a
        pre-copy round clears each piece just before it sends it (_send), and the final
        round, the guest paused, has nothing to track after it."""
        return {space: part.dirty_pfns() for space, part in self.parts.items()}

    # -- the save -----------------------------------------------------------------
    def run(self, live: bool) -> SaveStats:
        dom = self.domain
        self.sink.open(memory_ranges(self.parts), self.conv.max_bandwidth or 0.0)
        self.write(self.writer.start(), records=0)
        self.write(self.writer.record(Creator(CREATOR_TEXT)))
        self.write(self.writer.record(config_record(dom.config, dom.stub_build, disk_id_of(dom), net_id_of(dom))))
        for space, part in self.parts.items():
            for record in cpu_records(part.cpu, space):
                self.write(self.writer.record(record))
        for space in (Vm.GUEST, Vm.STUB):       # a domain without a stub says so: 0 pages
            part = self.parts.get(space)
            ranges = layout_of(part.memory_ranges()) if part is not None else ()
            self.write(self.writer.record(MemoryLayout(space, ranges)))
        if live:
            warm.save_paths()       # the pause writes the state: run its paths now (warm.py)
            self.precopy()
            self.throttle.stop()    # first: a throttled guest may be held paused, and not warmed
            self.stats.throttle = 0
            dom.prepare_capture()
        else:
            self.stats.reason = Reason.OFFLINE
        if live:
            self.gc.hold()          # released when save() returns or fails
        trace.mark("S pause asked")
        stopped = dom.pause(flush_later=True)   # may say when its guest began to stop
        mark = time.monotonic()
        paused_at = stopped if isinstance(stopped, float) and stopped <= mark else mark
        self.stats.pause_offset = paused_at - self.t0
        self.stats.pause_skew = dom.pause_skew
        last_round = (self.stats.pause_offset, self.stats.stream_bytes)
        mark = self._part("stop", paused_at)
        trace.mark("S paused")
        if self.on_pause is not None:
            self.on_pause(self.stats)
        state = dom.capture_records()       # before the last pages: see the module docstring
        mark = self._part("capture", mark)
        trace.mark("S captured")
        self.stats.phase = "state"
        for space in self.parts:
            hvm, devices = state[space]
            self.write(self.writer.hvm_bodies(hvm), records=len(hvm.types))
            if devices:
                self.write(self.writer.device_bodies(devices), records=len(devices))
        self.sink.flush()           # the reader can check these while the last pages go out
        mark = self._part("state", mark)
        trace.mark("S state sent")
        self.stats.phase = "final"
        if live:
            # not cleared: the guest is paused, and a later save starts with a clearing
            # fetch (precopy); clearing write-protects again, 0.2 ms of downtime here
            dirty = self._merge(self.pending, self.dirty_pages())
            trace.mark("S last dirty pages fetched")
            self.pending = {}       # the saver lives on in a cycle: hold no views of guest memory
            self.stats.history[-1].dirty_after = sum(len(p) for p in dirty.values())
            self.send_round(dirty, paused=True, start=last_round)
        else:
            data, holes = self.all_pages()
            self.send_round(data, paused=True, holes=holes, start=last_round)
        try:                        # the stream is not whole before the disk is durable
            dom.disk_flushed()
        except DomainError as exc:
            raise SaveError(f"the disk's flush failed: {exc}") from None
        self.sink.end(self.writer)
        self.stats.stream_bytes = self.sink.bytes
        self.stats.phase = "done"
        mark = self._part("pages", mark)
        trace.mark("S last pages and END sent")
        if self.on_end is not None:
            self.on_end(self.stats)
            self._part("end", mark)
            trace.mark("S STREAM_END sent")
        if live:
            self.stats.downtime = time.monotonic() - paused_at
            self.stats.downtime_target = self.conv.downtime
            self.stats.over_target = self.stats.downtime > self.conv.downtime
            if not self.keep_dirty_logging:         # after on_end: not on the downtime path
                for part in self.parts.values():
                    part.set_dirty_logging(False)
        self.report(force=True)
        return self.stats

    def _part(self, name: str, since: float) -> float:
        """Book the seconds since ``since`` as downtime part ``name``; returns now."""
        now = time.monotonic()
        self.stats.downtime_parts[name] = now - since
        return now

    def precopy(self) -> None:
        """Rounds until :func:`~.convergence.decide` says switch (or cancel: SaveTimeout)."""
        for part in self.parts.values():
            part.set_dirty_logging(True)
            part.fetch_dirty()           # start clean (logging may have been on): round 0 sends everything
        self.stats.phase = "precopy"
        start = time.monotonic()
        if self.conv.timeout is not None:
            self.deadline = start + self.conv.timeout
        data, holes = self.all_pages()
        self.send_round(data, holes=holes)
        # round 0's holes and zero pages cost next to nothing: time it per data page
        sent = Round(max(1, self.stats.pages_sent), self.stats.stream_bytes, time.monotonic() - start)
        lag = self._lag()
        if lag > sent.seconds and self.after_round is not None:
            # Round 0 went out faster than the receiver was made (its domain is built at
            # MEMORY_LAYOUT): that one-time cost is no lag of a later round. A second
            # SYNC, nothing sent between, measures what the receiver lags by now.
            lag = self._lag()
        rounds = [replace(sent, lag=lag)]
        while True:
            dirty = self.dirty_pages()     # each piece is cleared as it goes (_send)
            count = sum(len(pfns) for pfns in dirty.values())
            decision = decide(self.conv, self.stats.dirty_history + [count], rounds,
                              time.monotonic() - start, self.throttle.percent)
            self.stats.history[-1].estimate = decision.estimate
            if decision.action is Action.CANCEL:
                raise self.timed_out(decision.reason, count)
            if decision.action is Action.SWITCH:
                with self.stop_lock:     # from here the timeout cannot stop the data plane
                    if self.stopped:     # it has just done so: say why
                        self.check()
                    self.deadline = None
                self.stats.reason, self.stats.downtime_estimate = decision.reason, decision.estimate
                self.stats.estimate_lag = min(final_lag(count, rounds), decision.estimate)
                self.pending = dirty     # the final round sends these too
                return
            self.stats.history[-1].dirty_after = count
            self.throttle.set_percent(decision.throttle)
            self.stats.throttle = self.throttle.percent
            t, nbytes = time.monotonic(), self.stats.stream_bytes
            self.send_round(dirty)
            sent = Round(count, self.stats.stream_bytes - nbytes, time.monotonic() - t)
            rounds.append(replace(sent, lag=self._lag()))

    def _lag(self) -> float:
        """after_round's answer, the receiver's lag behind the round just sent (0 without)."""
        lag = self.after_round() if self.after_round is not None else None
        self.stats.history[-1].lag = lag or 0.0
        return lag or 0.0

    @staticmethod
    def _merge(first: dict, second: dict) -> dict:
        """Per space, the union of two dirty sets, in pfn order."""
        out = {}
        for space, pfns in second.items():
            before = first.get(space, ())
            out[space] = array("Q", sorted(set(before).union(pfns))) if len(before) else pfns
        return out


def layout_of(ranges) -> tuple[tuple[int, int], ...]:
    """MEMORY_LAYOUT's ranges for RAM ranges (first_pfn, npages, ...), ascending: touching
    ones merged."""
    out: list[list[int]] = []
    for first_pfn, npages, *_ in ranges:
        if out and out[-1][0] + out[-1][1] == first_pfn:
            out[-1][1] += npages
        else:
            out.append([first_pfn, npages])
    return tuple((first, n) for first, n in out)


def save(domain: SaveableDomain, sink: Sink, *, compress=Compression(), live: bool = False,
         stats_cb: Callable[[SaveStats], None] | None = None,
         convergence: Convergence | None = None, cancel: threading.Event | None = None,
         after_round: Callable[[], float | None] | None = None,
         on_end: Callable[[SaveStats], Any] | None = None, keep_dirty_logging: bool = False,
         gc_hold: warm.GcHold | None = None,
         on_pause: Callable[[SaveStats], Any] | None = None) -> SaveStats:
    """Write a complete stream of ``domain`` through ``sink`` (:mod:`.sinks`: a file, or a
    relocation's link), whose data plane sends the pages.

    ``compress``: how page data goes (:class:`~.sinks.Compression`, or what
    ``Compression.of`` takes: None is no compression, an int a zstd level; default auto).
    ``live``: pre-copy rounds while the guest runs, then pause for the last round; else
    pause first and copy once. Either way the domain is left *paused* on success (the
    caller resumes or destroys it). On any error, including ``cancel`` being set or
    ``stats_cb`` raising, dirty logging is turned off and a domain that was running when
    the save began is resumed; the error propagates. ``stats_cb`` gets the live
    :class:`SaveStats` about ten times a second and once at the end.
    ``convergence``: when pre-copy switches over, its pacing, timeout and throttle
    (:mod:`.convergence`); past a timeout with on_timeout cancel it raises
    :class:`SaveTimeout` (the domain keeps running).
    ``after_round()``: live only, called after each pre-copy round's pages have gone out;
    it returns the seconds the receiver lagged behind them (or None), which the downtime
    estimate adds: a relocation lets the destination catch up there (SYNC), so the pause
    covers only the last dirty pages and the state, not a backlog. ``on_end(stats)``: called once END has been
    written, still paused and before the engine tidies up (dirty logging off): a
    relocation tells the destination there. ``on_pause(stats)``: called once the domain
    is paused for the last round (a live save's ``stats.downtime_estimate`` is set by
    then): a relocation bounds its paused time from there. Any of these may raise to fail
    the save, with the same clean-up as any error. ``keep_dirty_logging``: a live save that succeeds leaves
    dirty logging on (its log still holding the final round's pages); the caller turns it
    off (``domain.set_dirty_logging(False)``) before it resumes the domain. For a caller
    that destroys the domain next (a relocation): switching it off costs slot updates,
    which would compete with the destination for the CPU during the downtime.
    A live save holds Python's cyclic collector off from its pause on
    (:class:`~.warm.GcHold`) and releases it when it returns or fails; with ``gc_hold``,
    it holds that one and leaves its release to the caller (a relocation, after its
    handoff).
    """
    if not domain.status.live:
        raise SaveError(f"domain is {domain.status}: nothing to save")
    was_running = domain.status is DomainStatus.RUNNING
    saver = _Saver(domain, sink, Compression.of(compress), stats_cb, cancel,
                   convergence or Convergence(), after_round, on_end, keep_dirty_logging, gc_hold,
                   on_pause)
    timed = live and saver.conv.timeout is not None and saver.conv.on_timeout is OnTimeout.CANCEL
    watcher = _Stopper(saver) if cancel is not None or timed else None
    try:
        return saver.run(live)
    except BaseException:
        saver.throttle.stop()           # leaves the vCPU running, as it found it
        sink.cancel()                   # no worker reads guest memory after this returns
        for part in saver.parts.values():
            try:
                part.set_dirty_logging(False)
            except Exception:       # the domain may be what failed; keep the first error
                pass
        if was_running and domain.status is DomainStatus.PAUSED:
            domain.resume()
        raise
    finally:
        if gc_hold is None:
            saver.gc.release()
        if watcher is not None:
            watcher.stop()


class _Stopper:
    """Stops the sink's data plane as soon as the save is cancelled or pre-copy has run
    past its timeout (on_timeout cancel: ``saver.should_stop()``), so that neither waits
    for a round, or round 0's first 64 MiB, to end on a slow link (the saver's check then
    says why: SaveCancelled, SaveTimeout). Looks every 0.1 s."""

    def __init__(self, saver: _Saver):
        self.saver = saver
        self.lock = threading.Lock()
        self.done = False
        self.thread = threading.Thread(target=self._watch, name="save-stop", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        cancel = self.saver.cancel or threading.Event()     # never set: a timeout alone
        while not self.done:
            cancel.wait(0.1)
            with self.lock, self.saver.stop_lock:
                if not self.done and self.saver.should_stop():
                    self.saver.stopped = True
                    self.saver.sink.cancel()
                    return

    def stop(self) -> None:
        """No cancel reaches the sink after this returns. It does not wait for the thread,
        which ends within 0.1 s: the end of a save is on a relocation's downtime path."""
        with self.lock:
            self.done = True
