"""The vCPU file descriptor: run, kick, and one method per state ioctl."""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from ._lib import ffi, ioctl, lib
from .errors import KvmError, msr_refused
from .structs import prepare, from_plain, to_plain

DEBUG_CONSOLE_PORT = 0xE9

_signals_ready = False


def _init_signals() -> None:
    global _signals_ready
    if not _signals_ready:
        rc = lib.hvm_init_signals()
        if rc < 0:
            raise KvmError("sigaction", -rc)
        _signals_ready = True


@dataclass(frozen=True)
class VcpuExit:
    """Why ``Vcpu.run`` returned.

    ``reason`` is one of: ``stopped`` (kicked; state is consistent),
    ``console`` (``data`` holds debug-console output), ``io``, ``mmio``,
    ``hlt``, ``shutdown``, ``fail_entry``, ``internal_error``,
    ``system_event`` or ``unknown`` (``code`` holds the KVM exit number).
    """
    reason: str
    code: int = 0
    port: int = 0
    address: int = 0
    is_write: bool = False
    size: int = 0
    count: int = 0
    data: bytes = b""
    detail: int = 0


_EXIT_NAMES = {
    "KVM_EXIT_IO": "io", "KVM_EXIT_MMIO": "mmio", "KVM_EXIT_HLT": "hlt",
    "KVM_EXIT_SHUTDOWN": "shutdown", "KVM_EXIT_FAIL_ENTRY": "fail_entry",
    "KVM_EXIT_INTERNAL_ERROR": "internal_error", "KVM_EXIT_SYSTEM_EVENT": "system_event",
}
_EXIT_BY_CODE = {getattr(lib, name): short for name, short in _EXIT_NAMES.items()}
STOPPED = VcpuExit("stopped")


