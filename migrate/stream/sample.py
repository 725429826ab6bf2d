"""A small, deterministic stream for one HVM+stub pair (specs/stream-format.md, section
"Example"): every record type once, used by the golden fixture, the tests and the fuzz
corpus. Pure data, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any

from migrate.stream.cpu import MSR_FEATURE, CpuidPolicy, CpuModel, MsrPolicy
from migrate.stream.hvm import CODECS, PLATFORM_CODECS, HvmState
from migrate.stream.pages import PAGE_SIZE, ZERO_PAGE
from migrate.stream.records import (
    OPTIONAL, Creator, DeviceState, DomainConfig, MemoryLayout, RecordType, Vm,
)
from migrate.stream.writer import StreamWriter

GUEST_PAGES = 24
STUB_PAGES = 8
SAMPLE_ARCH_CAPABILITIES = 0x29


def pattern(seed: int, size: int) -> bytes:
    """Deterministic bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def numbered(value: Any, seed: int) -> Any:
    """Replace every int in a zero state by a small deterministic number."""
    if isinstance(value, dict):
        return {key: numbered(item, seed * 31 + i) for i, (key, item) in enumerate(value.items())}
    if isinstance(value, list):
        return [numbered(item, seed * 17 + i) for i, item in enumerate(value)]
    return (seed * 2654435761) % 200


def sample_state(record_type: RecordType, seed: int) -> Any:
    """A plausible KVM-shaped state for one HVM record type; padding stays zero."""
    codec = CODECS[record_type]
    if record_type is RecordType.VCPU_MSRS:
        return {0x10: 0x1234 + seed, 0x10A: SAMPLE_ARCH_CAPABILITIES, 0xC000_0080: 0x500,
                0xC000_0100: 0x7FFF_0000 + seed}
    if record_type is RecordType.VCPU_MP_STATE:
        return seed % 5
    if record_type in (RecordType.VCPU_XSAVE, RecordType.VCPU_LAPIC):
        return pattern(seed, codec.struct.size - 8)
    state = numbered(codec.layout.zero(), seed)
    if record_type is RecordType.VCPU_XCRS:     # nr_xcrs used entries, the rest zero, no flags
        state["nr_xcrs"], state["flags"] = 1 + seed % 3, 0
        for xcr in state["xcrs"][state["nr_xcrs"]:]:
            xcr["xcr"] = xcr["value"] = 0
    if record_type is RecordType.VCPU_PDPTRS:   # only bit 0 is defined
        state["flags"] = seed & 1
    return _zero_padding(state, codec.layout)


def _zero_padding(state: Any, layout: Any) -> Any:
    for field in layout.fields:
        if not field.carried:
            state[field.name] = field.zero()
        elif field.nested is not None:
            items = state[field.name] if field.count else [state[field.name]]
            for item in items:
                _zero_padding(item, field.nested)
    return state


GUEST_MEMORY = 16 << 20        # the smallest guest a restore accepts
STUB_MEMORY_PAGES = 2048       # the stub's RAM (specs/stream-format.md, "Restore")


def sample_config() -> dict:
    """A DOMAIN_CONFIG map that follows the key table of the spec."""
    return {"name": "sample", "workload": "idle", "memory": GUEST_MEMORY, "args": [42, 0, 0, 0, 0, 0, 0, 0],
            "timer_hz": 100, "stub": True, "disk": None, "stub_build": "0123456789abcdef"}


def sample_devices() -> list[DeviceState]:
    """The stub's two devices, with the fields of specs/device-state.md, version 1."""
    uart = {"ier": 1, "lcr": 3, "mcr": 11, "lsr_err": 0, "msr": 0, "scr": 0, "dll": 1, "dlm": 0,
            "fcr": 1, "thr_ipending": 1, "irq_level": 0, "rx_fifo": b"hello"}
    blk = {"status": 15, "dev_features_sel": 1, "drv_features_sel": 1, "queue_sel": 0,
           "driver_features": (1 << 32) | (1 << 9), "queue_num": 64, "queue_ready": 1,
           "desc": 0x7000, "avail": 0x7400, "used": 0x8000, "last_avail": 7, "used_idx": 7, "isr": 0,
           "config_generation": 0, "irq_level": 0, "requests": 7, "errors": 0, "capacity": 2048}
    return [DeviceState("uart16550a", 0, 1, 1, uart), DeviceState("virtio-blk", 0, 1, 1, blk)]


