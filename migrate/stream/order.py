"""Ordering rules (specs/stream-format.md, section "Ordering").

One :class:`StreamOrder` watches the records of one stream, in order, and raises
StreamError at the first record that breaks a rule. The reader and the writer both use it.
"""

from __future__ import annotations

from typing import Any, Callable

from migrate.stream.errors import StreamError
from migrate.stream.hvm import HvmState
from migrate.stream.pages import PageBatch
from migrate.stream.records import Creator, DeviceState, DomainConfig, End, MemoryLayout, Vm


class StreamOrder:
    def __init__(self) -> None:
        self.config_seen = False
        self.layouts: dict[Vm, int] = {}
        self.once: set[tuple] = set()
        self._checks: dict[type, Callable[[Any], None]] = {
            DomainConfig: self._domain_config,
            MemoryLayout: self._memory_layout,
            PageBatch: self._pages,
            HvmState: self._hvm_state,
            DeviceState: self._device_state,
            Creator: lambda record: None,
            End: self._end,
        }

    def observe(self, record: Any) -> None:
        check = self._checks[type(record)]
        if not self.config_seen and not isinstance(record, (DomainConfig, Creator)):
            raise StreamError(f"{record.TYPE.name} before DOMAIN_CONFIG, which must come first")
        check(record)

    def _once(self, key: tuple, what: str) -> None:
        if key in self.once:
            raise StreamError(f"{what} appears twice")
        self.once.add(key)

    def _domain_config(self, record: DomainConfig) -> None:
        if self.config_seen:
            raise StreamError("DOMAIN_CONFIG appears twice")
        self.config_seen = True

    def _memory_layout(self, record: MemoryLayout) -> None:
        if record.space in self.layouts:
            raise StreamError(f"MEMORY_LAYOUT for {record.space.name} appears twice")
        self.layouts[record.space] = record.nr_pages

    def _pages(self, record: PageBatch) -> None:
        self.pages(record.TYPE.name, record.space, (pfn for pfn, _ in record.pages))

    def pages(self, what: str, space: Vm, pfns: Any) -> None:
        """The page rules for a batch of ``pfns`` of ``space``: its layout came first and
        every pfn is in range."""
        if not self.config_seen:
            raise StreamError(f"{what} before DOMAIN_CONFIG, which must come first")
        nr_pages = self.layouts.get(space)
        if nr_pages is None:
            raise StreamError(f"{what} for {space.name} before its MEMORY_LAYOUT")
        for pfn in pfns:
            if pfn >= nr_pages:
                raise StreamError(
                    f"pfn 0x{pfn:x} outside {space.name} memory of {nr_pages} pages"
                )

    def _hvm_state(self, record: HvmState) -> None:
        where = "platform" if record.vcpu_id is None else f"vcpu {record.vcpu_id}"
        self._once((record.type, record.vm, record.vcpu_id),
                   f"{record.type.name} for {record.vm.name} {where}")

    def _device_state(self, record: DeviceState) -> None:
        self._once(("device", record.device, record.instance),
                   f"DEVICE_STATE {record.device}.{record.instance}")

    def _end(self, record: End) -> None:
        missing = [vm.name for vm in Vm if vm not in self.layouts]
        if missing:
            raise StreamError(f"END before MEMORY_LAYOUT of {', '.join(missing)}")
