"""What the engine moves, as types: the contract between the engine and a domain.

A domain is a pair of VMs, the guest and its stub (specs/ioreq.md); to the engine each is a
:class:`VmPart` of the same kind: an address space of the stream (``vm``), the CPU it was
given, its memory (a :class:`MemorySpace`: RAM ranges, the ranges that may hold data, and
a dirty log) and its share of the domain's captured state (:class:`VmState`: vCPUs, the
platform's devices, and the device-model records, which only the stub has). A domain
without a stub has one part. Nothing in the engine asks which part is which beyond
``vm``, the address space its records and pages carry.

:class:`SaveableDomain` is what :func:`migrate.engine.save` needs of a domain,
:class:`RestorableDomain` what :func:`migrate.engine.restore` builds and fills. Two
implementations exist: :class:`migrate.domain.Domain` (KVM) and
:class:`migrate.engine.fake.FakeDomain` (pure Python, for the tests of the engine's paths
on machines without ``/dev/kvm``).
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

from ..config import DomainConfig, DomainStatus
from ..cpu import CpuPolicy
from ..memory import RamRange
from ..stream import Vm


class DirtyPages(Protocol):
    """The pages written since the last fetch (a :class:`migrate.kvm.DirtyLog`)."""

    def pfns(self) -> Iterable[int]:
        """Their pfns, ascending."""


@runtime_checkable
class MemorySpace(Protocol):
    """The RAM of one VM as the engine reads and writes it."""

    def memory_ranges(self) -> list[RamRange]:
        """Its RAM ranges, ascending and apart (:class:`migrate.memory.RamRange`): their
        pfns make MEMORY_LAYOUT's ranges, and the data plane reads or writes their pages."""

    def data_ranges(self) -> list[tuple[int, int]]:
        """``[first, end)`` pfn ranges that may hold data: the rest was never written (a
        save does not send it; a restore starts from zeroed memory)."""

    def set_dirty_logging(self, enabled: bool) -> None:
        """Start or stop tracking writes (a live save's pre-copy)."""

    def fetch_dirty(self, clear: bool = True) -> DirtyPages:
        """Fetch the pages written since they were last cleared, over all ranges, by
        anyone (a VM whose memory another VM can write merges that VM's log in), and clear
        them. ``clear=False``: leave them set for :meth:`clear_dirty`; a space that cannot
        clear later clears now."""

    def dirty_pfns(self):
        """What ``fetch_dirty(clear=False).pfns()`` gives, as an ``array('Q')``, made as
        cheaply as the space can (a live save's last fetch is in its downtime)."""

    def clear_dirty(self, pfns) -> None:
        """Clear the pages ``pfns`` (ascending) of a fetch with ``clear=False``, just
        before the caller reads them: a write from now on shows at the next fetch, one
        before it was read with them."""


class VmState(Protocol):
    """One VM's share of a captured domain state: what its records carry."""
    vcpus: list             # migrate.kvm.VcpuState, by vCPU id
    platform: object        # migrate.kvm.PlatformState

    @property
    def devices(self) -> Sequence[dict]:
        """Its device-model records (DEVICE_STATE): the stub's devices; none for the guest."""


@runtime_checkable
class VmPart(MemorySpace, Protocol):
    """One VM of the pair: the guest or the stub, the same kind of thing."""
    vm: Vm                  # the stream's address space for its pages and records
    cpu: CpuPolicy          # the CPU it was given (its CPU records)

    def state_of(self, state) -> VmState:
        """Its share of ``state``, a state the domain captured (``capture()``)."""


class SaveableDomain(Protocol):
    """What a save needs of a domain."""
    config: DomainConfig
    status: DomainStatus
    stub_build: str         # build id of the stub image its memory holds ("" without a stub)
    pause_skew: float       # the last pause: seconds from the first vCPU's stop to the last one's

    def parts(self) -> list[VmPart]:
        """The guest, then the stub if there is one."""

    def pause(self, flush_later: bool = False, durable: bool = True) -> float:
        """Stop every vCPU; when the guest began to stop (time.monotonic()). Its disk's
        writes are durable on return, or with ``flush_later`` once :meth:`disk_flushed`
        has returned; with ``durable=False`` they are not flushed (a throttle's pause)."""

    def disk_flushed(self) -> None:
        """Wait for the disk flush a ``pause(flush_later=True)`` started; an exception if
        it failed."""

    def resume(self) -> None: ...

    def capture(self):
        """The state of a paused domain (a :class:`migrate.domain.DomainState`)."""

    def capture_records(self) -> dict:
        """The state of a paused domain as records, by stream VM id: each VM's HVM context
        records (a :class:`migrate.stream.hvm.HvmBodies`) and its DEVICE_STATE records (a
        :class:`migrate.stream.DeviceBodies`; only the stub has some): what ``capture()``'s state makes
        (:func:`migrate.engine.state.state_bodies`), on a save's downtime path."""

    def prepare_capture(self) -> None:
        """A capture is coming soon, on a downtime path: warm up what it will touch, and
        return once that is done (the pause comes next: warming left to run into it would
        be downtime)."""


class RestorableDomain(Protocol):
    """What a restore builds (``make_domain(config, cpu=, stub_cpu=)``) and fills."""
    config: DomainConfig

    def parts(self) -> list[VmPart]:
        """Where pages go: the guest, then the stub if there is one."""

    def apply_state(self, records: dict, fresh_stub: bool = False, early: bool = False) -> bool:
        """Apply the collected CPU state to the never-run domain: ``records``, by stream VM
        id, each VM's HVM context records (a :class:`migrate.stream.hvm.HvmBodies`,
        complete, each body checked as the reader checks it); the stub's are not applied
        when ``fresh_stub`` (the stub boots anew). May be called again, with the same or
        other records, until :meth:`finish_apply`. ``early``: pages may still arrive after
        it; a domain whose applying would read or write guest memory then applies nothing
        and returns False (True: applied)."""

    def finish_apply(self, devices: list[dict], fresh_stub: bool = False, stub_build: str = "") -> None:
        """The rest, once every page is in, after :meth:`apply_state`: ``devices``, the
        stub's DEVICE_STATE records, loaded by a fresh stub (``fresh_stub``), which boots
        anew; otherwise the stub resumes from its memory (``stub_build``: its build)."""

    def destroy(self) -> None: ...


def part_of(domain: RestorableDomain | SaveableDomain, vm: Vm) -> VmPart | None:
    """The part of ``domain`` whose address space is ``vm`` (None: it has none)."""
    for part in domain.parts():
        if part.vm is vm:
            return part
    return None


__all__ = ["DirtyPages", "MemorySpace", "RestorableDomain", "SaveableDomain", "VmPart", "VmState", "part_of"]
