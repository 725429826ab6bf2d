"""A domain in pure Python: the engine's contract (:mod:`.contract`) without KVM.

:class:`FakeDomain` is what a save and a restore need of a domain, made of anonymous
memory and software dirty tracking, so that the engine's paths (stop-and-copy, live
pre-copy, cancel, clean-up after a failure, restore) are tested, and fuzzed, on machines
without ``/dev/kvm`` (ARCHITECTURE.md, "Real parts": a synthetic domain for unit tests of
the engine and the stream). Its guest and stub are the same class, :class:`FakeSpace`, as
the real domain's are (:class:`migrate.domain.VmSpace`).

Nothing runs in it: its "guest" changes only through :meth:`FakeSpace.write`, which marks
the pages dirty (and as holding data), the way KVM's dirty log and a memfd's holes do for a
real guest. Its captured state is plain data of the real shapes (every record a stream
reader accepts), numbered so that a test can tell one capture from the next.
"""
from __future__ import annotations

import mmap
import threading
import time
from array import array

from ..config import DomainConfig, DomainError, DomainStatus
from ..cpu import BASELINE_MSRS, CpuPolicy, MsrEntry, baseline_cpuid
from ..domain import DomainState, guest_layout
from ..kvm import PlatformState, VcpuState
from ..memory import RamRange
from ..stream import Vm
from ..stream import hvm as layouts
from ..stub import StubState
from .state import apply_bodies, state_bodies

PAGE_SIZE = 4096
STUB_PAGES = 2048           # the fake stub's RAM, 8 MiB from pfn 0 (the real stub's size)
FAKE_TSC_KHZ = 2_000_000
STUB_DEVICES = [{"device": "fake-uart", "instance": 0, "version": 1, "min_version": 1,
                 "fields": {"lcr": 3, "scratch": b"\x01\x02"}}]


def fake_cpu() -> CpuPolicy:
    """The baseline CPU model as a fake domain reports it: no host probed."""
    return CpuPolicy("baseline", baseline_cpuid(), tuple(MsrEntry(i) for i in BASELINE_MSRS), FAKE_TSC_KHZ,
                     strict_tsc=False)


class FakeDirty:
    """A fetched dirty log: its pfns, ascending."""

    def __init__(self, pfns) -> None:
        self._pfns = sorted(pfns)

    def pfns(self) -> list[int]:
        return list(self._pfns)

    def __contains__(self, pfn: int) -> bool:
        return pfn in self._pfns


class FakeSpace:
    """One VM of a fake pair (a :class:`~.contract.VmPart`): ``layout`` is its RAM as
    ``(first_pfn, npages)`` ranges, each an anonymous mapping (zero until written, like a
    memfd's holes). ``share``: its part of a captured DomainState."""

    def __init__(self, vm: Vm, layout, cpu: CpuPolicy, share) -> None:
        self.vm, self.cpu, self.share = vm, cpu, share
        self.layout = tuple(layout)
        self.maps = [mmap.mmap(-1, npages * PAGE_SIZE) for _, npages in self.layout]
        self.views = [memoryview(m) for m in self.maps]
        self.lock = threading.Lock()
        self.logging = False
        self.dirty: set[int] = set()
        self.written: set[int] = set()      # pages that may hold data (data_ranges)
        self.calls: list[str] = []          # dirty-log calls, in order, for the tests

    # -- the contract ----------------------------------------------------------------
    def memory_ranges(self) -> list[RamRange]:
        return [RamRange(first, npages, view, -1, 0) for (first, npages), view in zip(self.layout, self.views)]

    def data_ranges(self) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        with self.lock:
            written = sorted(self.written)
        for pfn in written:
            if out and out[-1][1] == pfn:
                out[-1][1] += 1
            else:
                out.append([pfn, pfn + 1])
        return [tuple(r) for r in out]

    def set_dirty_logging(self, enabled: bool) -> None:
        self.calls.append(f"logging {'on' if enabled else 'off'}")
        with self.lock:
            if enabled != self.logging:     # as KVM: turning it on again keeps the log
                self.dirty.clear()
            self.logging = enabled

    def fetch_dirty(self, clear: bool = True) -> FakeDirty:
        self.calls.append("fetch" if clear else "peek")
        with self.lock:
            if not self.logging:
                raise DomainError("dirty logging is off")
            dirty = set(self.dirty)
            if clear:
                self.dirty.clear()
        return FakeDirty(dirty)

    def dirty_pfns(self) -> array:
        return array("Q", sorted(self.fetch_dirty(clear=False).pfns()))

    def clear_dirty(self, pfns) -> None:
        with self.lock:
            if not self.logging:
                raise DomainError("dirty logging is off")
            self.dirty.difference_update(pfns)

    def state_of(self, state: DomainState):
        return self.share(state)

    # -- the fake guest's side -----------------------------------------------------------
    def page(self, pfn: int) -> memoryview:
        """The bytes of page ``pfn``."""
        for (first, npages), view in zip(self.layout, self.views):
            if first <= pfn < first + npages:
                at = (pfn - first) * PAGE_SIZE
                return view[at:at + PAGE_SIZE]
        raise ValueError(f"pfn {pfn:#x} is not in this space's RAM")

    def write(self, pfn: int, data: bytes, offset: int = 0) -> None:
        """The guest writes ``data`` into page ``pfn`` at ``offset``: dirty, and data."""
        self.page(pfn)[offset:offset + len(data)] = data
        with self.lock:
            self.written.add(pfn)
            if self.logging:
                self.dirty.add(pfn)

    def close(self) -> None:
        for view in self.views:
            view.release()
        for m in self.maps:
            m.close()
        self.views, self.maps = [], []


