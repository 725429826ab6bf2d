"""Can this host restore a stream? (``hvm stream check``, ``hvm restore`` before it builds
anything; specs/cpu-models.md, "Compatibility").

:func:`read_head` reads a stream file up to its first MEMORY_LAYOUT: the configuration and
the CPU records, which version 2 puts before any memory. :func:`check` compares them with
this host and says what stops a restore here and what the guest would notice. A version-1
stream describes no CPU: it restores with this host's (``migrate.cpu.legacy_policy``), and
only its saved MSRs and XSAVE state, at its end, can stop that; :func:`check` reads them
there when it must.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..cpu import (
    CpuModelError, CpuPolicy, HostCpu, compatibility, implied_vendor, legacy_policy, msrs_to_apply,
)
from ..stream import (
    DONE, NEED_DATA, CpuidPolicy, CpuModel, HvmState, MemoryLayout, MsrPolicy, RecordType,
    StreamReader, Vm,
)
from ..stream import DomainConfig as ConfigRecord
from .files import file_chunks
from .state import CpuCollector, RestoreError, config_from_record

XSTATE_BV_OFFSET = 512          # the XSAVE header's first field, in the XSAVE area


@dataclass
class StreamHead:
    """What a stream says before its memory."""
    version: int
    config: ConfigRecord
    cpus: dict[Vm, CpuPolicy]            # empty for version 1


def read_head(path: str | os.PathLike | bytes) -> StreamHead:
    """The header, DOMAIN_CONFIG and CPU records of a stream file (or of the bytes a
    stream from a pipe began with), read (and checked) up to its first MEMORY_LAYOUT."""
    reader, config, cpus = StreamReader(), None, CpuCollector()
    for data in [path] if isinstance(path, bytes) else file_chunks(path, 64 << 10):
        reader.feed(data)
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            if isinstance(record, ConfigRecord):
                config = record
            elif isinstance(record, (CpuModel, CpuidPolicy, MsrPolicy)):
                cpus.add(record)
            elif isinstance(record, MemoryLayout):
                if config is None:       # the reader refuses this; kept for the type checker
                    break
                return StreamHead(reader.header.version, config,
                                  {vm: p for vm in Vm if (p := cpus.policy(vm)) is not None})
    reader.eof()
    raise RestoreError(f"{path}: stream ends before its first MEMORY_LAYOUT")


@dataclass
class Report:
    """``problems``: why this host cannot restore the stream (none: it can). ``notes``:
    what the guest will notice if it is restored here. ``facts``: what was compared."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(path: str | os.PathLike | bytes, host: HostCpu, disk_map: dict[str, str] | None = None,
          net_map: dict[str, str] | None = None) -> Report:
    """Everything this host can know about restoring ``path`` without building anything
    (``path`` bytes: a stream's head read from a pipe, which cannot be read again).
    ``disk_map``: {saved disk path: disk here}; ``net_map``: {saved bridge or TAP device:
    the one here}."""
    head = read_head(path)
    report = Report(facts={"version": head.version, "host_vendor": host.vendor,
                           "host_tsc_khz": host.tsc_khz, "tsc_scaling": host.tsc_scaling})
    try:
        config = config_from_record(head.config)
    except RestoreError as exc:
        report.problems.append(str(exc))
        return report
    report.facts.update(name=config.name, workload=config.workload, memory=config.memory,
                        stub=config.stub, disk=config.disk)
    check_disk(config.disk, disk_map or {}, report)
    check_nic(config.net, net_map or {}, report)
    vms = {Vm.GUEST: "guest"} | ({Vm.STUB: "stub"} if config.stub else {})
    settled = True          # nothing depends on the saved MSR values
    if head.version >= 2:
        for vm, what in vms.items():
            policy = head.cpus.get(vm)
            if policy is None:
                report.problems.append(f"version-2 stream lacks the {what}'s CPU records")
                continue
            report.facts[f"{what}_cpu"] = _cpu_facts(policy)
            found = compatibility(policy, host, what)
            report.problems += found.problems
            report.notes += found.notes
            settled = settled and not found.dropped_msrs
    if (head.version < 2 or not settled) and isinstance(path, bytes):
        report.notes.append("read from a pipe: the saved MSRs (at its end) are checked as it is restored")
    elif head.version < 2 or not settled:
        _check_saved_msrs(path, head, host, vms, report)
    return report