class Vcpu:
    def __init__(self, vm, vcpu_id: int, fd: int, console_port: int = DEBUG_CONSOLE_PORT):
        _init_signals()
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        size = vm.kvm.get_vcpu_mmap_size()
        self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._run_map)
        self._run_ptr = ffi.cast("struct kvm_run *", self._run_buf)
        self._runner = ffi.new("struct hvm_runner *")
        rc = lib.hvm_runner_init(self._runner, fd, self._run_ptr, size, console_port)
        if rc:
            raise KvmError("pthread_mutex_init", -rc)

    def close(self) -> None:
        if self.fd >= 0:
            lib.hvm_runner_destroy(self._runner)
            self._run_ptr = None
            ffi.release(self._run_buf)
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1

    # -- running ----------------------------------------------------------
    def run(self) -> VcpuExit:
        """Run until an exit Python must see (GIL released meanwhile)."""
        rc = lib.hvm_run(self._runner)
        if rc == lib.HVM_STOPPED:
            return STOPPED
        if rc == lib.HVM_CONSOLE:
            r = self._runner
            data = bytes(ffi.buffer(r.console, r.console_len))
            r.console_len = 0
            return VcpuExit("console", data=data)
        if rc < 0:
            raise KvmError("KVM_RUN", -rc)
        e = self._runner.exit
        reason = _EXIT_BY_CODE.get(e.reason, "unknown")
        if reason == "io":
            out = e.direction == lib.KVM_EXIT_IO_OUT
            data = bytes(ffi.buffer(self._runner.io_data, self._runner.io_len)) if out else b""
            return VcpuExit("io", e.reason, port=e.port, is_write=out, size=e.size,
                            count=e.count, data=data)
        if reason == "mmio":
            return VcpuExit("mmio", e.reason, address=e.address, is_write=bool(e.direction),
                            size=e.size, data=bytes(e.data)[:e.size] if e.direction else b"")
        return VcpuExit(reason, e.reason, detail=e.hw_reason)

    @property
    def exits(self) -> int:
        """KVM exits of this vCPU so far (interruptions by a kick not counted)."""
        return self._runner.exits

    def complete_io_in(self, data: bytes) -> None:
        lib.hvm_complete_io_in(self._runner, data, len(data))

    def complete_mmio_read(self, data: bytes) -> None:
        lib.hvm_complete_mmio_read(self._runner, data, len(data))

    def kick(self) -> None:
        """Make a current or the next ``run`` return ``stopped`` (sticky)."""
        lib.hvm_kick(self._runner)

    def unkick(self) -> None:
        lib.hvm_unkick(self._runner)

    def settle(self) -> None:
        """Re-enter KVM_RUN with immediate_exit set and return: completes a
        pending port/MMIO exit so the state read next is consistent."""
        self.kick()
        try:
            ex = self.run()
            if ex.reason != "stopped":
                raise KvmError("KVM_RUN", 4, f"settling returned {ex.reason}")
        finally:
            self.unkick()

    def take_console(self) -> bytes:
        """Console bytes the run loop holds back (a line without its end)."""
        r = self._runner
        data = bytes(ffi.buffer(r.console, r.console_len))
        r.console_len = 0
        return data

    # -- one method per state ioctl --------------------------------------
    def _get(self, ctype: str, name: str) -> dict:
        arg = ffi.new(ctype + " *")
        ioctl(self.fd, name, arg)
        return to_plain(arg[0])

    def _set(self, ctype: str, name: str, plain: dict) -> None:
        ioctl(self.fd, name, from_plain(ctype, plain))

    def get_regs(self) -> dict:
        return self._get("struct kvm_regs", "KVM_GET_REGS")

    def set_regs(self, regs: dict) -> None:
        self._set("struct kvm_regs", "KVM_SET_REGS", regs)

    def get_sregs(self) -> dict:
        return self._get("struct kvm_sregs", "KVM_GET_SREGS")

    def set_sregs(self, sregs: dict) -> None:
        self._set("struct kvm_sregs", "KVM_SET_SREGS", sregs)

    def get_sregs2(self) -> dict:
        return self._get("struct kvm_sregs2", "KVM_GET_SREGS2")

    def set_sregs2(self, sregs2: dict) -> None:
        self._set("struct kvm_sregs2", "KVM_SET_SREGS2", sregs2)

    def get_xsave(self) -> bytes:
        arg = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, "KVM_GET_XSAVE", arg)
        return bytes(ffi.buffer(arg))

    def set_xsave(self, region: bytes) -> None:
        arg = ffi.new("struct kvm_xsave *")
        if len(region) != ffi.sizeof(arg[0]):
            raise ValueError(f"xsave region must be {ffi.sizeof(arg[0])} bytes")
        ffi.buffer(arg)[:] = region
        ioctl(self.fd, "KVM_SET_XSAVE", arg)

    def get_xcrs(self) -> dict:
        return self._get("struct kvm_xcrs", "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: dict) -> None:
        self._set("struct kvm_xcrs", "KVM_SET_XCRS", xcrs)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; raise KvmError naming the first index KVM refused."""
        arg = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        arg.nmsrs = len(indices)
        for i, index in enumerate(indices):
            arg.entries[i].index = index
        n = ioctl(self.fd, "KVM_GET_MSRS", arg)
        if n != len(indices):
            raise KvmError("KVM_GET_MSRS", 5, f"MSR {indices[n]:#x} is not readable")
        return {arg.entries[i].index: arg.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int]) -> None:
        items = list(msrs.items())
        arg = ffi.new("struct kvm_msrs *", {"entries": len(items)})
        arg.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            arg.entries[i].index = index
            arg.entries[i].data = value
        n = ioctl(self.fd, "KVM_SET_MSRS", arg)
        if n != len(items):
            raise msr_refused(*items[n])

    def get_lapic(self) -> bytes:
        arg = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fd, "KVM_GET_LAPIC", arg)
        return bytes(ffi.buffer(arg))

    def set_lapic(self, regs: bytes) -> None:
        arg = ffi.new("struct kvm_lapic_state *")
        if len(regs) != ffi.sizeof(arg[0]):
            raise ValueError(f"LAPIC state must be {ffi.sizeof(arg[0])} bytes")
        ffi.buffer(arg)[:] = regs
        ioctl(self.fd, "KVM_SET_LAPIC", arg)

    def get_vcpu_events(self) -> dict:
        return self._get("struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: dict) -> None:
        self._set("struct kvm_vcpu_events", "KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        return self._get("struct kvm_mp_state", "KVM_GET_MP_STATE")["mp_state"]

    def set_mp_state(self, mp_state: int) -> None:
        self._set("struct kvm_mp_state", "KVM_SET_MP_STATE", {"mp_state": mp_state})

    def get_debugregs(self) -> dict:
        return self._get("struct kvm_debugregs", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs: dict) -> None:
        self._set("struct kvm_debugregs", "KVM_SET_DEBUGREGS", debugregs)

    def set_cpuid2(self, entries: list[tuple]) -> None:
        """KVM_SET_CPUID2 from ``(function, index, flags, eax, ebx, ecx, edx)`` tuples."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
        cpuid.nent = len(entries)
        for slot, (function, index, flags, eax, ebx, ecx, edx) in zip(cpuid.entries, entries):
            slot.function, slot.index, slot.flags = function, index, flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = eax, ebx, ecx, edx
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, "KVM_SET_TSC_KHZ", khz)


prepare("struct kvm_regs", "struct kvm_sregs", "struct kvm_sregs2", "struct kvm_xcrs", "struct kvm_vcpu_events", "struct kvm_mp_state", "struct kvm_debugregs")
