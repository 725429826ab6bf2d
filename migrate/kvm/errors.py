"""One error type for the KVM layer, naming the ioctl and the errno."""
import errno as _errno
import os


class KvmError(OSError):
    """An ioctl failed: ``KvmError("KVM_SET_REGS", errno)``."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        self.ioctl, self.detail = ioctl, detail
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.args[1]


def msr_refused(index: int, value: int) -> KvmError:
    """KVM_SET_MSRS set the MSRs before ``index`` and stopped there: it took not ``value``."""
    return KvmError("KVM_SET_MSRS", _errno.EINVAL, f"MSR {index:#x} refused value {value:#x}")


class KvmUnavailable(KvmError):
    """/dev/kvm is missing or cannot be opened."""