def sample_records(vcpus: int = 2, guest_pages: int = GUEST_PAGES, stub_pages: int = STUB_PAGES) -> list:
    """The records of the sample stream before its pages, in order (``guest_pages`` and
    ``stub_pages`` are the pages sent; the layouts are those of the configuration)."""
    config = sample_config()
    records: list = [
        DomainConfig(config),
        Creator("hvm-migrate sample"),
        *sample_cpu(Vm.GUEST),
        *sample_cpu(Vm.STUB),
        MemoryLayout.flat(Vm.GUEST, max(config["memory"] // PAGE_SIZE, guest_pages)),
        MemoryLayout.flat(Vm.STUB, max(STUB_MEMORY_PAGES, stub_pages)),
    ]
    for vcpu in range(vcpus):
        for record_type in CODECS:      # the mandatory ones: the golden stream predates the optional
            if record_type not in PLATFORM_CODECS and not record_type & OPTIONAL:
                records.append(HvmState(record_type, Vm.GUEST, vcpu, sample_state(record_type, vcpu + record_type)))
    for record_type in PLATFORM_CODECS:
        records.append(HvmState(record_type, Vm.GUEST, None, sample_state(record_type, record_type)))
    records.append(HvmState(RecordType.VCPU_REGS, Vm.STUB, 0, sample_state(RecordType.VCPU_REGS, 99)))
    records += sample_devices()
    return records


def sample_cpu(vm: Vm) -> list:
    """A VM's three CPU records (version 2); its MSR_POLICY matches sample_state's MSRs."""
    return [
        CpuModel(vm, "baseline", 2_100_000 + vm, strict_tsc=False, host_vendor="GenuineIntel",
                 host_signature=0x50654),
        CpuidPolicy(vm, ((0, 0, 0, 7, 0x756E6547, 0x6C65746E, 0x49656E69),
                         (1, 0, 0, 0xF61, 0x10800, 0x80202000, 0x0789FBFF),
                         (7, 0, 1, 0, 2, 0, 0), (7, 1, 1, 0, 0, 0, 0))),
        MsrPolicy(vm, ((0x10, 0, 0), (0x10A, MSR_FEATURE, SAMPLE_ARCH_CAPABILITIES),
                       (0xC000_0080, 0, 0), (0xC000_0100, 0, 0))),
    ]


def sample_pages(space: Vm, nr_pages: int, seed: int) -> list[tuple[int, bytes]]:
    """Every third page zero, the rest patterned or repetitive (so zstd has work)."""
    pages = []
    for pfn in range(nr_pages):
        if pfn % 3 == 0:
            pages.append((pfn, ZERO_PAGE))
        elif pfn % 3 == 1:
            pages.append((pfn, pattern(seed * 1000 + pfn, PAGE_SIZE)))
        else:
            pages.append((pfn, bytes([pfn & 0xFF]) * PAGE_SIZE))
    return pages


def sample_stream(vcpus: int = 2, guest_pages: int = GUEST_PAGES, stub_pages: int = STUB_PAGES) -> bytes:
    """The whole sample stream: records, then guest pages (plain, then a zstd resend of
    some), stub pages (zstd), END."""
    writer = StreamWriter()
    out = [writer.start()]
    out += [writer.record(record) for record in sample_records(vcpus, guest_pages, stub_pages)]
    guest = sample_pages(Vm.GUEST, guest_pages, 1)
    out.append(writer.pages(Vm.GUEST, guest))
    out.append(writer.pages(Vm.GUEST, guest[guest_pages // 8:guest_pages // 3 + 1], compressed=True))
    out.append(writer.pages(Vm.STUB, sample_pages(Vm.STUB, stub_pages, 2), compressed=True))
    out.append(writer.finish())
    return b"".join(out)
