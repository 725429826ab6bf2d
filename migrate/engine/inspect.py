"""Streams for people: the record table, memory statistics, decoded context
(``hvm stream inspect|verify|dump``). Reads through the same checking reader as a
restore, so the first problem stops it with its one-line StreamError. Page batches come
as RawPageBatch (counts and pfns, no page objects); callers keep what they print, not the
records, in a :class:`Spool` (memory up to a small size, then a temporary file), and every
value shown is cut short, so memory stays O(one record) whatever the stream holds
(specs/stream-format.md, "Memory")."""
from __future__ import annotations

import os
import reprlib
import tempfile
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..stream import (
    DONE, NEED_DATA, PAGE_SIZE, CpuidPolicy, CpuModel, Creator, DeviceState, DomainConfig, End,
    HvmState, MemoryLayout, MsrPolicy, StreamReader, Vm,
)
from ..text import one_line
from ..stream.pages import RawPageBatch
from .files import file_chunks

MAX_SHOWN = 80                 # characters of one value shown in a summary
MAX_LINE = 1000                # characters of one summary line
MAX_COUNTED_PAGES = 1 << 24    # distinct pages are counted for spaces up to 64 GiB
SPOOL_IN_MEMORY = 1 << 20      # output lines kept in memory before they go to a file


@dataclass
class Entry:
    index: int
    offset: int
    size: int            # bytes of the record: header, body, padding
    record: object


