"""Ordering rules (specs/stream-format.md, section "Ordering").

One :class:`StreamOrder` watches the records of one stream, in order, and raises
StreamError at the first record that breaks a rule. The reader and the writer both use it.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable, Iterable

from migrate.stream.cpu import CpuidPolicy, CpuModel, MsrPolicy
from migrate.stream.errors import StreamError
from migrate.stream.hvm import HvmState
from migrate.stream.pages import PageBatch
from migrate.stream.records import (
    CPU_RECORDS, Channels, Creator, DeviceState, DomainConfig, End, MemoryLayout, RecordType, Vm,
)


class StreamOrder:
    def __init__(self) -> None:
        self.config_seen = False
        self.layouts: dict[Vm, MemoryLayout] = {}
        self._starts: dict[Vm, list[int]] = {}      # first pfn of each range, for bisect
        self.once: set[tuple] = set()
        self.cpu_records: dict[Vm, set[RecordType]] = {}
        self.msr_policies: dict[Vm, MsrPolicy] = {}
        self.channels_seen = False
        self._checks: dict[type, Callable[[Any], None]] = {
            DomainConfig: self._domain_config,
            MemoryLayout: self._memory_layout,
            PageBatch: self._pages,
            HvmState: self._hvm_state,
            DeviceState: self._device_state,
            CpuModel: self._cpu_record,
            CpuidPolicy: self._cpu_record,
            MsrPolicy: self._cpu_record,
            Channels: self._channels,
            Creator: lambda record: None,
            End: self._end,
        }

    def observe(self, record: Any) -> None:
        check = self._checks[type(record)]
        if not self.config_seen and not isinstance(record, (DomainConfig, Creator)):
            raise StreamError(f"{record.TYPE.name} before DOMAIN_CONFIG, which must come first")
        if self.channels_seen and not isinstance(record, (End, Creator)):
            raise StreamError(f"{record.TYPE.name} after CHANNELS, which only END may follow")
        check(record)

    def _once(self, key: tuple, what: Callable[[], str]) -> None:
        """``key`` seen for the first time; ``what()`` names the record in the error (made
        only then: names of enums cost more than the check, which runs once per record)."""
        if key in self.once:
            raise StreamError(f"{what()} appears twice")
        self.once.add(key)

    def _domain_config(self, record: DomainConfig) -> None:
        if self.config_seen:
            raise StreamError("DOMAIN_CONFIG appears twice")
        self.config_seen = True

    def _memory_layout(self, record: MemoryLayout) -> None:
        if not self.layouts:        # every CPU record came before: each VM has all three or none
            for vm, types in self.cpu_records.items():
                lack = ", ".join(t.name for t in CPU_RECORDS if t not in types)
                if lack:
                    raise StreamError(f"CPU records of {vm.name} lack {lack} (a VM has all three or none)")
        if record.space in self.layouts:
            raise StreamError(f"MEMORY_LAYOUT for {record.space.name} appears twice")
        if not record.ranges and record.space in self.cpu_records:
            raise StreamError(f"CPU records for {record.space.name}, whose MEMORY_LAYOUT is empty")
        self.layouts[record.space] = record
        self._starts[record.space] = [first for first, _ in record.ranges]

    def _cpu_record(self, record: Any) -> None:
        if self.layouts:
            raise StreamError(f"{record.TYPE.name} after a MEMORY_LAYOUT (CPU records come before)")
        self._once((record.TYPE, record.vm), lambda: f"{record.TYPE.name} for {record.vm.name}")
        self.cpu_records.setdefault(record.vm, set()).add(record.TYPE)
        if isinstance(record, MsrPolicy):
            self.msr_policies[record.vm] = record

    def _channels(self, record: Channels) -> None:
        self.channels_seen = True          # once: anything after it but END is refused above

    def _pages(self, record: PageBatch) -> None:
        self.pages(record.TYPE.name, record.space, record.pfns())

    def flat(self, space: Vm) -> bool:
        """The space's memory is one range from pfn 0 (checking the highest pfn suffices)."""
        layout = self.layouts.get(space)
        return layout is not None and len(layout.ranges) == 1 and layout.ranges[0][0] == 0

    def pages(self, what: str, space: Vm, pfns: Iterable[int]) -> None:
        """The page rules for a batch of ``pfns`` of ``space``: its layout came first and
        every pfn is in one of its ranges."""
        if not self.config_seen:
            raise StreamError(f"{what} before DOMAIN_CONFIG, which must come first")
        if self.channels_seen:
            raise StreamError(f"{what} after CHANNELS, which only END may follow")
        layout = self.layouts.get(space)
        if layout is None:
            raise StreamError(f"{what} for {space.name} before its MEMORY_LAYOUT")
        starts, ranges = self._starts[space], layout.ranges
        for pfn in pfns:
            at = bisect_right(starts, pfn) - 1
            if at < 0 or pfn >= ranges[at][0] + ranges[at][1]:
                raise StreamError(f"pfn 0x{pfn:x} outside {space.name} memory "
                                  f"({layout.nr_pages} pages in {len(ranges)} ranges)")

    def _present(self, record_type: RecordType, vm: Vm) -> None:
        """Context of ``vm`` (a record of ``record_type``, named only in an error) comes
        after its MEMORY_LAYOUT, which must not say the VM is absent (no pages)."""
        layout = self.layouts.get(vm)
        if layout is None:
            raise StreamError(f"{record_type.name} for {vm.name} before its MEMORY_LAYOUT")
        if not layout.ranges:
            raise StreamError(f"{record_type.name} for {vm.name}, whose MEMORY_LAYOUT says it is absent "
                              "(0 pages)")

    def _hvm_state(self, record: HvmState) -> None:
        self._present(record.type, record.vm)
        self._once((record.type, record.vm, record.vcpu_id),
                   lambda: f"{record.type.name} for {record.vm.name} {_where(record)}")
        policy = self.msr_policies.get(record.vm)
        if record.type is RecordType.VCPU_MSRS and policy is not None:
            msrs = record.decoded().state       # a restore's reader keeps only the body
            listed = [index for index, _, _ in policy.entries]
            if sorted(msrs) != listed:
                raise StreamError(f"VCPU_MSRS of {record.vm.name} {_where(record)} carries other MSRs "
                                  f"than its MSR_POLICY ({len(msrs)} against {len(listed)})")
            for index, value in policy.features().items():
                if msrs[index] != value:
                    raise StreamError(f"VCPU_MSRS of {record.vm.name} {_where(record)}: feature MSR "
                                      f"0x{index:x} is 0x{msrs[index]:x}, its MSR_POLICY "
                                      f"says 0x{value:x}")

    def context_fits(self, record_type: RecordType, vm: Vm, vcpu_id: int | None) -> bool:
        """Whether an HVM context record whose body passed its value rules, a VCPU_MSRS
        against its VM's MSR_POLICY included (hvm.BodyScan checks them), breaks none of the
        other rules :meth:`observe` checks (it is then seen, as observe would see it), as a
        yes or no: for a reader or writer that checks a run of records ahead, and leaves
        the first that does not fit to observe, which names its error."""
        layout = self.layouts.get(vm)
        key = (record_type, vm, vcpu_id)
        if not self.config_seen or self.channels_seen or layout is None or not layout.ranges or key in self.once:
            return False
        self.once.add(key)
        return True

    def _device_state(self, record: DeviceState) -> None:
        self._device(record.device, record.instance)

    def device(self, device: str, instance: int) -> None:
        """:meth:`observe` of a DEVICE_STATE of ``device``.``instance``, which is all its
        ordering rules look at (a capture's DeviceBodies has no decoded record)."""
        if not self.config_seen:
            raise StreamError("DEVICE_STATE before DOMAIN_CONFIG, which must come first")
        if self.channels_seen:
            raise StreamError("DEVICE_STATE after CHANNELS, which only END may follow")
        self._device(device, instance)

    def _device(self, device: str, instance: int) -> None:
        self._present(RecordType.DEVICE_STATE, Vm.STUB)      # the devices live in the stub
        self._once(("device", device, instance), lambda: f"DEVICE_STATE {device}.{instance}")

    def _end(self, record: End) -> None:
        missing = [vm.name for vm in Vm if vm not in self.layouts]
        if missing:
            raise StreamError(f"END before MEMORY_LAYOUT of {', '.join(missing)}")


def _where(record: HvmState) -> str:
    return "platform" if record.vcpu_id is None else f"vcpu {record.vcpu_id}"
