"""The domain: an HVM guest as one object (boot, pause, resume, state, dirty log).

This is the narrow interface the engine talks to: a memory view, a dirty
log, pause/resume and state capture/apply.  Only :mod:`migrate.kvm` issues
ioctls; this module holds the policy (the run loop, pausing, exit handling).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from . import guest
from .console import Console
from .guest import boot as gboot
from .kvm import DirtyBitmap, Kvm, KvmError, PlatformState, VcpuState

log = logging.getLogger(__name__)

MIB = 1 << 20
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 3072 * MIB     # below the 32-bit MMIO hole; one memory slot
TSS_ADDR = 0xFFFBD000
RAM_SLOT = 0
PORT_SYNC = 0xEA
PORT_EXIT = 0xF4


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

    def validate(self) -> None:
        if self.workload not in gboot.WORKLOADS:
            raise DomainError(f"unknown workload {self.workload!r} "
                              f"(one of: {', '.join(gboot.WORKLOADS)})")
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY or self.memory % (2 * MIB):
            raise DomainError(f"memory size {self.memory // MIB} MiB out of range: "
                              f"{MIN_MEMORY // MIB} MiB to {MAX_MEMORY // MIB} MiB in 2 MiB steps")
        if len(self.args) > 8:
            raise DomainError("at most 8 workload arguments")
        if not 0 <= self.timer_hz <= 1000:
            raise DomainError("timer_hz must be 0 to 1000")


@dataclass
class DomainState:
    """Everything but memory: configuration, vCPUs, platform devices."""
    config: DomainConfig
    vcpus: list[VcpuState]
    platform: PlatformState


class Domain:
    """One HVM guest on KVM with one vCPU, run by a thread of its own.

    States: ``paused`` (built, not running), ``running``, ``shutdown`` (the
    guest stopped itself with status 0), ``crashed`` (a non-zero status, or
    KVM refused to run it), ``destroyed``.
    """

    def __init__(self, config: DomainConfig, console: Console | None = None,
                 kvm: Kvm | None = None):
        config.validate()
        self.config = config
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
        self.vm = vm = kvm.create_vm()
        vm.set_tss_addr(TSS_ADDR)       # before any vCPU runs
        vm.create_irqchip()             # before vCPUs are created
        vm.create_pit2()
        self.ram = vm.add_memory(RAM_SLOT, 0, self.config.memory, name=f"hvm-{self.config.name}")
        self.vcpu = vm.create_vcpu(0)
        self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
        self.msr_indices = self._saveable_msrs()

    def _saveable_msrs(self) -> list[int]:
        saveable = []
        for index in self._kvm.get_msr_index_list():
            try:
                self.vcpu.get_msrs([index])
            except KvmError:
                continue
            saveable.append(index)
        return saveable

    @classmethod
    def boot(cls, config: DomainConfig, console: Console | None = None) -> "Domain":
        """A new domain with the guest image loaded, paused at its entry."""
        dom = cls(config, console)
        try:
            dom._load_image()
        except BaseException:
            dom.destroy()
            raise
        return dom

    def _load_image(self) -> None:
        image = guest.image_path().read_bytes()
        info = gboot.BootInfo(
            workload=gboot.WORKLOADS[self.config.workload], timer_hz=self.config.timer_hz,
            mem_size=self.config.memory, wl_base=gboot.WORKLOAD_BASE,
            wl_size=self.config.memory - gboot.WORKLOAD_BASE,
            tsc_khz=self.vcpu.get_tsc_khz(), args=self.config.args)
        gboot.load_image(self.ram.mem, info, image)
        self.vcpu.set_sregs(gboot.entry_sregs(self.vcpu.get_sregs()))
        self.vcpu.set_regs(gboot.entry_regs())

    @classmethod
    def restore(cls, state: DomainState, memory, console: Console | None = None) -> "Domain":
        """A new domain from captured state and a copy of RAM, paused."""
        dom = cls(state.config, console)
        try:
            if len(memory) != dom.ram.size:
                raise DomainError(f"memory image is {len(memory)} bytes, domain has {dom.ram.size}")
            dom.ram.mem[:] = memory
            dom.apply(state)
        except BaseException:
            dom.destroy()
            raise
        return dom

    def apply(self, state: DomainState) -> None:
        """Apply captured vCPU and platform state to this paused, never-run domain
        (its memory is filled separately, e.g. page by page from a stream)."""
        if self.status != "paused" or self._thread is not None:
            raise DomainError("state can only be applied to a domain that has not run")
        if len(state.vcpus) != 1:
            raise DomainError(f"state has {len(state.vcpus)} vCPUs, this build runs 1")
        state.platform.apply(self.vm)
        state.vcpus[0].apply(self.vcpu)

    # -- memory and dirty log ---------------------------------------------
    @property
    def memory(self) -> memoryview:
        return self.ram.view()

    def set_dirty_logging(self, enabled: bool) -> None:
        self.vm.set_dirty_logging(RAM_SLOT, enabled)

    def fetch_dirty(self) -> DirtyBitmap:
        """Fetch and clear the pages of guest RAM dirtied since the last fetch."""
        return self.vm.get_dirty_log(RAM_SLOT)

    # -- state --------------------------------------------------------------
    def capture(self) -> DomainState:
        if self.status == "running":
            raise DomainError("capture needs a paused domain")
        return DomainState(config=self.config,
                           vcpus=[VcpuState.capture(self.vcpu, self.msr_indices)],
                           platform=PlatformState.capture(self.vm))

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
            self.status = "running"
            if self._thread is None:
                self._thread = threading.Thread(target=self._vcpu_loop, daemon=True,
                                                name=f"vcpu0-{self.config.name}")
                self._thread.start()
            self._cv.notify_all()

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPU; on return guest state is consistent and still."""
        with self._cv:
            if self.status != "running":
                return
            self._want_run = False
            self.vcpu.kick()
            if not self._cv.wait_for(lambda: not self._in_guest, timeout):
                raise DomainError(f"vCPU did not stop within {timeout}s")
            if self.status == "running":
                self.status = "paused"

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
        while True:
            ex = vcpu.run()
            if ex.reason == "stopped":
                return
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

    def _on_io(self, ex):
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