class Scan:
    """Iterating gives every record of a stream file with its offset and size, END last;
    raises StreamError (or RestoreError if the file cannot be read) at the first problem.
    ``header``: the stream header, once the first record has come."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.header = None

    def __iter__(self) -> Iterator[Entry]:
        reader = StreamReader(raw_pages=True)
        index, at = 0, None
        for data in file_chunks(self.path):
            reader.feed(data)
            while True:
                if at is None and reader.header is not None:
                    at = reader.offset
                record = reader.next_record()
                if record is NEED_DATA or record is DONE:
                    break
                if at is None:
                    at = reader.header.header_length
                self.header = reader.header
                yield Entry(index, at, reader.offset - at, record)
                index, at = index + 1, reader.offset
        reader.eof()


def summary(record) -> str:
    """One line describing a record."""
    if isinstance(record, RawPageBatch):
        return f"{record.space.name} {record.count} pages ({record.zero} zero)"
    if isinstance(record, HvmState):
        where = "platform" if record.vcpu_id is None else f"vcpu {record.vcpu_id}"
        return f"{record.vm.name} {where}"
    if isinstance(record, MemoryLayout):
        return (f"{record.space.name} {record.nr_pages} pages ({record.nr_pages * PAGE_SIZE >> 20} MiB) "
                f"in {len(record.ranges)} range{'s' if len(record.ranges) != 1 else ''}"
                + "".join(f"{', ' if i else ': '}{n} from pfn {first:#x}"
                          for i, (first, n) in enumerate(record.ranges)))
    if isinstance(record, CpuModel):
        promise = "promised" if record.strict_tsc else "not promised"
        return (f"{record.vm.name} model {record.model}, TSC {record.tsc_khz} kHz ({promise}), saved on "
                f"{record.host_vendor or 'an unknown host'} (signature {record.host_signature:#x})")
    if isinstance(record, CpuidPolicy):
        return f"{record.vm.name} {len(record.entries)} CPUID leaves"
    if isinstance(record, MsrPolicy):
        return f"{record.vm.name} {len(record.entries)} MSRs ({len(record.features())} feature)"
    if isinstance(record, DomainConfig):
        return one_line(" ".join(f"{short(k)}={short(v)}" for k, v in record.config.items()), MAX_LINE)
    if isinstance(record, DeviceState):
        return f"{record.device}.{record.instance} v{record.version} (min {record.min_version})"
    if isinstance(record, Creator):
        return one_line(record.text, MAX_SHOWN)
    if isinstance(record, End):
        return f"records={record.record_count} pages={record.page_count} digest={record.digest.hex()[:16]}..."
    return ""



_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = MAX_SHOWN
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 8, 8


def short(value) -> str:
    """A value of a msgpack body for a person, cut short (a str without quotes)."""
    if isinstance(value, str):
        return one_line(value, MAX_SHOWN) if len(value) <= 4 * MAX_SHOWN \
            else one_line(value[:MAX_SHOWN] + f"...({len(value)} characters)")
    if isinstance(value, bytes) and len(value) > MAX_SHOWN:
        return f"<{len(value)} bytes>"
    return one_line(_SHORT.repr(value), MAX_SHOWN * 2)


class Spool:
    """Output lines kept until the stream has been checked: in memory up to
    SPOOL_IN_MEMORY bytes, then in a temporary file (a stream of many records must not
    grow this process)."""

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, mode="w+", encoding="utf-8",
                                                   errors="replace")
        self._count = 0

    def append(self, line: str) -> None:
        self._file.write(line.replace("\n", " ") + "\n")
        self._count += 1

    def __iadd__(self, lines) -> Spool:
        for line in lines:
            self.append(line)
        return self

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        self._file.seek(0)
        for line in self._file:
            yield line[:-1]


@dataclass
class MemoryStats:
    nr_pages: int = 0
    entries: int = 0
    data: int = 0
    zero: int = 0
    distinct: int = 0
    sent: bytearray | None = None  # one byte per page of the space, when it is not too large
    starts: list = field(default_factory=list)     # first pfn of each range
    slots: list = field(default_factory=list)      # add to a pfn of that range: its byte in sent
    data_bytes: int = 0        # page record bytes, entries and framing included

    def line(self, space: Vm) -> str:
        if self.sent is None and self.entries:
            counted = "distinct pages not counted (space too large)"
        else:
            counted = (f"{self.entries - self.distinct} resent; {self.distinct} distinct pages, "
                       f"{self.nr_pages - self.distinct} never sent")
        return (f"{space.name}: {self.nr_pages} pages ({self.nr_pages * PAGE_SIZE >> 20} MiB); "
                f"{self.entries} page entries: {self.data} data, {self.zero} zero, {counted}; "
                f"page records {self.data_bytes} bytes")


def add_vcpu(vcpus: dict, entry: Entry) -> None:
    """Note the vCPU whose context ``entry`` holds, if it does (Vm -> set of vCPU ids)."""
    record = entry.record
    if isinstance(record, HvmState) and record.vcpu_id is not None:
        vcpus.setdefault(record.vm, set()).add(record.vcpu_id)


def vcpus_line(vcpus: dict) -> str:
    return "vCPUs: " + ", ".join(f"{vm.name} {len(ids)} ({_id_ranges(sorted(ids))})"
                                 for vm, ids in sorted(vcpus.items()))


def _id_ranges(ids: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(ids):
        if start is None:
            start = n
        if i + 1 == len(ids) or ids[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def add_memory_stats(stats: dict, entry: Entry) -> None:
    """Count ``entry`` into ``stats`` (Vm -> MemoryStats)."""
    record = entry.record
    if isinstance(record, MemoryLayout):
        space = stats.setdefault(record.space, MemoryStats())
        space.nr_pages = record.nr_pages
        if record.nr_pages <= MAX_COUNTED_PAGES:
            space.sent = bytearray(record.nr_pages)
            space.starts = [first for first, _ in record.ranges]
            space.slots = [sum(n for _, n in record.ranges[:i]) - first
                           for i, (first, _) in enumerate(record.ranges)]
    elif isinstance(record, RawPageBatch):
        space = stats.setdefault(record.space, MemoryStats())
        space.entries += record.count
        space.zero += record.zero
        space.data += record.count - record.zero
        if space.sent is not None:          # the reader checked every pfn against the layout
            sent, starts, slots = space.sent, space.starts, space.slots
            for pfn in record.pfns():
                slot = pfn + slots[bisect_right(starts, pfn) - 1]     # its place in the ranges
                if not sent[slot]:
                    sent[slot] = 1
                    space.distinct += 1
        space.data_bytes += entry.size


def collapse(entries: Iterable[Entry]) -> Iterator[tuple[Entry, int, int, int]]:
    """Runs of page records of one type and space as (first entry, records, pages, zero)."""
    run = None
    for entry in entries:
        record = entry.record
        key = (record.TYPE, record.space) if isinstance(record, RawPageBatch) else None
        if run is not None and (key is None or key != run[0]):
            yield run[1]
            run = None
        if key is None:
            yield (entry, 1, 0, 0)
        elif run is None:
            run = [key, (entry, 1, record.count, record.zero)]
        else:
            first, n, pages, zeros = run[1]
            run[1] = (first, n + 1, pages + record.count, zeros + record.zero)
    if run is not None:
        yield run[1]


def describe_state(state, indent: str = "    ") -> list[str]:
    """HVM context as readable lines: ints in hex, byte blobs summarized."""
    lines = []
    if isinstance(state, dict):
        for key, value in state.items():
            if isinstance(value, (dict, list)) and value and not all(isinstance(v, int) for v in
                                                                        (value.values() if isinstance(value, dict) else value)):
                lines.append(f"{indent}{key}:")
                lines += describe_state(value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {_show(value)}")
    elif isinstance(state, list):
        for i, value in enumerate(state):
            lines.append(f"{indent}[{i}]:")
            lines += describe_state(value, indent + "  ")
    else:
        lines.append(f"{indent}{_show(state)}")
    return lines


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes):
        nonzero = sum(1 for b in value if b)
        return f"<{len(value)} bytes, {nonzero} nonzero>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)
