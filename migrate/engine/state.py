"""DomainState <-> stream records, in one place (specs/stream-format.md, sections
"DOMAIN_CONFIG", "CPU records" and "HVM context records").

Save turns a :class:`~migrate.domain.DomainState` into a DOMAIN_CONFIG record and one
HvmState record per kind of vCPU and platform state; restore collects those records
(in any order, as the format allows) and gives a DomainState back once every record a
restore needs has arrived.
"""
from __future__ import annotations

from dataclasses import fields

from ..cpu import CpuidEntry, CpuPolicy, MsrEntry
from ..domain import DomainConfig, DomainState
from ..kvm import PlatformState, VcpuState
from ..stream import CpuidPolicy, CpuModel, MsrPolicy
from ..stream import DomainConfig as ConfigRecord
from ..stream import DeviceBodies, HvmState, RecordType, StreamError, Vm
from ..stream.hvm import HvmBodies
from ..stream.records import CPU_RECORDS
from ..stub import StubState
from ..stream.cpu import MSR_FEATURE
from ..stream.hvm import VCPU_FIELDS
from ..stream.records import OPTIONAL

# vCPU record type -> VcpuState attribute, declared with the records (stream/hvm.py)
VCPU_RECORDS = VCPU_FIELDS
# platform record type -> PlatformState attribute; PIC carries two attributes
PLATFORM_RECORDS = {RecordType.IOAPIC: "ioapic", RecordType.PIT: "pit", RecordType.CLOCK: "clock"}

_CONFIG_TYPES = {"name": str, "workload": str, "memory": int, "args": list, "timer_hz": int}


class RestoreError(Exception):
    """A stream is well formed but cannot become a domain here (missing state, a
    configuration this build refuses, a part of the pair it cannot restore yet)."""


# DomainConfig fields not in DOMAIN_CONFIG: the CPU model (the guest's CPU_MODEL carries it) and
# the backing of guest RAM (huge pages or not: each host chooses its own)
NOT_IN_CONFIG = {"cpu", "hugepages"}


def config_record(config: DomainConfig, stub_build: str = "", disk_id: dict | None = None,
                  net_id: dict | None = None) -> ConfigRecord:
    """DOMAIN_CONFIG: every DomainConfig field but the CPU model (in CPU_MODEL), plus
    ``stub_build`` (the build id of the stub image whose memory the stream carries) for a
    domain with a stub, and ``disk_id`` (``engine.compat.disk_identity`` of its disk image,
    nil without one: what lets a restore open the saved path; specs/stream-format.md) and
    ``net_id`` (``engine.compat.interface_identity`` of its NIC's interface, nil without a
    NIC: what lets a restore attach to an interface of that name that exists)."""
    raw = {f.name: getattr(config, f.name) for f in fields(DomainConfig) if f.name not in NOT_IN_CONFIG}
    if stub_build:
        raw["stub_build"] = stub_build
    raw["disk_id"], raw["net_id"] = disk_id, net_id       # None without a disk, a NIC (save.disk_id_of)
    return ConfigRecord(raw)


def stub_build_of(record: ConfigRecord) -> str:
    value = record.config.get("stub_build", "")
    if not isinstance(value, str) or len(value) > 64:
        raise RestoreError("DOMAIN_CONFIG stub_build must be a short string")
    return value


def config_from_record(record: ConfigRecord, name: str | None = None) -> DomainConfig:
    """The domain configuration a DOMAIN_CONFIG record holds. Keys this build does not
    know are ignored (new keys need no version bump); the five base keys must be there
    with their types; other keys that name DomainConfig fields are passed on (the domain
    validates them). A stream without a ``stub`` key was written by a build without
    device-model stubs: it restores as a domain without one."""
    raw = record.config
    missing = [key for key in _CONFIG_TYPES if key not in raw]
    if missing:
        raise RestoreError(f"DOMAIN_CONFIG lacks {', '.join(missing)}")
    for key, kind in _CONFIG_TYPES.items():
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RestoreError(f"DOMAIN_CONFIG {key} is {type(value).__name__}, expected {kind.__name__}")
    if not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 1 << 64 for a in raw["args"]):
        raise RestoreError("DOMAIN_CONFIG args must be unsigned 64-bit integers")
    if not isinstance(raw.get("stub", False), bool):
        raise RestoreError("DOMAIN_CONFIG stub must be a boolean")
    if raw.get("disk") is not None and (not isinstance(raw["disk"], str) or "\0" in raw["disk"]):
        raise RestoreError("DOMAIN_CONFIG disk must be a path string or nil")
    if raw.get("net") is not None and not isinstance(raw["net"], dict):
        raise RestoreError("DOMAIN_CONFIG net must be a map or nil")
    known = {f.name for f in fields(DomainConfig)} - NOT_IN_CONFIG
    extra = {key: value for key, value in raw.items() if key in known and key not in _CONFIG_TYPES}
    extra.setdefault("stub", False)       # a stream from before stubs: none
    try:
        config = DomainConfig(name=name or raw["name"], workload=raw["workload"], memory=raw["memory"],
                              args=list(raw["args"]), timer_hz=raw["timer_hz"], **extra)
        config.validate()
    except Exception as exc:      # DomainError, TypeError: it is the stream's configuration
        raise RestoreError(f"DOMAIN_CONFIG refused: {exc}") from None
    return config


