"""The device-model stub: a small VM that owns one HVM guest's devices.

Guest port/MMIO exits become ioreqs in the stub's ioreq page
(specs/ioreq.md); the stub emulates a 16550A UART and a virtio-mmio block
device, reaching guest RAM through a window (the guest's memfd as a second
memory slot of the stub VM) and disk blocks through the host block back end.
"""
from .stub import Stub, StubError, StubState, stub_build_id

__all__ = ["Stub", "StubError", "StubState", "stub_build_id"]