class FakeDomain:
    """A fake pair (a :class:`~.contract.SaveableDomain` and a
    :class:`~.contract.RestorableDomain`); built like ``Domain(config, cpu=, stub_cpu=)``,
    paused. ``status`` moves as a real domain's does; ``pauses`` counts the pauses."""

    def __init__(self, config: DomainConfig, cpu: CpuPolicy | None = None,
                 stub_cpu: CpuPolicy | None = None) -> None:
        config.validate()
        self.config = config
        self.status = DomainStatus.PAUSED
        self.stub_build = "fake-stub" if config.stub else ""
        self.pause_skew = 0.0
        self.pauses = 0
        self.flush_pending = False          # pause(flush_later=True) until disk_flushed()
        self.flush_error: Exception | None = None   # what disk_flushed() then raises
        self.prepared = 0                   # prepare_capture() calls
        self.captures = 0
        self.applied: DomainState | None = None
        self.state_records: dict | None = None      # apply_state's, until finish_apply
        self.applied_early: bool | None = None      # how apply_state was last called
        self.fresh_stub: bool | None = None
        self.guest = FakeSpace(Vm.GUEST, guest_layout(config.memory), cpu or fake_cpu(), lambda s: s)
        self._parts = [self.guest]
        self.stub = None
        if config.stub:
            self.stub = FakeSpace(Vm.STUB, [(0, STUB_PAGES)], stub_cpu or fake_cpu(), lambda s: s.stub)
            self._parts.append(self.stub)

    def parts(self) -> list[FakeSpace]:
        return list(self._parts)

    # -- running ------------------------------------------------------------------------
    def pause(self, flush_later: bool = False, durable: bool = True) -> float:
        stopped = time.monotonic()
        if self.status is DomainStatus.RUNNING:
            self.status = DomainStatus.PAUSED
            self.pauses += 1
            self.flush_pending = flush_later and durable
        return stopped

    def disk_flushed(self) -> None:
        pending, self.flush_pending = self.flush_pending, False
        if pending and self.flush_error is not None:
            raise self.flush_error

    def resume(self) -> None:
        if not self.status.live:
            raise DomainError(f"domain is {self.status}")
        self.status = DomainStatus.RUNNING

    def destroy(self) -> None:
        if self.status is DomainStatus.DESTROYED:
            return
        self.status = DomainStatus.DESTROYED
        for part in self._parts:
            part.close()

    # -- state ----------------------------------------------------------------------------
    def prepare_capture(self) -> None:
        self.prepared += 1

    def capture(self) -> DomainState:
        """A state of the real shapes; capture number N sets each vCPU's RIP to N and
        fills its XSAVE area with N."""
        if self.status is DomainStatus.RUNNING:
            raise DomainError("capture needs a paused domain")
        self.captures += 1
        n = self.captures
        vcpus = [_vcpu(i, n, self.guest.cpu) for i in range(self.config.vcpus)]
        stub = None
        if self.stub is not None:
            stub = StubState(vcpus=[_vcpu(0, n, self.stub.cpu)], platform=_platform(),
                             devices=[dict(dev) for dev in STUB_DEVICES])
        return DomainState(config=self.config, vcpus=vcpus, platform=_platform(), stub=stub)

    def capture_records(self) -> dict:
        """capture(), as records (the Python encoding a KVM domain's C capture matches)."""
        state = self.capture()
        return {part.vm: state_bodies(part.state_of(state), part.vm) for part in self.parts()}

    def apply_state(self, records: dict, fresh_stub: bool = False, early: bool = False) -> bool:
        """Keeps the records (a fake has no CPU to set): finish_apply applies them."""
        if self.status is not DomainStatus.PAUSED or self.applied is not None:
            raise DomainError("state can only be applied to a domain that has not run")
        self.state_records, self.applied_early = records, early
        return True

    def finish_apply(self, devices: list[dict], fresh_stub: bool = False, stub_build: str = "") -> None:
        apply_bodies(self, self.config, self.state_records, devices, fresh_stub, stub_build)

    def apply(self, state: DomainState, fresh_stub: bool = False, stub_build: str = "") -> None:
        if self.status is not DomainStatus.PAUSED or self.applied is not None:
            raise DomainError("state can only be applied to a domain that has not run")
        if (state.stub is None) != (self.stub is None):
            raise DomainError("state and domain disagree on having a device-model stub")
        self.applied, self.fresh_stub = state, fresh_stub
        if stub_build and not fresh_stub:
            self.stub_build = stub_build


def _vcpu(vcpu_id: int, n: int, cpu: CpuPolicy) -> VcpuState:
    regs = dict(layouts.REGS.zero(), rip=n, rsp=0x8000 + vcpu_id)
    sregs = layouts.SREGS.zero()
    sregs["cr0"] = 0x80000011
    return VcpuState(vcpu_id=vcpu_id, regs=regs, sregs=sregs, xsave=bytes([n % 256]) * 4096,
                     xcrs=dict(layouts.XCRS.zero(), nr_xcrs=1), msrs={m.index: n for m in cpu.msrs},
                     lapic=bytes(1024), events=layouts.EVENTS.zero(), mp_state=0,
                     debugregs=layouts.DEBUGREGS.zero())


def _platform() -> PlatformState:
    pic = layouts.PIC.zero()
    return PlatformState(pic_master=pic["master"], pic_slave=pic["slave"], ioapic=layouts.IOAPIC.zero(),
                         pit=layouts.PIT.zero(), clock=dict(layouts.CLOCK.zero(), clock=1))


__all__ = ["FakeDirty", "FakeDomain", "FakeSpace", "fake_cpu"]
