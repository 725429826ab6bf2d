"""The domain: an HVM guest as one object (boot, pause, resume, state, dirty log).

This is the narrow interface the engine talks to: a memory view, a dirty
log, pause/resume and state capture/apply.  Only :mod:`migrate.kvm` issues
ioctls; this module holds the policy (the run loop, pausing, exit handling).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from . import guest
from .console import Console
from .cpu import (
    DEFAULT_MODEL, MODEL_NAME, STUB_MODEL, CpuModelError, CpuPolicy, HostCpu, compatibility,
    msrs_to_apply, policy_for, this_host, tsc_differs,
)
from .guest import boot as gboot
from .kvm import DirtyBitmap, Kvm, KvmError, PlatformState, VcpuState
from .stub import Stub, StubError, StubState, stub_build_id
from .stub import abi as stub_abi
from .stub.netback import NetError, check_net

log = logging.getLogger(__name__)

MIB = 1 << 20
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 3072 * MIB     # below the 32-bit MMIO hole; one memory slot


def memory_ok(memory: int) -> bool:
    """A guest memory size this build runs: MIN_MEMORY to MAX_MEMORY in 2 MiB steps."""
    return MIN_MEMORY <= memory <= MAX_MEMORY and memory % (2 * MIB) == 0


def memory_problem(memory: int) -> str:
    """What is wrong with a guest memory size memory_ok refuses, in one line."""
    size = f"{memory // MIB} MiB" if memory % MIB == 0 else f"{memory / MIB:.2f} MiB"
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        return f"memory size {size} out of range: {MIN_MEMORY // MIB} MiB to {MAX_MEMORY // MIB} MiB"
    below = memory // (2 * MIB) * 2
    return (f"memory size {size} is not a multiple of 2 MiB (the guest maps its memory in 2 MiB "
            f"pages): try {below} MiB or {below + 2} MiB")


RAM_SLOT = gboot.RAM_SLOT
PORT_SYNC = 0xEA
PORT_EXIT = 0xF4


def _range_of(slot) -> tuple:
    return (slot.base_pfn, slot.npages, slot.view(), slot.memfd, 0)


class DomainError(Exception):
    """A domain cannot be built or operated; the message says why."""


@dataclass
class DomainConfig:
    """What a domain is, as plain data (it travels in the stream)."""
    name: str
    workload: str
    memory: int
    args: list[int] = field(default_factory=lambda: [0] * 8)
    timer_hz: int = 100
    stub: bool = True           # devices in a stub VM; False: debug port 0xE9 only
    disk: str | None = None     # raw disk image behind the virtio block device
    cpu: str = DEFAULT_MODEL    # the guest's CPU model (specs/cpu-models.md)
    net: dict | None = None     # the NIC: {"link": "tap"|"bridge", "name", "mac", "mtu"} (stub/netback.py)

    def validate(self) -> None:
        if self.workload not in gboot.WORKLOADS:
            raise DomainError(f"unknown workload {self.workload!r} "
                              f"(one of: {', '.join(gboot.WORKLOADS)})")
        if not memory_ok(self.memory):
            raise DomainError(memory_problem(self.memory))
        if len(self.args) > 8:
            raise DomainError("at most 8 workload arguments")
        if not 0 <= self.timer_hz <= 1000:
            raise DomainError("timer_hz must be 0 to 1000")
        if self.disk is not None and not self.stub:
            raise DomainError("a disk needs the device-model stub")
        if not isinstance(self.cpu, str) or not MODEL_NAME.match(self.cpu):
            raise DomainError(f"{self.cpu!r} is not a CPU model name")
        if self.net is not None:
            if not self.stub:
                raise DomainError("a NIC needs the device-model stub")
            try:
                check_net(self.net)
            except NetError as exc:
                raise DomainError(str(exc)) from None


@dataclass
class DomainState:
    """Everything but memory: configuration, vCPUs, platform devices, and the
    stub's vCPU, platform and device state (None for a domain without stub)."""
    config: DomainConfig
    vcpus: list[VcpuState]
    platform: PlatformState
    stub: StubState | None = None


