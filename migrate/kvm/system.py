"""The system file descriptor: /dev/kvm."""
from __future__ import annotations

import errno
import os

from ..config import DEV_KVM
from ._lib import ffi, ioctl, lib
from .errors import KvmError, KvmUnavailable

KVM_API_VERSION = 12


class Kvm:
    """An open /dev/kvm.  Creates VMs; answers capability questions."""

    def __init__(self, path: str = DEV_KVM):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable("open", errno.ENOENT,
                                 f"{path} does not exist: this host has no KVM") from None
        except PermissionError:
            raise KvmUnavailable("open", errno.EACCES,
                                 f"no permission to open {path} (are you in the kvm group?)") from None
        version = self.get_api_version()
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable("KVM_GET_API_VERSION", errno.EINVAL,
                                 f"API version {version}, expected {KVM_API_VERSION}")
        self._msr_index_list: list[int] | None = None
        self._caps: dict[str, bool] = {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get_api_version(self) -> int:
        return ioctl(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    def get_vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self, max_entries: int = 256) -> list[tuple]:
        """KVM_GET_SUPPORTED_CPUID as plain data: one ``(function, index, flags, eax, ebx,
        ecx, edx)`` tuple per entry, in KVM's order."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"entries": max_entries})
        cpuid.nent = max_entries
        ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))]

    def get_msr_index_list(self) -> list[int]:
        if self._msr_index_list is None:
            self._msr_index_list = self._msr_list("KVM_GET_MSR_INDEX_LIST")
        return list(self._msr_index_list)

    def get_msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the MSRs that describe the CPU (read with
        :meth:`get_feature_msrs`); empty where KVM_CAP_GET_MSR_FEATURES is missing."""
        if not self.check_extension(lib.KVM_CAP_GET_MSR_FEATURES):
            return []
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, name: str) -> list[int]:
        n = 512
        lst = ffi.new("struct kvm_msr_list *", {"indices": n})
        lst.nmsrs = n
        ioctl(self.fd, name, lst)
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def get_feature_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS on the system fd: the values of feature MSRs KVM can give a guest.
        An index KVM does not answer for is left out."""
        arg = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        arg.nmsrs = len(indices)
        for i, index in enumerate(indices):
            arg.entries[i].index = index
        n = ioctl(self.fd, "KVM_GET_MSRS", arg) if indices else 0
        return {arg.entries[i].index: arg.entries[i].data for i in range(n)}

    def create_vm(self) -> "Vm":
        from .vm import Vm
        fd = ioctl(self.fd, "KVM_CREATE_VM", 0)
        try:
            return Vm(self, fd)
        except BaseException:
            os.close(fd)
            raise

    def has(self, cap: str) -> bool:
        """Whether KVM has capability ``cap`` (a KVM_CAP_* name), asked once."""
        if cap not in self._caps:
            self._caps[cap] = bool(self.check_extension(getattr(lib, cap)))
        return self._caps[cap]

    def require(self, *caps: str) -> None:
        """Raise KvmUnavailable naming the first missing capability."""
        for cap in caps:
            if not self.check_extension(getattr(lib, cap)):
                raise KvmUnavailable("KVM_CHECK_EXTENSION", errno.ENOSYS, f"{cap} missing")


__all__ = ["Kvm", "KvmError", "KvmUnavailable"]
