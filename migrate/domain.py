"""The domain: an HVM guest as one object (boot, pause, resume, state, dirty log).

This is the narrow interface the engine talks to: a memory view, a dirty
log, pause/resume and state capture/apply.  Only :mod:`migrate.kvm` issues
ioctls; this module holds the policy (the run loop, pausing, exit handling).
"""
from __future__ import annotations

import dataclasses
import logging
import struct
from array import array
import threading
import time
from dataclasses import dataclass, field

from . import guest
from .console import Console
from .config import (  # noqa: F401  (DomainConfig, DomainError and the memory checks: re-exported)
    MAX_MEMORY, MAX_VCPUS, MIN_MEMORY, MIB, STUB_MODEL, DomainConfig, DomainError, DomainStatus,
    memory_ok, memory_problem,
)
from .cpu import (
    CpuModelError, CpuPolicy, HostCpu, compatibility, msrs_as_saved, msrs_to_apply, policy_for, this_host,
    tsc_differs,
)
from .guest import boot as gboot
from .capture import StateApply, StateCapture
from .kvm import DirtyLog, HugePagesError, Kvm, KvmError, PlatformState, VcpuState
from .kvm.dirty import merged_pfns
from .kvm.state import PDPTRS_VALID
from .memory import Ram, RamRange
from .stream.hvm import MSR_ENTRY, MSR_HEADER, PREFIX, SREGS, HvmBodies, HvmState
from .stream.records import DeviceBodies, RecordType, Vm
from .stub import Stub, StubError, StubState, stub_build_id
from .stub import abi as stub_abi

log = logging.getLogger(__name__)


