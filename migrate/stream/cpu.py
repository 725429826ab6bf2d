"""CPU description records, version 2 (specs/stream-format.md, section "CPU records").

Three records per VM say what CPU the VM was given: CPU_MODEL (the model's name, the TSC
frequency and whether it is promised, the saving host's CPU), CPUID_POLICY (the CPUID
leaves the VM's vCPUs were given) and MSR_POLICY (the MSRs its VCPU_MSRS records carry,
with the values of the feature MSRs). The stream layer only checks their form; what they
mean for a restore is specs/cpu-models.md (``migrate.cpu``).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from migrate.config import MODEL_NAME as _MODEL_NAME
from migrate.stream.errors import StreamError
from migrate.stream.records import MAX_MSRS, RecordType, Vm, expect_length, vm_of

MAX_CPUID_ENTRIES = 256
CPU_MODEL = struct.Struct("<II16sI12sII")  # vm, tsc_khz, model, flags, host_vendor, host_signature, reserved
CPU_TSC_STRICT = 1
CPU_MODEL_FLAGS = CPU_TSC_STRICT
COUNT_HEADER = struct.Struct("<II")  # vm, count
CPUID_ENTRY = struct.Struct("<7I")  # function, index, flags, eax, ebx, ecx, edx
CPUID_SIGNIFICANT_INDEX = 1
MSR_POLICY_ENTRY = struct.Struct("<IIQ")  # index, flags, value
MSR_FEATURE = 1
MODEL_NAME = re.compile(_MODEL_NAME.pattern.encode())    # a CPU model's name, as the configuration has it
VENDOR = re.compile(rb"(?:[\x20-\x7e]{12}|\x00{12})\Z")


def _counted(body: bytes, entry: struct.Struct, cap: int, what: str) -> tuple[Vm, list[tuple]]:
    if len(body) < COUNT_HEADER.size:
        raise StreamError(f"{what} body is {len(body)} bytes, shorter than its header")
    vm, count = COUNT_HEADER.unpack_from(body)
    if count > cap:
        raise StreamError(f"{what} count {count} exceeds {cap}")
    need = COUNT_HEADER.size + count * entry.size
    if len(body) != need:
        raise StreamError(f"{what} body is {len(body)} bytes, {count} entries need {need}")
    return vm_of(vm), list(entry.iter_unpack(body[COUNT_HEADER.size:]))


@dataclass(frozen=True)
class CpuModel:
    """The model a VM's CPU was made from, its TSC and the saving host's CPU."""

    TYPE: ClassVar[RecordType] = RecordType.CPU_MODEL
    vm: Vm
    model: str
    tsc_khz: int
    strict_tsc: bool
    host_vendor: str
    host_signature: int

    def pack(self) -> bytes:
        name, vendor = self.model.encode("ascii"), self.host_vendor.encode("ascii")
        if not MODEL_NAME.match(name) or not VENDOR.match(vendor.ljust(12, b"\0")):
            raise ValueError(f"CPU model {self.model!r} or vendor {self.host_vendor!r} not allowed")
        return CPU_MODEL.pack(self.vm, self.tsc_khz, name, CPU_TSC_STRICT if self.strict_tsc else 0,
                              vendor, self.host_signature, 0)

    @classmethod
    def unpack(cls, body: bytes) -> CpuModel:
        expect_length(body, CPU_MODEL, "CPU_MODEL")
        vm, tsc_khz, name, flags, vendor, signature, reserved = CPU_MODEL.unpack(body)
        if reserved:
            raise StreamError(f"CPU_MODEL reserved field is 0x{reserved:x}, must be zero")
        if flags & ~CPU_MODEL_FLAGS:
            raise StreamError(f"CPU_MODEL flags 0x{flags:x} has unknown bits")
        if tsc_khz == 0:
            raise StreamError("CPU_MODEL tsc_khz is 0")
        model = name.rstrip(b"\0")
        if not MODEL_NAME.match(model) or b"\0" in model:
            raise StreamError(f"CPU_MODEL model name {name!r} is not a model name")
        if not VENDOR.match(vendor):
            raise StreamError(f"CPU_MODEL host vendor {vendor!r} is not 12 printable ASCII bytes")
        return cls(vm_of(vm), model.decode(), tsc_khz, bool(flags & CPU_TSC_STRICT),
                   vendor.rstrip(b"\0").decode(), signature)


@dataclass(frozen=True)
class CpuidPolicy:
    """The CPUID leaves of a VM: ``(function, index, flags, eax, ebx, ecx, edx)`` tuples in
    strictly ascending (function, index) order."""

    TYPE: ClassVar[RecordType] = RecordType.CPUID_POLICY
    vm: Vm
    entries: tuple[tuple[int, int, int, int, int, int, int], ...]

    def pack(self) -> bytes:
        if not 1 <= len(self.entries) <= MAX_CPUID_ENTRIES:
            raise ValueError(f"{len(self.entries)} CPUID entries, 1..{MAX_CPUID_ENTRIES} allowed")
        _check_cpuid(self.entries, ValueError)
        return COUNT_HEADER.pack(self.vm, len(self.entries)) + b"".join(
            CPUID_ENTRY.pack(*entry) for entry in self.entries)

    @classmethod
    def unpack(cls, body: bytes) -> CpuidPolicy:
        vm, entries = _counted(body, CPUID_ENTRY, MAX_CPUID_ENTRIES, "CPUID_POLICY")
        if not entries:
            raise StreamError("CPUID_POLICY has no entries")
        _check_cpuid(entries, StreamError)
        return cls(vm, tuple(entries))


def _check_cpuid(entries, error: type[Exception]) -> None:
    previous = None
    for function, index, flags, *_ in entries:
        if flags & ~CPUID_SIGNIFICANT_INDEX:
            raise error(f"CPUID_POLICY leaf 0x{function:x}.{index} has unknown flags 0x{flags:x}")
        if not flags & CPUID_SIGNIFICANT_INDEX and index:
            raise error(f"CPUID_POLICY leaf 0x{function:x} has index {index} without SIGNIFICANT_INDEX")
        if previous is not None and (function, index) <= previous:
            raise error(f"CPUID_POLICY leaves not strictly ascending at 0x{function:x}.{index}")
        previous = (function, index)


@dataclass(frozen=True)
class MsrPolicy:
    """The MSRs a VM's VCPU_MSRS records carry: ``(index, flags, value)`` in strictly
    ascending index order; ``value`` is the feature value of a MSR_FEATURE entry, else 0."""

    TYPE: ClassVar[RecordType] = RecordType.MSR_POLICY
    vm: Vm
    entries: tuple[tuple[int, int, int], ...]

    def pack(self) -> bytes:
        if len(self.entries) > MAX_MSRS:
            raise ValueError(f"{len(self.entries)} MSRs, at most {MAX_MSRS}")
        _check_msrs(self.entries, ValueError)
        return COUNT_HEADER.pack(self.vm, len(self.entries)) + b"".join(
            MSR_POLICY_ENTRY.pack(*entry) for entry in self.entries)

    @classmethod
    def unpack(cls, body: bytes) -> MsrPolicy:
        vm, entries = _counted(body, MSR_POLICY_ENTRY, MAX_MSRS, "MSR_POLICY")
        _check_msrs(entries, StreamError)
        return cls(vm, tuple(entries))

    def features(self) -> dict[int, int]:
        return {index: value for index, flags, value in self.entries if flags & MSR_FEATURE}


def _check_msrs(entries, error: type[Exception]) -> None:
    previous = -1
    for index, flags, value in entries:
        if flags & ~MSR_FEATURE:
            raise error(f"MSR_POLICY MSR 0x{index:x} has unknown flags 0x{flags:x}")
        if not flags & MSR_FEATURE and value:
            raise error(f"MSR_POLICY MSR 0x{index:x} carries a value but is not a feature MSR")
        if index <= previous:
            raise error(f"MSR_POLICY indices not strictly ascending at 0x{index:x}")
        previous = index
