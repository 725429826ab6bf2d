"""Loads the compiled extension and offers the one ioctl helper."""
try:
    from ._kvm import ffi, lib
except ImportError as exc:  # pragma: no cover - a setup problem, said plainly
    raise ImportError(
        "migrate.kvm._kvm is not built: run `make setup` (or `pip install -e .`)"
    ) from exc

from .errors import KvmError


def ioctl(fd: int, name: str, arg=None) -> int:
    """Issue ioctl ``name`` (a KVM_* constant name); raise KvmError on failure."""
    request = getattr(lib, name)
    if arg is None:
        rc = lib.ioctl(fd, ffi.cast("unsigned long", request), ffi.cast("unsigned long", 0))
    elif isinstance(arg, int):
        rc = lib.ioctl(fd, ffi.cast("unsigned long", request), ffi.cast("unsigned long", arg))
    else:
        rc = lib.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if rc < 0:
        raise KvmError(name, ffi.errno)
    return rc
