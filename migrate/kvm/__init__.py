"""The KVM layer: system -> VM -> vCPU through cffi (API mode).

Only this package issues ioctls.  One class per kind of file descriptor
(:class:`Kvm`, :class:`Vm`, :class:`Vcpu`); only a parent creates its
children; one method per ioctl, named after it, holding no policy.  Policy
(run loops, pausing, dirty merging) lives in :mod:`migrate.domain`.
"""
from .errors import KvmError, KvmUnavailable
from .dirty import DirtyBitmap, DirtyLog, pfns_bitmap
from .system import Kvm
from .vm import HugePagesError, MemorySlot, Vm, huge_pages_free
from .vcpu import Vcpu, VcpuExit
from .state import PlatformState, VcpuState, saveable_msrs

__all__ = [
    "DirtyBitmap", "DirtyLog", "HugePagesError", "Kvm", "KvmError", "KvmUnavailable", "MemorySlot",
    "huge_pages_free",
    "PlatformState", "Vcpu", "VcpuExit", "VcpuState", "Vm", "pfns_bitmap", "saveable_msrs",
]