def guest_layout(memory: int) -> tuple[tuple[int, int], ...]:
    """The guest's RAM as ``(first_pfn, pages)`` ranges (its MEMORY_LAYOUT): below the
    32-bit MMIO hole, and from 4 GiB on for the rest (specs/guest-boot.md, "Memory")."""
    return tuple((gpa // gboot.PAGE_SIZE, size // gboot.PAGE_SIZE) for gpa, size in gboot.ram_layout(memory))


RAM_SLOT = gboot.RAM_SLOT
PORT_SYNC = 0xEA
PORT_EXIT = 0xF4
THREAD_END = 10.0       # seconds destroy() waits for each vCPU thread to end before it leaves the VMs open


@dataclass
class DomainState:
    """Everything but memory: configuration, vCPUs, platform devices, and the
    stub's vCPU, platform and device state (None for a domain without stub)."""
    config: DomainConfig
    vcpus: list[VcpuState]
    platform: PlatformState
    stub: StubState | None = None

    @property
    def devices(self) -> tuple:
        """The guest's own device-model records: none (its devices live in the stub)."""
        return ()


def _by_vcpu(bodies: HvmBodies) -> tuple[dict[int, dict[RecordType, bytes]], dict[RecordType, bytes]]:
    """A VM's record bodies: by vCPU id and type, and the platform's by type."""
    vcpus: dict[int, dict[RecordType, bytes]] = {}
    platform: dict[RecordType, bytes] = {}
    for rtype, vcpu_id, body in bodies.bodies():
        (platform if vcpu_id is None else vcpus.setdefault(vcpu_id, {}))[rtype] = body
    return vcpus, platform


def _decoded(bodies: dict[RecordType, bytes], rtype: RecordType):
    return HvmState.unpack_as(rtype, bodies[rtype]).state


CR0_PG, CR4_PAE, EFER_LMA = 1 << 31, 1 << 5, 1 << 10
KVM_WALL_CLOCK_MSRS = frozenset({0x11, 0x4B564D00})     # MSR_KVM_WALL_CLOCK and its _NEW twin


def _sregs_at(name: str) -> struct.Struct:
    """A u64 field of a VCPU_SREGS body, read where it lies (no decoding of the rest)."""
    fields = [f.name for f in SREGS.fields]
    before = "".join(f.format() for f in SREGS.fields[:fields.index(name)])
    return struct.Struct(f"{PREFIX}{before}Q")


_CR0, _CR4, _EFER = (_sregs_at(name) for name in ("cr0", "cr4", "efer"))


def _touches_memory(bodies: dict[RecordType, bytes], sregs2: bool) -> bool:
    """KVM reads or writes guest memory as it applies this vCPU's records: under PAE paging
    it loads the PDPTRs from the page CR3 names, unless the records hold them and it takes
    them (SREGS2); and a nonzero KVM wall clock MSR makes it write the wall clock into the
    page that MSR names. State like that waits for the last page. (Read from the bodies
    where the fields lie: this runs in a relocation's downtime, and decoding the records
    cost 0.2 ms cold.)"""
    sregs = bodies[RecordType.VCPU_SREGS]
    pae = (_CR0.unpack_from(sregs)[-1] & CR0_PG and _CR4.unpack_from(sregs)[-1] & CR4_PAE
           and not _EFER.unpack_from(sregs)[-1] & EFER_LMA)
    if pae and not (sregs2 and _pdptrs_valid(bodies)):
        return True
    entries = memoryview(bodies[RecordType.VCPU_MSRS])[MSR_HEADER.size:]
    indices = entries.cast("I")[::MSR_ENTRY.size // 4].tolist()         # each entry's first u32
    values = entries.cast("Q")[1::MSR_ENTRY.size // 8]                  # and its last u64
    return any(values[indices.index(index)] for index in KVM_WALL_CLOCK_MSRS.intersection(indices))


_PDPTRS_FLAGS = struct.Struct(f"{PREFIX}Q")     # VCPU_PDPTRS's first field


def _pdptrs_valid(bodies: dict[RecordType, bytes]) -> bool:
    """The vCPU's VCPU_PDPTRS (optional) says the PDPTRs it holds are the ones in use."""
    body = bodies.get(RecordType.VCPU_PDPTRS)
    return body is not None and bool(_PDPTRS_FLAGS.unpack_from(body)[-1] & PDPTRS_VALID)


class VmSpace:
    """One VM of the pair as the engine moves it (:class:`migrate.engine.contract.VmPart`):
    the guest and the stub are both one of these. ``ram``: its RAM; ``also_writes``: RAM of
    another VM mapped onto the same pages (the stub's window onto guest RAM), whose dirty
    log is merged into this one's, since KVM keeps them apart (KVM-HERE.md); ``share``:
    its part of a captured DomainState."""

    def __init__(self, vm: Vm, ram: Ram, cpu: CpuPolicy, share, also_writes: Ram | None = None):
        self.vm, self.ram, self.cpu = vm, ram, cpu
        self.share, self.also_writes = share, also_writes
        self._dirty_bufs: tuple | None = None       # dirty_pfns' bitmaps, made at its first call

    def memory_ranges(self) -> list[RamRange]:
        return self.ram.ranges()

    def data_ranges(self) -> list[tuple[int, int]]:
        return self.ram.data_ranges()

    def set_dirty_logging(self, enabled: bool) -> None:
        self.ram.set_dirty_logging(enabled)
        if self.also_writes is not None:
            self.also_writes.set_dirty_logging(enabled)

    def fetch_dirty(self, clear: bool = True) -> DirtyLog:
        dirty = self.ram.fetch_dirty(clear)
        if self.also_writes is not None:
            dirty = dirty | self.also_writes.fetch_dirty(clear)
        return dirty

    def dirty_pfns(self) -> array:
        """``fetch_dirty(clear=False).pfns()`` without the bitmap objects: each slot's log
        read into a buffer kept for it, the window's ORed in, listed in C (a pause's last
        fetch; 0.3 ms the other way, cold)."""
        if self._dirty_bufs is None:
            self._dirty_bufs = (self.ram.dirty_buffers(),
                                self.also_writes.dirty_buffers() if self.also_writes is not None else None)
        own, window = self._dirty_bufs
        self.ram.read_dirty(own)
        if window is not None:
            self.also_writes.read_dirty(window)
        return merged_pfns(own, window, self.ram.first_pfns())

    def clear_dirty(self, pfns) -> None:
        self.ram.clear_dirty(pfns)
        if self.also_writes is not None:
            self.also_writes.clear_dirty(pfns)

    def state_of(self, state: DomainState):
        return self.share(state)


@dataclass(eq=False)
class _VcpuRun:
    """One vCPU and the thread that runs it. ``in_guest``: the thread is in its run loop
    (asked to run, not yet back to waiting); ``left_at``: time.monotonic() it last left the
    guest for a pause; ``entered_at``: when it first went into the guest after the last
    resume() (None: not yet)."""
    vcpu: object
    thread: threading.Thread | None = None
    in_guest: bool = False
    left_at: float = 0.0
    entered_at: float | None = None


class Domain:
    """One HVM guest on KVM with ``config.vcpus`` vCPUs, each run by a thread of its own.

    States: ``paused`` (built, not running), ``running``, ``shutdown`` (the
    guest stopped itself with status 0), ``crashed`` (a non-zero status, or
    KVM refused to run it), ``destroyed``. Pausing stops every vCPU; the state is
    captured only when all of them are out of the guest.

    ``cpu`` and ``stub_cpu`` are the CPUs of the guest and the stub (a restore passes the
    saved ones); by default they are made from ``config.cpu`` and the stub's model. This
    host's compatibility with them is checked before anything is built (DomainError
    naming everything it lacks); what the guest will notice is kept in ``cpu_notes``.
    """

    def __init__(self, config: DomainConfig, console: Console | None = None,
                 kvm: Kvm | None = None, cpu: CpuPolicy | None = None,
                 stub_cpu: CpuPolicy | None = None):
        config.validate()
        self.config = config
        self.cpu_notes: list[str] = []
        host = this_host()
        try:
            self.cpu = self._fit(cpu or policy_for(config.cpu, host), host, "the guest")
            self._stub_cpu = (self._fit(stub_cpu or policy_for(STUB_MODEL, host), host, "the stub")
                              if config.stub else None)
        except CpuModelError as exc:
            raise DomainError(str(exc)) from None
        self.console = console or Console()
        self.status = DomainStatus.PAUSED
        self.crash_reason = ""
        self.on_sync = None             # called in the vCPU thread: on_sync(value)
        self._kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        self._cv = threading.Condition()
        self._want_run = False
        self._runs: list[_VcpuRun] = []
        self._has_run = False               # resume() was called once: state can no longer be applied
        self.pause_skew = 0.0               # the last pause: seconds from the first vCPU's stop to the last's
        self.stub: Stub | None = None
        self._parts: list[VmSpace] = []
        self.stub_build = ""             # build id of the stub image this domain runs
        self._input = bytearray()          # console input not yet taken by the UART
        self.input_held = 0                # bytes of it at the last capture: no stream carries them
        self._announce = False              # restored: the NIC announces itself at the first resume
        self._unknown_ports: set[int] = set()
        self._unknown_mmio: set[int] = set()       # pages already logged
        try:
            self._build()
        except BaseException:
            self._close_vm()
            raise

    # -- construction -----------------------------------------------------
    def _build(self) -> None:
        kvm = self._kvm
        kvm.require("KVM_CAP_IRQCHIP", "KVM_CAP_PIT2", "KVM_CAP_IMMEDIATE_EXIT",
                    "KVM_CAP_XSAVE", "KVM_CAP_XCRS", "KVM_CAP_VCPU_EVENTS",
                    "KVM_CAP_DEBUGREGS", "KVM_CAP_ADJUST_CLOCK")
        host = this_host()
        try:
            self.vm, self.ram, self.vcpus = gboot.new_machine(
                kvm, gboot.ram_layout(self.config.memory), f"hvm-{self.config.name}", self.cpu,
                scale_tsc=self._scale_tsc(self.cpu, host), vcpus=self.config.vcpus,
                huge=self.config.hugepages)
        except HugePagesError as exc:
            raise DomainError(f"cannot give domain {self.config.name} its RAM: {exc.strerror}") from None
        self._runs = [_VcpuRun(vcpu) for vcpu in self.vcpus]
        if self.config.stub:
            try:
                self.stub = Stub(kvm, self.vm, self.ram, self.console, self.config.disk, self.config.name,
                                 self._stub_cpu, scale_tsc=self._scale_tsc(self._stub_cpu, host),
                                 net=self.config.net, direct_msrs=msrs_as_saved(self._stub_cpu, host))
            except (OSError, StubError) as exc:
                raise DomainError(f"cannot build the stub: {exc}") from None
        # made now, not at the first capture or apply, which may be inside a downtime
        self._capture = StateCapture(Vm.GUEST, self.vm, self.vcpus, self.cpu.msr_indices)
        self._applier = StateApply(self.vm, self.vcpus, msrs_as_saved(self.cpu, host))
        window = self.stub.window if self.stub is not None else None
        self._parts = [VmSpace(Vm.GUEST, self.ram, self.cpu, lambda state: state, also_writes=window)]
        if self.stub is not None:
            self._parts.append(VmSpace(Vm.STUB, self.stub.ram, self.stub.cpu, lambda state: state.stub))

    def _fit(self, policy: CpuPolicy, host: HostCpu, what: str) -> CpuPolicy:
        """``policy`` as this host runs it: refused (CpuModelError) if the host cannot, less
        the droppable MSRs it lacks (specs/cpu-models.md, "Compatibility")."""
        found = compatibility(policy, host)
        if found.problems:
            raise CpuModelError(f"this host cannot run {what}'s CPU ({policy.model} model): "
                                f"{'; '.join(found.problems)}")
        self.cpu_notes += [f"{what}: {note}" for note in found.notes]
        return policy.without_msrs(found.dropped_msrs)

    @staticmethod
    def _scale_tsc(policy: CpuPolicy, host: HostCpu) -> bool:
        return host.tsc_scaling and not policy.legacy and tsc_differs(policy.tsc_khz, host.tsc_khz)

    @classmethod
    def boot(cls, config: DomainConfig, console: Console | None = None) -> "Domain":
        """A new domain (guest image loaded, stub running), paused at the guest's entry."""
        dom = cls(config, console)
        try:
            if dom.stub is not None:
                dom.stub.boot()
                dom.stub_build = stub_build_id()
            dom._load_image()
        except StubError as exc:
            dom.destroy()
            raise DomainError(f"stub failed to boot: {exc}") from None
        except BaseException:
            dom.destroy()
            raise
        return dom

    @property
    def vcpu(self):
        """vCPU 0 (the bootstrap processor)."""
        return self.vcpus[0]

    def _load_image(self) -> None:
        image = guest.image_path().read_bytes()
        flags = ((gboot.BOOT_F_UART if self.stub else 0) | (gboot.BOOT_F_VIRTIO if self.config.disk else 0)
                 | (gboot.BOOT_F_NET if self.config.net else 0))
        layout = gboot.ram_layout(self.config.memory)
        wl_base, wl_size = gboot.workload_region(layout)
        info = gboot.BootInfo(
            workload=gboot.WORKLOADS[self.config.workload], timer_hz=self.config.timer_hz,
            mem_size=layout[0][1], wl_base=wl_base, wl_size=wl_size,
            tsc_khz=self.vcpu.get_tsc_khz(), args=self.config.args,
            flags=flags, virtio_base=stub_abi.VIRTIO_BASE,
            net_base=stub_abi.NET_BASE if self.config.net else 0, nr_cpus=len(self.vcpus),
            high_size=sum(size for base, size in layout if base >= gboot.HIGH_RAM_BASE))
        top = max(base + size for base, size in layout)
        gboot.boot_vcpus(self.vcpus, self.ram.mem, info, image, map_top=top)

    @classmethod
    def restore(cls, state: DomainState, memory, stub_memory=None, console: Console | None = None,
                fresh_stub: bool = False, stub_build: str = "") -> "Domain":
        """A new domain from captured state and copies of RAM, paused. ``memory`` holds the
        bytes of every RAM range in address order.

        The stub resumes from ``stub_memory`` as it was, or, with
        ``fresh_stub``, boots anew and loads the device state records.
        """
        dom = cls(state.config, console)
        try:
            if len(memory) != dom.ram.size:
                raise DomainError(f"memory image is {len(memory)} bytes, domain has {dom.ram.size}")
            at = 0
            for ram in dom.memory_ranges():
                ram.view[:] = memoryview(memory)[at:at + len(ram.view)]
                at += len(ram.view)
                ram.view.release()
            if dom.stub is not None and not fresh_stub:
                if stub_memory is None or len(stub_memory) != dom.stub.ram.size:
                    raise DomainError("the stub's memory image is missing or has the wrong size")
                dom.stub.ram.mem[:] = stub_memory
            dom.apply(state, fresh_stub=fresh_stub, stub_build=stub_build)
        except BaseException:
            dom.destroy()
            raise
        return dom

    def apply(self, state: DomainState, fresh_stub: bool = False, stub_build: str = "") -> None:
        """Apply captured state to this paused, never-run domain (its memory,
        and unless ``fresh_stub`` the stub's memory, are filled separately).
        ``stub_build`` names the build of a stub resumed from its image."""
        self._check_applicable([v.vcpu_id for v in state.vcpus], state.stub is not None)
        vcpus = [self._as_here(v, self.cpu, "the guest") for v in state.vcpus]
        stub = None
        if self.stub is not None and not fresh_stub:
            stub = dataclasses.replace(state.stub, vcpus=[
                self._as_here(v, self.stub.cpu, "the stub") for v in state.stub.vcpus])
        state.platform.apply(self.vm)
        for saved, vcpu in zip(vcpus, self.vcpus):
            saved.apply(vcpu)
        self._apply_stub(fresh_stub, state.stub.devices if state.stub else [], stub_build,
                         lambda: self.stub.apply(stub))

    def _check_applicable(self, vcpu_ids: list[int], has_stub: bool) -> None:
        """State of these vCPUs, with or without a stub's, can be applied to this domain."""
        if self.status is not DomainStatus.PAUSED or self._has_run:
            raise DomainError("state can only be applied to a domain that has not run")
        if vcpu_ids != [v.id for v in self.vcpus]:
            raise DomainError(f"state has vCPUs {vcpu_ids}, the domain {[v.id for v in self.vcpus]}")
        if has_stub != (self.stub is not None):
            raise DomainError("state and domain disagree on having a device-model stub")

    def _apply_stub(self, fresh_stub: bool, devices: list[dict], stub_build: str, resume) -> None:
        """The stub's share of an apply, after the guest's: a fresh stub boots and loads the
        device records; otherwise ``resume()`` applies its saved state to its memory image."""
        if self.stub is None:
            return
        try:
            if fresh_stub:
                self.stub.boot()
                self.stub.load_devices(devices)
                self.stub_build = stub_build_id()
            else:
                resume()
                self.stub_build = stub_build
        except StubError as exc:
            raise DomainError(str(exc)) from None
        self._announce = self.stub.net is not None

    def _as_here(self, vcpu: VcpuState, policy: CpuPolicy, what: str) -> VcpuState:
        """A saved vCPU state with its MSRs as this host takes them (``msrs_to_apply``)."""
        return dataclasses.replace(vcpu, msrs=self._msrs_here(vcpu.msrs, policy, what))

    def _record_msrs(self, bodies: dict, policy: CpuPolicy, applier: StateApply, what: str) -> dict[int, int] | None:
        """The MSRs of a vCPU's records (bodies by type) as this host takes them; None when
        it takes the VCPU_MSRS body as it is (StateApply.takes_msrs_as_saved): no decoding."""
        if applier.takes_msrs_as_saved(bodies[RecordType.VCPU_MSRS]):
            return None
        return self._msrs_here(_decoded(bodies, RecordType.VCPU_MSRS), policy, what)

    def _msrs_here(self, msrs: dict[int, int], policy: CpuPolicy, what: str) -> dict[int, int]:
        try:
            msrs, notes = msrs_to_apply(policy, msrs, this_host())
        except CpuModelError as exc:
            raise DomainError(f"{what}: {exc}") from None
        self.cpu_notes += [f"{what}: {note}" for note in notes if f"{what}: {note}" not in self.cpu_notes]
        return msrs

    def apply_state(self, records: dict[Vm, HvmBodies], fresh_stub: bool = False, early: bool = False) -> bool:
        """The pair's KVM state from the records a restore collected (``records``: each VM's
        HVM context records, complete), applied from their bodies in C (migrate/capture.py)
        by the rules and in the order of :meth:`apply`: the guest's platform and vCPUs, and
        the stub's when it resumes from its image. It may be applied again, from the same or
        other records, until :meth:`finish_apply`. ``early``: pages may still be on their way
        (a relocation applies the state while the last round arrives); then nothing is
        applied and False returned when KVM would read or write guest memory as it applies
        this state (:func:`_touches_memory`)."""
        guest = _by_vcpu(records[Vm.GUEST])
        self._check_applicable(sorted(guest[0]), Vm.STUB in records)
        stub = None
        if self.stub is not None and not fresh_stub:
            stub = _by_vcpu(records[Vm.STUB])
            if sorted(stub[0]) != [0]:
                raise DomainError(f"state has stub vCPUs {sorted(stub[0])}, the stub [0]")
        if early:
            vcpus = [*guest[0].values(), *(stub[0].values() if stub else ())]
            if any(_touches_memory(bodies, self._applier.sregs2) for bodies in vcpus):
                return False
        msrs = [self._record_msrs(guest[0][v.id], self.cpu, self._applier, "the guest") for v in self.vcpus]
        if stub is not None:
            stub_msrs = self._record_msrs(stub[0][0], self.stub.cpu, self.stub.applier, "the stub")
        try:
            self._applier.apply_platform(guest[1])
            for index, vcpu in enumerate(self.vcpus):
                self._applier.apply_vcpu(index, guest[0][vcpu.id], msrs[index], _pdptrs_valid(guest[0][vcpu.id]))
        except ValueError as exc:       # a body shorter than its program: the caller checked lengths
            raise DomainError(f"applying the guest's state: {exc}") from None
        if stub is not None:
            try:
                self.stub.apply_records(stub[1], stub[0][0], stub_msrs, _pdptrs_valid(stub[0][0]))
            except StubError as exc:
                raise DomainError(str(exc)) from None
        return True

    def finish_apply(self, devices: list[dict], fresh_stub: bool = False, stub_build: str = "") -> None:
        """The rest of a restore's apply once every page is in, after :meth:`apply_state`:
        the stub resumes from its image (checked against this domain) or boots afresh and
        loads ``devices``."""
        self._apply_stub(fresh_stub, devices, stub_build, self.stub.resume_image if self.stub else None)

    # -- memory and dirty log ---------------------------------------------
    def parts(self) -> list["VmSpace"]:
        """The guest, then the stub (if any): what the engine moves (engine/contract.py)."""
        return list(self._parts)

    @property
    def memory(self) -> memoryview:
        """Guest RAM from physical address 0 (below the 32-bit MMIO hole): all of it for a
        guest of at most 3 GiB; see memory_ranges() for all RAM."""
        return self.ram.low.view()

    def memory_ranges(self) -> list[RamRange]:
        """Guest RAM as ranges of guest page frames, one per memory slot, ascending:
        (first_pfn, npages, memory view, memory file descriptor, offset of the range in
        that file)."""
        return self._parts[0].memory_ranges()

    def guest_view(self, address: int, size: int) -> memoryview:
        """Guest RAM ``[address, address + size)``, inside one RAM range."""
        return self.ram.view(address, size)

    def data_ranges(self) -> list[tuple[int, int]]:
        """Page ranges of guest RAM that may hold data (the rest was never written)."""
        return self._parts[0].data_ranges()

    @property
    def stub_memory(self) -> memoryview | None:
        return self.stub.memory if self.stub else None

    def set_dirty_logging(self, enabled: bool) -> None:
        """Dirty logging of every part (the guest's RAM, the stub's window onto it, the
        stub's RAM) on or off."""
        for part in self._parts:
            part.set_dirty_logging(enabled)

    def fetch_dirty(self) -> DirtyLog:
        """Fetch and clear the pages of guest RAM written since their bits were last
        cleared, in every RAM slot: the guest's own log merged with the stub's window log
        (its DMA), which KVM keeps apart (KVM-HERE.md)."""
        return self._parts[0].fetch_dirty()

    # -- console input ----------------------------------------------------------
    def send_input(self, data: bytes) -> None:
        """Type ``data`` on the console: it reaches the guest through the UART."""
        if self.stub is None:
            raise DomainError("this domain has no UART (no device-model stub)")
        with self._cv:
            if len(self._input) + len(data) > 65536:
                raise DomainError("console input backlog is full")
            self._input += data
            if self.status is DomainStatus.RUNNING:
                self.vcpu.kick()        # vCPU 0's thread hands it to the stub

    # -- state --------------------------------------------------------------
    def capture(self) -> DomainState:
        self.input_held = len(self._input)
        stub = self._capture_stub(Stub.capture)
        return DomainState(config=self.config,
                           vcpus=[VcpuState.capture(vcpu, self.cpu.msr_indices) for vcpu in self.vcpus],
                           platform=PlatformState.capture(self.vm), stub=stub)

    def capture_records(self) -> dict[Vm, tuple[HvmBodies, DeviceBodies]]:
        """The state of a paused domain as the stream's records, captured in C
        (migrate/capture.py): per VM, its HVM context records and its DEVICE_STATE records'
        bodies (the stub's; none for the guest). The same records as
        :meth:`capture`'s state gives (``engine.state``), for a save's downtime path."""
        self.input_held = len(self._input)
        stub = self._capture_stub(Stub.capture_records)
        try:
            guest = self._capture.capture()
        except KvmError as exc:
            raise DomainError(f"capturing the guest failed: {exc}") from None
        out = {Vm.GUEST: (guest, DeviceBodies())}
        if stub is not None:
            out[Vm.STUB] = stub
        return out

    def _capture_stub(self, how):
        """``how(stub)`` for a paused domain's stub (None without one): the stub's share of a
        capture, which comes first (its SAVE changes stub memory)."""
        if self.status is DomainStatus.RUNNING:
            raise DomainError("capture needs a paused domain")
        try:
            return how(self.stub) if self.stub else None
        except (StubError, KvmError) as exc:
            raise DomainError(f"capturing the stub failed: {exc}") from None

    # -- running ------------------------------------------------------------
    def resume(self) -> None:
        if self.status is not DomainStatus.RUNNING:
            try:                # a save that failed (or stopped) before it waited for its flush
                self.disk_flushed()
            except DomainError as exc:
                log.error("%s: %s", self.config.name, exc)
        with self._cv:
            if self.status is DomainStatus.DESTROYED:
                raise DomainError("domain is destroyed")
            if self.status in (DomainStatus.CRASHED, DomainStatus.SHUTDOWN):
                raise DomainError(f"domain {self.status}: {self.crash_reason}")
            if self.status is DomainStatus.RUNNING:
                return
            for run in self._runs:
                run.vcpu.unkick()
                run.entered_at = None
            self._want_run = True
            self._has_run = True
            self.status = DomainStatus.RUNNING
            self._start_threads()
            self._cv.notify_all()
        net = self.stub.net if self.stub is not None else None
        if net is not None:
            net.resume_rx()
            if self._announce:          # the first run after a restore: the NIC may have moved
                self._announce = False
                net.announce()

    @property
    def entered_at(self) -> float | None:
        """After resume(): when the last vCPU went into the guest (time.monotonic()), from
        when the whole guest runs; None until all of them have."""
        times = [run.entered_at for run in self._runs]
        return None if None in times else max(times)

    def entered(self, timeout: float = 1.0) -> float | None:
        """After resume(): when every vCPU thread had gone into the guest (time.monotonic()
        of the last one), or None if they have not within ``timeout`` (or the domain
        stopped meanwhile)."""
        with self._cv:
            self._cv.wait_for(lambda: self.entered_at is not None or self.status is not DomainStatus.RUNNING, timeout)
            return self.entered_at

    def park_vcpu(self) -> None:
        """Start the vCPU threads of a paused domain without running the guest (state may
        still be applied): a later resume() only wakes them. A relocation's resume is on the
        downtime path, and starting threads there costs a fraction of a millisecond each."""
        with self._cv:
            if self.status is DomainStatus.PAUSED:
                self._start_threads()

    def _start_threads(self) -> None:
        for run in self._runs:
            if run.thread is None:
                run.thread = threading.Thread(target=self._vcpu_loop, args=(run,), daemon=True,
                                              name=f"vcpu{run.vcpu.id}-{self.config.name}")
                run.thread.start()

    def pause(self, timeout: float = 10.0, flush_later: bool = False, durable: bool = True) -> float:
        """Stop every vCPU; on return all of them are out of the guest and its state is
        consistent and still, and the disk's writes are durable. Returns when the guest
        began to stop (time.monotonic() of the first vCPU's stop; now if it was not
        running); ``pause_skew`` is then the seconds from the first vCPU's stop to the last
        one's. ``flush_later``: the disk's flush runs on a thread of its own meanwhile, and
        :meth:`disk_flushed` waits for it (a save's downtime need not wait for the disk
        while the state is captured and sent). ``durable=False``: the disk is not flushed
        at all (a throttle's pause, which holds the vCPUs back and saves nothing)."""
        asked = time.monotonic()
        with self._cv:
            if self.status is not DomainStatus.RUNNING:
                return asked
            running = [run.in_guest for run in self._runs]   # else resumed, not yet gone in: never ran
            self._want_run = False
            for run in self._runs:
                run.vcpu.kick()
            if not self._cv.wait_for(lambda: not any(run.in_guest for run in self._runs), timeout):
                raise DomainError(f"vCPUs did not stop within {timeout}s")
            if self.status is DomainStatus.RUNNING:
                self.status = DomainStatus.PAUSED
                self._cv.notify_all()
            now = time.monotonic()
            stops = [run.left_at if was_in and run.left_at >= asked else now
                     for run, was_in in zip(self._runs, running)]
            self.pause_skew = max(stops) - min(stops)
        # Quiesce: block requests complete inside the exit that issued them,
        # so none is in flight now; make the written ones durable. Received
        # packets: no NET_RX after this (they wait in the TAP device).
        if self.stub is not None and self.stub.net is not None:
            self.stub.net.pause_rx()
        if self.stub is not None and self.stub.backend is not None and durable:
            if flush_later:
                self.stub.backend.start_flush()
            else:
                self.stub.backend.flush()
        return min(stops)

    def disk_flushed(self) -> None:
        """Wait for the disk flushes ``pause(flush_later=True)`` and prepare_capture
        started, if any: DomainError if one failed (what the guest wrote may not be on the
        disk)."""
        if self.stub is None or self.stub.backend is None:
            return
        try:
            self.stub.backend.flushed()
        except OSError as exc:
            raise DomainError(f"disk image {self.config.disk}: flush failed: {exc.strerror}") from None

    def _kick_all(self) -> None:
        for run in self._runs:
            run.vcpu.kick()

    def destroy(self) -> None:
        with self._cv:
            if self.status is DomainStatus.DESTROYED:
                return
            self._want_run = False
            self.status = DomainStatus.DESTROYED
            for run in self._runs:
                if run.thread is not None:
                    run.vcpu.kick()
            self._cv.notify_all()
        stuck = []
        for run in self._runs:
            if run.thread is not None and run.thread is not threading.current_thread():
                run.thread.join(THREAD_END)
                if run.thread.is_alive():
                    stuck.append(run.thread.name)
        if stuck:       # closing a VM would unmap a kvm_run page under them: a crash. A
            # thread stuck is most likely in a stub request, using the stub's VM: leave both
            log.error("%s: vCPU threads %s did not end: the VM and its stub are left open",
                      self.config.name, ", ".join(stuck))
            return
        self._close_vm()

    def _close_vm(self) -> None:
        if getattr(self, "stub", None) is not None:
            self.stub.close()
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
            self.vm = None
        if self._own_kvm:
            self._kvm.close()

    def wait_stopped(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(
                lambda: self.status.stopped, timeout)

    def _vcpu_loop(self, run: _VcpuRun) -> None:
        while True:
            with self._cv:
                run.in_guest = False
                self._cv.notify_all()
                self._cv.wait_for(lambda: self._want_run or self.status is DomainStatus.DESTROYED)
                if self.status is DomainStatus.DESTROYED:
                    return
                run.in_guest = True
            try:
                self._run_until_stopped(run)
            except Exception as exc:    # the guest is gone; say why
                log.exception("vCPU %d loop of %s failed", run.vcpu.id, self.config.name)
                self._crash(f"vCPU {run.vcpu.id}: {exc}")

    def _run_until_stopped(self, run: _VcpuRun) -> None:
        vcpu = run.vcpu
        bsp = vcpu.id == 0
        entering = True
        while True:
            if bsp:
                self._deliver_input()
            if entering:            # the first entry after a resume: entered() waits for it
                with self._cv:
                    run.entered_at = time.monotonic()
                    self._cv.notify_all()
                entering = False
            ex = vcpu.run()
            if ex.reason == "stopped":
                left = time.monotonic()
                with self._cv:
                    if not self._want_run:
                        run.left_at = left
                        return
                    vcpu.unkick()       # kicked for housekeeping (input), not a pause
                continue
            handler = self._EXIT_HANDLERS.get(ex.reason, Domain._on_fatal_exit)
            if handler(self, vcpu, ex) is False:
                return

    def _crash(self, reason: str, status: DomainStatus = DomainStatus.CRASHED) -> None:
        """The guest stopped (or cannot go on): every vCPU leaves it."""
        with self._cv:
            if self.status in (DomainStatus.CRASHED, DomainStatus.SHUTDOWN):      # another vCPU said it first
                return
            self.crash_reason = reason
            if self.status is not DomainStatus.DESTROYED:
                self.status = status
            self._want_run = False
            self._kick_all()
            self._cv.notify_all()

    # -- exit handlers: return False to stop the vCPU -----------------------
    def _on_console(self, vcpu, ex) -> None:
        self.console.feed(ex.data)

    def prepare_capture(self) -> None:
        """A capture is coming soon on a downtime path (a live save's final pause): run the
        stub's SAVE once now, on the calling thread (the one that will capture), so that
        the stub memory it writes and the code it runs are faulted in (first touches cost
        about 30 us a page here) before the capture needs them. Its result is dropped.
        The guest runs on meanwhile: the stub is a VM of its own, and the stub's lock holds
        off only the guest's I/O exits while the SAVE runs. (The guest's vCPU thread used
        to run it, and the guest stood still for it just before the pause, 0.4-1.5 ms that
        no downtime counted.)"""
        if self.stub is None or not self.status.live:
            return
        if self.stub.backend is not None:   # what pre-copy wrote goes now; the thread starts
            self.stub.backend.start_flush()
        try:
            self.stub.warm_capture()
        except Exception as exc:        # only a warm-up: the capture itself will fail and say why
            log.warning("%s: warming the stub's SAVE failed: %s", self.config.name, exc)

    def _deliver_input(self) -> None:
        if not self._input or self.stub is None:
            return
        with self._cv:
            chunk = bytes(self._input[:16])
        taken = self.stub.input(chunk)
        with self._cv:
            del self._input[:taken]

    def _on_io(self, vcpu, ex):
        if self.stub is not None and ex.port in stub_abi.UART_PORTS:
            reply = self.stub.port_io(ex)
            if reply is not None:
                vcpu.complete_io_in(reply)
            if vcpu.id == 0:
                self._deliver_input()
            return None
        if ex.is_write and ex.port == PORT_SYNC:
            if self.on_sync is not None:
                self.on_sync(int.from_bytes(ex.data, "little"))
            return None
        if ex.is_write and ex.port == PORT_EXIT:
            status = int.from_bytes(ex.data, "little")
            self._crash(f"guest stopped itself with status {status:#x}",
                        DomainStatus.SHUTDOWN if status == 0 else DomainStatus.CRASHED)
            return False
        if ex.port not in self._unknown_ports:
            self._unknown_ports.add(ex.port)
            log.warning("%s: %s of unhandled port %#x ignored", self.config.name,
                        "write" if ex.is_write else "read", ex.port)
        if not ex.is_write:
            vcpu.complete_io_in(b"\xff" * (ex.size * ex.count))
        return None

    def _on_mmio(self, vcpu, ex) -> None:
        if self.stub is not None and (
                (self.config.disk is not None
                 and stub_abi.VIRTIO_BASE <= ex.address < stub_abi.VIRTIO_BASE + stub_abi.VIRTIO_SIZE)
                or (self.stub.net is not None
                    and stub_abi.NET_BASE <= ex.address < stub_abi.NET_BASE + stub_abi.NET_SIZE)):
            reply = self.stub.mmio(ex)
            if reply is not None:
                vcpu.complete_mmio_read(reply)
            return
        page = ex.address & ~0xFFF
        if page not in self._unknown_mmio and len(self._unknown_mmio) < 1024:
            self._unknown_mmio.add(page)
            log.warning("%s: %s of unhandled MMIO %#x ignored", self.config.name,
                        "write" if ex.is_write else "read", ex.address)
        if not ex.is_write:
            vcpu.complete_mmio_read(b"\xff" * ex.size)

    def _on_fatal_exit(self, vcpu, ex):
        where = f"vCPU {vcpu.id}: " if len(self.vcpus) > 1 else ""
        self._crash(f"{where}KVM exit {ex.reason} (code {ex.code}, detail {ex.detail:#x})")
        return False

    _EXIT_HANDLERS = {"console": _on_console, "io": _on_io, "mmio": _on_mmio}