def cpu_records(policy: CpuPolicy, vm: Vm) -> list:
    """The three CPU records of one VM."""
    return [
        CpuModel(vm, policy.model, policy.tsc_khz, policy.strict_tsc, policy.host_vendor,
                 policy.host_signature),
        CpuidPolicy(vm, tuple(tuple(entry) for entry in policy.cpuid)),
        MsrPolicy(vm, tuple((m.index, MSR_FEATURE if m.feature else 0, m.value) for m in policy.msrs)),
    ]


def domain_cpus(domain) -> dict[Vm, CpuPolicy]:
    """The CPU policies of a domain's VMs, by stream VM id."""
    out = {Vm.GUEST: domain.cpu}
    if domain.stub is not None:
        out[Vm.STUB] = domain.stub.cpu
    return out


def cpu_bodies(policies: dict[Vm, CpuPolicy]) -> dict[str, list[bytes]]:
    """The CPU records of each VM as record bodies, keyed "guest"/"stub" (a relocation's
    HELLO carries them: specs/relocation.md)."""
    return {vm.name.lower(): [record.pack() for record in cpu_records(policy, vm)]
            for vm, policy in policies.items()}


def policies_from_bodies(value: object) -> dict[Vm, CpuPolicy]:
    """:func:`cpu_bodies` back, every body checked as the stream reader checks it; anything
    wrong is a StreamError."""
    if not isinstance(value, dict) or not value:
        raise StreamError("CPU description is not a non-empty map")
    collector = CpuCollector()
    for name, bodies in value.items():
        vm = {"guest": Vm.GUEST, "stub": Vm.STUB}.get(name)
        if vm is None or not isinstance(bodies, list) or len(bodies) != 3 or \
                not all(isinstance(b, bytes) for b in bodies):
            raise StreamError(f"CPU description {name!r} is not three record bodies of the guest or stub")
        for kind, body in zip((CpuModel, CpuidPolicy, MsrPolicy), bodies):
            record = kind.unpack(body)
            if record.vm is not vm:
                raise StreamError(f"CPU description {name!r} holds a {kind.TYPE.name} of {record.vm.name}")
            collector.add(record)
    return {vm: collector.policy(vm) for vm in collector.records}


class CpuCollector:
    """The CPU records of each VM as they arrive; :meth:`policy` builds a VM's CpuPolicy
    (None if the stream has no CPU records for it, as version 1 streams have none)."""

    def __init__(self) -> None:
        self.records: dict[Vm, dict[RecordType, object]] = {}

    def add(self, record) -> None:
        self.records.setdefault(record.vm, {})[record.TYPE] = record

    def policy(self, vm: Vm) -> CpuPolicy | None:
        have = self.records.get(vm)
        if not have:
            return None
        lacking = [t.name for t in CPU_RECORDS if t not in have]
        if lacking:
            raise RestoreError(f"stream lacks the {vm.name.lower()}'s {', '.join(lacking)}")
        model = have[RecordType.CPU_MODEL]
        return CpuPolicy(
            model=model.model, tsc_khz=model.tsc_khz, strict_tsc=model.strict_tsc,
            host_vendor=model.host_vendor, host_signature=model.host_signature,
            cpuid=tuple(CpuidEntry(*entry) for entry in have[RecordType.CPUID_POLICY].entries),
            msrs=tuple(MsrEntry(index, bool(flags & MSR_FEATURE), value)
                       for index, flags, value in have[RecordType.MSR_POLICY].entries))


def state_records(state, vm: Vm = Vm.GUEST) -> list[HvmState]:
    """Every HVM context record of one VM: each vCPU's, then the platform's."""
    out = []
    for vcpu in state.vcpus:
        out += [HvmState(rtype, vm, vcpu.vcpu_id, getattr(vcpu, attr))
                for rtype, attr in VCPU_RECORDS.items() if getattr(vcpu, attr) is not None]
    platform = state.platform
    out.append(HvmState(RecordType.PIC, vm, None,
                        {"master": platform.pic_master, "slave": platform.pic_slave}))
    out += [HvmState(rtype, vm, None, getattr(platform, attr)) for rtype, attr in PLATFORM_RECORDS.items()]
    return out


def state_bodies(state, vm: Vm) -> tuple[HvmBodies, DeviceBodies]:
    """One VM's share of a captured state (a contract.VmState) as
    ``SaveableDomain.capture_records`` gives it: its HVM context records and its
    device-model records (DEVICE_STATE; only the stub has some), as bodies."""
    return HvmBodies.of(vm, state_records(state, vm)), DeviceBodies.of(list(state.devices))