class Domain:
    """One HVM guest on KVM with one vCPU, run by a thread of its own.

    States: ``paused`` (built, not running), ``running``, ``shutdown`` (the
    guest stopped itself with status 0), ``crashed`` (a non-zero status, or
    KVM refused to run it), ``destroyed``.

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
        self.status = "paused"
        self.crash_reason = ""
        self.on_sync = None             # called in the vCPU thread: on_sync(value)
        self._kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        self._cv = threading.Condition()
        self._want_run = False
        self._in_guest = False
        self._thread: threading.Thread | None = None
        self._has_run = False               # resume() was called once: state can no longer be applied
        self.left_at = 0.0                  # time.monotonic() the vCPU last left the guest for a pause
        self.entered_at: float | None = None    # ... and first went into it after the last resume()
        self.stub: Stub | None = None
        self.stub_build = ""             # build id of the stub image this domain runs
        self._input = bytearray()          # console input not yet taken by the UART
        self._warm_stub = False             # prepare_capture() asked for a SAVE in the vCPU thread
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
        self.vm, self.ram, self.vcpu = gboot.new_machine(
            kvm, self.config.memory, f"hvm-{self.config.name}", self.cpu,
            scale_tsc=self._scale_tsc(self.cpu, host))
        if self.config.stub:
            try:
                self.stub = Stub(kvm, self.vm, self.ram, self.console, self.config.disk, self.config.name,
                                 self._stub_cpu, scale_tsc=self._scale_tsc(self._stub_cpu, host),
                                 net=self.config.net)
            except (OSError, StubError) as exc:
                raise DomainError(f"cannot build the stub: {exc}") from None

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

    def _load_image(self) -> None:
        image = guest.image_path().read_bytes()
        flags = ((gboot.BOOT_F_UART if self.stub else 0) | (gboot.BOOT_F_VIRTIO if self.config.disk else 0)
                 | (gboot.BOOT_F_NET if self.config.net else 0))
        info = gboot.BootInfo(
            workload=gboot.WORKLOADS[self.config.workload], timer_hz=self.config.timer_hz,
            mem_size=self.config.memory, wl_base=gboot.WORKLOAD_BASE,
            wl_size=self.config.memory - gboot.WORKLOAD_BASE,
            tsc_khz=self.vcpu.get_tsc_khz(), args=self.config.args,
            flags=flags, virtio_base=stub_abi.VIRTIO_BASE,
            net_base=stub_abi.NET_BASE if self.config.net else 0)
        gboot.boot_vcpu(self.vcpu, self.ram.mem, info, image)

    @classmethod
    def restore(cls, state: DomainState, memory, stub_memory=None, console: Console | None = None,
                fresh_stub: bool = False, stub_build: str = "") -> "Domain":
        """A new domain from captured state and copies of RAM, paused.

        The stub resumes from ``stub_memory`` as it was, or, with
        ``fresh_stub``, boots anew and loads the device state records.
        """
        dom = cls(state.config, console)
        try:
            if len(memory) != dom.ram.size:
                raise DomainError(f"memory image is {len(memory)} bytes, domain has {dom.ram.size}")
            dom.ram.mem[:] = memory
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
        if self.status != "paused" or self._has_run:
            raise DomainError("state can only be applied to a domain that has not run")
        if len(state.vcpus) != 1:
            raise DomainError(f"state has {len(state.vcpus)} vCPUs, this build runs 1")
        if (state.stub is None) != (self.stub is None):
            raise DomainError("state and domain disagree on having a device-model stub")
        vcpu = self._as_here(state.vcpus[0], self.cpu, "the guest")
        stub = None
        if self.stub is not None and not fresh_stub:
            stub = dataclasses.replace(state.stub, vcpus=[
                self._as_here(v, self.stub.cpu, "the stub") for v in state.stub.vcpus])
        state.platform.apply(self.vm)
        vcpu.apply(self.vcpu)
        if self.stub is None:
            return
        try:
            if fresh_stub:
                self.stub.boot()
                self.stub.load_devices(state.stub.devices)
                self.stub_build = stub_build_id()
            else:
                self.stub.apply(stub)
                self.stub_build = stub_build
        except StubError as exc:
            raise DomainError(str(exc)) from None
        self._announce = self.stub.net is not None

    def _as_here(self, vcpu: VcpuState, policy: CpuPolicy, what: str) -> VcpuState:
        """A saved vCPU state with its MSRs as this host takes them (``msrs_to_apply``)."""
        try:
            msrs, notes = msrs_to_apply(policy, vcpu.msrs, this_host())
        except CpuModelError as exc:
            raise DomainError(f"{what}: {exc}") from None
        self.cpu_notes += [f"{what}: {note}" for note in notes]
        return dataclasses.replace(vcpu, msrs=msrs)

    # -- memory and dirty log ---------------------------------------------
    @property
    def memory(self) -> memoryview:
        return self.ram.view()

    def memory_ranges(self) -> list[tuple]:
        """Guest RAM as ranges of guest page frames: (first_pfn, npages, memory view,
        memory file descriptor, offset of the range in that file)."""
        return [_range_of(self.ram)]

    def stub_memory_ranges(self) -> list[tuple]:
        return [_range_of(self.stub.ram)] if self.stub else []

    def data_ranges(self) -> list[tuple[int, int]]:
        """Page ranges of guest RAM that may hold data (the rest was never written)."""
        return self.ram.data_ranges()

    def stub_data_ranges(self) -> list[tuple[int, int]]:
        return self.stub.ram.data_ranges() if self.stub else []

    @property
    def stub_memory(self) -> memoryview | None:
        return self.stub.memory if self.stub else None

    def set_dirty_logging(self, enabled: bool) -> None:
        self.vm.set_dirty_logging(RAM_SLOT, enabled)
        if self.stub is not None:
            self.stub.set_dirty_logging(enabled)

    def fetch_dirty(self) -> DirtyBitmap:
        """Fetch and clear the pages of guest RAM dirtied since the last fetch:
        the guest's own log merged with the stub's window log (its DMA), which
        KVM keeps apart (KVM-HERE.md)."""
        dirty = self.vm.get_dirty_log(RAM_SLOT)
        if self.stub is not None:
            dirty = dirty | self.stub.fetch_window_dirty()
        return dirty

    def fetch_stub_dirty(self) -> DirtyBitmap | None:
        """Fetch and clear the stub's own memory pages dirtied since the last fetch."""
        return self.stub.fetch_ram_dirty() if self.stub else None

    # -- console input ----------------------------------------------------------
    def send_input(self, data: bytes) -> None:
        """Type ``data`` on the console: it reaches the guest through the UART."""
        if self.stub is None:
            raise DomainError("this domain has no UART (no device-model stub)")
        with self._cv:
            if len(self._input) + len(data) > 65536:
                raise DomainError("console input backlog is full")
            self._input += data
            if self.status == "running":
                self.vcpu.kick()        # the vCPU thread hands it to the stub

    # -- state --------------------------------------------------------------
    def capture(self) -> DomainState:
        if self.status == "running":
            raise DomainError("capture needs a paused domain")
        try:
            stub = self.stub.capture() if self.stub else None
        except (StubError, KvmError) as exc:
            raise DomainError(f"capturing the stub failed: {exc}") from None
        return DomainState(config=self.config,
                           vcpus=[VcpuState.capture(self.vcpu, self.cpu.msr_indices)],
                           platform=PlatformState.capture(self.vm), stub=stub)

    # -- running ------------------------------------------------------------
    def resume(self) -> None:
        with self._cv:
            if self.status == "destroyed":
                raise DomainError("domain is destroyed")
            if self.status in ("crashed", "shutdown"):
                raise DomainError(f"domain {self.status}: {self.crash_reason}")
            if self.status == "running":
                return
            self.vcpu.unkick()
            self._want_run = True
            self._has_run = True
            self.status = "running"
            self.entered_at = None
            self._start_thread()
            self._cv.notify_all()
        net = self.stub.net if self.stub is not None else None
        if net is not None:
            net.resume_rx()
            if self._announce:          # the first run after a restore: the NIC may have moved
                self._announce = False
                net.announce()

    def entered(self, timeout: float = 1.0) -> float | None:
        """After resume(): when the vCPU thread went into the guest (time.monotonic()), or
        None if it has not within ``timeout`` (or the domain stopped meanwhile)."""
        with self._cv:
            self._cv.wait_for(lambda: self.entered_at is not None or self.status != "running", timeout)
            return self.entered_at

    def park_vcpu(self) -> None:
        """Start the vCPU thread of a paused domain without running the guest (state may
        still be applied): a later resume() only wakes it. A relocation's resume is on the
        downtime path, and starting a thread there costs a fraction of a millisecond."""
        with self._cv:
            if self.status == "paused":
                self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._vcpu_loop, daemon=True,
                                            name=f"vcpu0-{self.config.name}")
            self._thread.start()

    def pause(self, timeout: float = 10.0) -> float:
        """Stop the vCPU; on return guest state is consistent and still. Returns when the
        guest stopped running (time.monotonic(); now if it was not running)."""
        asked = time.monotonic()
        with self._cv:
            if self.status != "running":
                return asked
            in_guest = self._in_guest       # else resumed but not yet gone in: it never ran
            self._want_run = False
            self.vcpu.kick()
            if not self._cv.wait_for(lambda: not self._in_guest, timeout):
                raise DomainError(f"vCPU did not stop within {timeout}s")
            if self.status == "running":
                self.status = "paused"
            stopped = self.left_at if in_guest and self.left_at >= asked else time.monotonic()
        # Quiesce: block requests complete inside the exit that issued them,
        # so none is in flight now; make the written ones durable. Received
        # packets: no NET_RX after this (they wait in the TAP device).
        if self.stub is not None and self.stub.net is not None:
            self.stub.net.pause_rx()
        if self.stub is not None and self.stub.backend is not None:
            self.stub.backend.flush()
        return stopped

    def destroy(self) -> None:
        with self._cv:
            if self.status == "destroyed":
                return
            self._want_run = False
            self.status = "destroyed"
            if self._thread is not None:
                self.vcpu.kick()
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
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
                lambda: self.status in ("crashed", "shutdown", "destroyed"), timeout)

    def _vcpu_loop(self) -> None:
        while True:
            with self._cv:
                self._in_guest = False
                self._cv.notify_all()
                self._cv.wait_for(lambda: self._want_run or self.status == "destroyed")
                if self.status == "destroyed":
                    return
                self._in_guest = True
            try:
                self._run_until_stopped()
            except Exception as exc:    # the guest is gone; say why
                log.exception("vCPU loop of %s failed", self.config.name)
                self._crash(str(exc))

    def _run_until_stopped(self) -> None:
        vcpu = self.vcpu
        entering = True
        while True:
            self._housekeeping()
            if entering:            # the first entry after a resume: entered() waits for it
                with self._cv:
                    self.entered_at = time.monotonic()
                    self._cv.notify_all()
                entering = False
            ex = vcpu.run()
            if ex.reason == "stopped":
                left = time.monotonic()
                with self._cv:
                    if not self._want_run:
                        self.left_at = left
                        return
                    vcpu.unkick()       # kicked for housekeeping (input), not a pause
                continue
            handler = self._EXIT_HANDLERS.get(ex.reason, Domain._on_fatal_exit)
            if handler(self, ex) is False:
                return

    def _crash(self, reason: str, status: str = "crashed") -> None:
        with self._cv:
            self.crash_reason = reason
            if self.status != "destroyed":
                self.status = status
            self._want_run = False
            self._cv.notify_all()

    # -- exit handlers: return False to stop the vCPU -----------------------
    def _on_console(self, ex) -> None:
        self.console.feed(ex.data)

    def prepare_capture(self) -> None:
        """A capture is coming soon on a downtime path (a live save's final pause): have the
        vCPU thread, which owns the stub's vCPU, run the stub's SAVE once now, so that the
        code and data it touches are faulted in (first touches cost about 30 us a page
        here) before the capture needs them. Its result is dropped."""
        if self.stub is None:
            return
        with self._cv:
            self._warm_stub = True
            if self.status == "running":
                self.vcpu.kick()

    def _housekeeping(self) -> None:
        """In the vCPU thread, between guest runs: console input and prepare_capture."""
        if self._warm_stub:
            self._warm_stub = False
            try:
                self.stub.save_devices()
            except Exception as exc:        # only a warm-up: the capture itself will fail and say why
                log.warning("%s: warming the stub's SAVE failed: %s", self.config.name, exc)
        self._deliver_input()

    def _deliver_input(self) -> None:
        if not self._input or self.stub is None:
            return
        with self._cv:
            chunk = bytes(self._input[:16])
        taken = self.stub.input(chunk)
        with self._cv:
            del self._input[:taken]

    def _on_io(self, ex):
        if self.stub is not None and ex.port in stub_abi.UART_PORTS:
            reply = self.stub.port_io(ex)
            if reply is not None:
                self.vcpu.complete_io_in(reply)
            self._deliver_input()
            return None
        if ex.is_write and ex.port == PORT_SYNC:
            if self.on_sync is not None:
                self.on_sync(int.from_bytes(ex.data, "little"))
            return None
        if ex.is_write and ex.port == PORT_EXIT:
            status = int.from_bytes(ex.data, "little")
            self._crash(f"guest stopped itself with status {status:#x}",
                        "shutdown" if status == 0 else "crashed")
            return False
        if ex.port not in self._unknown_ports:
            self._unknown_ports.add(ex.port)
            log.warning("%s: %s of unhandled port %#x ignored", self.config.name,
                        "write" if ex.is_write else "read", ex.port)
        if not ex.is_write:
            self.vcpu.complete_io_in(b"\xff" * (ex.size * ex.count))
        return None

    def _on_mmio(self, ex) -> None:
        if self.stub is not None and (
                (self.config.disk is not None
                 and stub_abi.VIRTIO_BASE <= ex.address < stub_abi.VIRTIO_BASE + stub_abi.VIRTIO_SIZE)
                or (self.stub.net is not None
                    and stub_abi.NET_BASE <= ex.address < stub_abi.NET_BASE + stub_abi.NET_SIZE)):
            reply = self.stub.mmio(ex)
            if reply is not None:
                self.vcpu.complete_mmio_read(reply)
            return
        page = ex.address & ~0xFFF
        if page not in self._unknown_mmio and len(self._unknown_mmio) < 1024:
            self._unknown_mmio.add(page)
            log.warning("%s: %s of unhandled MMIO %#x ignored", self.config.name,
                        "write" if ex.is_write else "read", ex.address)
        if not ex.is_write:
            self.vcpu.complete_mmio_read(b"\xff" * ex.size)

    def _on_fatal_exit(self, ex):
        self._crash(f"KVM exit {ex.reason} (code {ex.code}, detail {ex.detail:#x})")
        return False

    _EXIT_HANDLERS = {"console": _on_console, "io": _on_io, "mmio": _on_mmio}