def check_disk(disk: str | None, disk_map: dict[str, str], report: Report) -> str | None:
    """The disk a restore here would open: the mapped one, else the saved path."""
    unused = set(disk_map) - {disk}
    if unused:
        report.problems.append(f"--disk-map {', '.join(sorted(unused))}: the stream's disk is "
                               f"{disk or 'none'}")
    if disk is None:
        return None
    target = disk_map.get(disk, disk)
    if not os.path.isfile(target):
        if target == disk:
            report.problems.append(f"the saved disk {disk} is not on this host: give "
                                   f"--disk-map {disk}=DST")
        else:
            report.problems.append(f"--disk-map {disk}={target}: {target} is not a file")
    report.facts["disk_here"] = target
    return target


def check_nic(net: dict | None, net_map: dict[str, str], report: Report) -> None:
    """``net_here``: the bridge or TAP device a restore here would attach the NIC to, the
    mapped one, else the saved name (whether it exists is the NIC back end's to say when
    it opens it: a TAP device may be made then)."""
    saved = net["name"] if net else None
    unused = set(net_map) - {saved}
    if unused:
        nic = f"on {net['link']} {saved}" if net else "none"
        report.problems.append(f"--net-map {', '.join(sorted(unused))}: the stream's NIC is {nic}")
    if net is not None:
        report.facts["net_here"] = net_map.get(saved, saved)


def _cpu_facts(policy: CpuPolicy) -> dict:
    return {"model": policy.model, "vendor": policy.vendor, "tsc_khz": policy.tsc_khz,
            "strict_tsc": policy.strict_tsc, "saved_on": policy.host_vendor,
            "cpuid_leaves": len(policy.cpuid), "msrs": len(policy.msrs)}


def _check_saved_msrs(path, head: StreamHead, host: HostCpu, vms: dict, report: Report) -> None:
    """Read the saved MSRs and XSAVE state (the stream's end) and check them as a restore
    here would apply them: needed for version 1, and for MSRs this host lacks."""
    legacy = legacy_policy(host)
    saved: dict[tuple[Vm, int], dict] = {}
    xstate: dict[tuple[Vm, int], int] = {}
    reader = StreamReader(raw_pages=True)
    for data in file_chunks(path):
        reader.feed(data)
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            if isinstance(record, HvmState) and record.vcpu_id is not None:
                if record.type is RecordType.VCPU_MSRS:
                    saved[(record.vm, record.vcpu_id)] = record.state
                elif record.type is RecordType.VCPU_XSAVE:
                    xstate[(record.vm, record.vcpu_id)] = struct.unpack_from(
                        "<Q", record.state, XSTATE_BV_OFFSET)[0]
    reader.eof()
    if head.version < 2:
        vendor = implied_vendor({i for msrs in saved.values() for i in msrs})
        report.facts["guest_cpu"] = {"model": "none (version 1)", "implied_vendor": vendor or "unknown"}
        report.notes.append("a version-1 stream describes no CPU: it restores with this host's "
                            f"({host.vendor}, host model); its MSRs point at "
                            f"{vendor or 'no particular vendor'}")
        report.notes += compatibility(legacy, host).notes
    supported_xcr0 = host.reg(0xD, 0, "eax") | host.reg(0xD, 0, "edx") << 32 | 0x3
    for (vm, vcpu_id), msrs in sorted(saved.items()):
        if vm not in vms:
            continue
        what = f"{vms[vm]} vcpu {vcpu_id}"
        try:
            _, notes = msrs_to_apply(head.cpus.get(vm, legacy), msrs, host)
            report.notes += [f"{what}: {note}" for note in notes]
        except CpuModelError as exc:
            report.problems.append(f"{what}: {exc}")
        extra = xstate.get((vm, vcpu_id), 0) & ~supported_xcr0
        if extra:
            report.problems.append(f"{what}: its XSAVE state holds components {extra:#x} this "
                                   "host does not offer")