class StateCollector:
    """Gathers one VM's HVM context records as they arrive; :meth:`records` gives them back
    once the stream is complete, as the domain applies them, and :meth:`result` as a
    DomainState; both name the first record that is missing."""

    def __init__(self, label: str = "guest", vcpus: int = 1) -> None:
        self.label = label
        self.max_vcpus = vcpus      # ids 0..vcpus-1; the restorer sets it from DOMAIN_CONFIG
        self.vcpus: dict[int, dict[RecordType, HvmState]] = {}
        self.platform: dict[RecordType, HvmState] = {}

    def add(self, record: HvmState) -> None:
        if record.vcpu_id is not None and record.vcpu_id >= self.max_vcpus:   # refused at once: nothing piles up
            raise RestoreError(f"stream has {record.type.name} of {self.label} vcpu {record.vcpu_id}; "
                               f"the {self.label} has {self.max_vcpus} (ids 0..{self.max_vcpus - 1})")
        if record.vcpu_id is not None:
            self.vcpus.setdefault(record.vcpu_id, {})[record.type] = record
        else:
            self.platform[record.type] = record

    def _complete(self, config: DomainConfig) -> list[int]:
        if not self.vcpus:
            raise RestoreError(f"stream has no vCPU state for the {self.label}")
        want = getattr(config, "vcpus", 1) if self.label == "guest" else 1
        if sorted(self.vcpus) != list(range(want)):
            raise RestoreError(f"stream has state of {self.label} vCPUs {sorted(self.vcpus)}; "
                               f"the {self.label} has {want} (ids 0..{want - 1})")
        for vcpu_id in sorted(self.vcpus):
            lacking = [rt.name for rt in VCPU_RECORDS if rt not in self.vcpus[vcpu_id] and not rt & OPTIONAL]
            if lacking:
                raise RestoreError(f"stream lacks {', '.join(lacking)} of {self.label} vcpu {vcpu_id}")
        lacking = [rt.name for rt in (RecordType.PIC, *PLATFORM_RECORDS) if rt not in self.platform]
        if lacking:
            raise RestoreError(f"stream lacks the {self.label}'s {', '.join(lacking)} record")
        return sorted(self.vcpus)

    def records(self, config: DomainConfig, vm: Vm) -> HvmBodies:
        """The records as bodies, in the order a save writes them (a reader with
        ``hvm_bodies`` kept them)."""
        ordered = [self.vcpus[i][rt] for i in self._complete(config) for rt in VCPU_RECORDS
                   if rt in self.vcpus[i]]
        ordered += [self.platform[rt] for rt in (RecordType.PIC, *PLATFORM_RECORDS)]
        bodies = [r.body if r.body is not None else r.pack() for r in ordered]
        return HvmBodies(vm, tuple(r.type for r in ordered), tuple(r.vcpu_id for r in ordered),
                         tuple(len(b) for b in bodies), b"".join(bodies))

    def result(self, config: DomainConfig) -> DomainState:
        vcpus = [VcpuState(vcpu_id=vcpu_id, **{VCPU_RECORDS[rt]: r.decoded().state
                                                for rt, r in self.vcpus[vcpu_id].items()})
                 for vcpu_id in self._complete(config)]
        pic = self.platform[RecordType.PIC].decoded().state
        platform = {attr: self.platform[rt].decoded().state for rt, attr in PLATFORM_RECORDS.items()}
        return DomainState(config=config, vcpus=vcpus,
                           platform=PlatformState(pic_master=pic["master"], pic_slave=pic["slave"], **platform))


def apply_bodies(domain, config: DomainConfig, records: dict, devices: list[dict], fresh_stub: bool,
                 stub_build: str) -> None:
    """``RestorableDomain.finish_apply`` for a domain that applies DomainStates (the fake):
    the records decoded, as a reader would, then ``apply``."""
    collectors = {}
    for vm, bodies in records.items():
        collector = collectors[vm] = StateCollector("guest" if vm is Vm.GUEST else "stub",
                                                    config.vcpus if vm is Vm.GUEST else 1)
        for record in bodies.records():
            collector.add(record)
    state = collectors[Vm.GUEST].result(config)
    if Vm.STUB in collectors:
        stub = collectors[Vm.STUB].result(config)
        state.stub = StubState(vcpus=stub.vcpus, platform=stub.platform, devices=devices)
    domain.apply(state, fresh_stub=fresh_stub, stub_build=stub_build)


__all__ = ["PLATFORM_RECORDS", "VCPU_RECORDS", "CpuCollector", "RestoreError", "StateCollector",
           "StreamError", "config_from_record", "config_record", "cpu_bodies", "cpu_records", "domain_cpus",
           "apply_bodies", "policies_from_bodies", "state_bodies", "state_records",
           "stub_build_of"]
