"""Record types, framing and the small records (specs/stream-format.md, sections
"Stream header", "Record framing", "Record types", "DOMAIN_CONFIG", "MEMORY_LAYOUT",
"DEVICE_STATE", "CREATOR" and "END"). The CPU records of version 2 are in ``cpu.py``.

Every record type is a frozen dataclass with ``TYPE``, ``pack() -> bytes`` (the body) and
``unpack(body)``; its explicit little-endian ``struct.Struct`` is defined once here and
used by both the reader and the writer. Page batches live in ``pages.py`` and the HVM
context records in ``hvm.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, ClassVar, Iterable

import msgpack

from migrate.stream.errors import StreamError

MAGIC = b"\x89HVMPAIR"
FORMAT_VERSION = 2
MIN_READ_VERSION = 1  # this version and the one before
PAGE_SIZE = 4096
RECORD_ALIGN = 8
MAX_RECORD_BODY = 128 << 20
MAX_HEADER_LENGTH = 4096
MAX_PAGES_PER_BATCH = 1024
MAX_SPACE_PAGES = 1 << 36  # 256 TiB of 4 KiB pages
PFN_LIMIT = 1 << 40  # every pfn is below this: guest physical addresses of at most 52 bits
MAX_RANGES = 64  # memory ranges of one address space (version 2)
MAX_VCPU_ID = 4095
MAX_MSRS = 1024
MAX_MSGPACK_STR = 1 << 20
MAX_MSGPACK_ITEMS = 1 << 16  # elements of an array, key-value pairs of a map
MAX_MSGPACK_BODY = 1 << 20  # DOMAIN_CONFIG and DEVICE_STATE bodies
MAX_MSGPACK_DEPTH = 32  # arrays and maps nested in each other, the body's map included
MAX_CREATOR_TEXT = 4096  # bytes of a CREATOR body a reader keeps (the rest is not read)
MAX_NAME = 23  # bytes of a device or field name (specs/device-state.md)

OPTIONAL = 0x8000_0000

HEADER = struct.Struct("<8sIIII")  # magic, version, header_length, incompat, compat
RECORD_HEADER = struct.Struct("<IIII")  # type, body_length, reserved, crc32
CRC_COVERED_HEADER = 12  # the CRC covers type, body_length and reserved, then the body


class RecordType(IntEnum):
    END = 0x0000_0000
    DOMAIN_CONFIG = 0x0000_0001
    MEMORY_LAYOUT = 0x0000_0002
    PAGE_DATA = 0x0000_0003
    PAGE_DATA_ZSTD = 0x0000_0004
    VCPU_REGS = 0x0000_0010
    VCPU_SREGS = 0x0000_0011
    VCPU_XSAVE = 0x0000_0012
    VCPU_XCRS = 0x0000_0013
    VCPU_MSRS = 0x0000_0014
    VCPU_LAPIC = 0x0000_0015
    VCPU_EVENTS = 0x0000_0016
    VCPU_MP_STATE = 0x0000_0017
    VCPU_DEBUGREGS = 0x0000_0018
    PIC = 0x0000_0020
    IOAPIC = 0x0000_0021
    PIT = 0x0000_0022
    CLOCK = 0x0000_0023
    DEVICE_STATE = 0x0000_0030
    CPU_MODEL = 0x0000_0040
    CPUID_POLICY = 0x0000_0041
    MSR_POLICY = 0x0000_0042
    CHANNEL_SYNC = 0x0000_0050  # in channel streams only (section "Channel streams")
    CHANNELS = 0x0000_0051
    CREATOR = OPTIONAL | 0x0000_0001
    VCPU_PDPTRS = OPTIONAL | 0x0001_0000     # section "HVM context records"


class Vm(IntEnum):
    """Which VM of the pair a record describes; also the page address space id."""

    GUEST = 0
    STUB = 1


# Largest body_length of each known type, checked as soon as the record header is in,
# before the body is waited for (spec "Caps", "Reading" step 2). Fixed-size types are
# added by the reader from their layouts; an unknown type may have MAX_RECORD_BODY.
MAX_BATCH_BODY = 5 << 20  # 8 + 16 x 1024 entries + 4 MiB of pages, or a zstd frame of them
BODY_CAPS: dict[int, int] = {
    RecordType.DOMAIN_CONFIG: MAX_MSGPACK_BODY,
    RecordType.DEVICE_STATE: MAX_MSGPACK_BODY,
    RecordType.PAGE_DATA: MAX_BATCH_BODY,
    RecordType.PAGE_DATA_ZSTD: MAX_BATCH_BODY,
    RecordType.VCPU_MSRS: 16 + 16 * MAX_MSRS,
}


# a VM's CPU records (section "CPU records"): all three or none, in this order
CPU_RECORDS = (RecordType.CPU_MODEL, RecordType.CPUID_POLICY, RecordType.MSR_POLICY)


def reserved_optional(value: int, mandatory: Iterable[int]) -> bool:
    """True for 0x80000000 | T where T is a mandatory type of ``mandatory`` (CREATOR,
    0x80000001, is defined and excepted): a known record with the optional bit set is
    refused, never skipped (spec "Record framing", "Optional records")."""
    return (bool(value & OPTIONAL) and value != RecordType.CREATOR
            and (value & ~OPTIONAL) in mandatory)


def type_name(value: int) -> str:
    try:
        return f"{RecordType(value).name}(0x{value:08x})"
    except ValueError:
        kind = "optional" if value & OPTIONAL else "mandatory"
        return f"unknown {kind} 0x{value:08x}"


def padded(length: int) -> int:
    return (length + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)


def expect_length(body: bytes, layout: struct.Struct, what: str) -> None:
    if len(body) != layout.size:
        raise StreamError(f"{what} body is {len(body)} bytes, expected {layout.size}")


def vm_of(value: int) -> Vm:
    try:
        return Vm(value)
    except ValueError:
        raise StreamError(f"unknown VM / address space id {value}") from None


@dataclass(frozen=True)
class Header:
    """The stream header (not a record)."""

    version: int = FORMAT_VERSION
    header_length: int = HEADER.size
    incompat_flags: int = 0
    compat_flags: int = 0

    def pack(self) -> bytes:
        if not HEADER.size <= self.header_length <= MAX_HEADER_LENGTH or self.header_length % RECORD_ALIGN:
            raise ValueError(f"header_length {self.header_length} is not a multiple of {RECORD_ALIGN} "
                             f"in {HEADER.size}..{MAX_HEADER_LENGTH}")
        fixed = HEADER.pack(
            MAGIC, self.version, self.header_length, self.incompat_flags, self.compat_flags
        )
        return fixed + bytes(self.header_length - HEADER.size)


# ---- msgpack bodies ---------------------------------------------------------------------

_PLAIN = (type(None), bool, int, float, str, bytes)


def _map_of_pairs(pairs: list) -> dict:
    """msgpack's object_pairs_hook: a map with str keys, each key once (spec "msgpack
    bodies": a duplicate key would give two readers two different values)."""
    for key, _ in pairs:        # first: 1 and True would otherwise be one key "twice"
        if not isinstance(key, str):
            raise StreamError(f"map key {key!r} is not a string")
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise StreamError(f"map key {key!r} appears twice")
            seen.add(key)
    return value


def unpack_msgpack(body: bytes, what: str) -> dict:
    """Decode a msgpack map under strict limits; anything else is a StreamError."""
    if len(body) > MAX_MSGPACK_BODY:
        raise StreamError(f"{what} body is {len(body)} bytes, more than {MAX_MSGPACK_BODY}")
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,       # _map_of_pairs names a key that is not a str
            object_pairs_hook=_map_of_pairs,
            max_bin_len=MAX_MSGPACK_BODY,
            max_str_len=MAX_MSGPACK_STR,
            max_array_len=MAX_MSGPACK_ITEMS,
            max_map_len=MAX_MSGPACK_ITEMS,
            max_ext_len=0,
        )
    except StreamError as exc:
        raise StreamError(f"{what}: {exc.msg}") from None
    except msgpack.StackError:
        raise StreamError(f"{what}: msgpack nested deeper than {MAX_MSGPACK_DEPTH} levels") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise StreamError(f"{what}: bad msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise StreamError(f"{what}: msgpack body is {type(value).__name__}, expected a map")
    _check_plain(value, what)
    return value


def _check_plain(value: Any, what: str) -> None:
    """Only nil, bool, int, float, str, bin, arrays and maps (their keys were checked as
    they were read), nested at most MAX_MSGPACK_DEPTH deep. Iterative: no input can
    exhaust the Python stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_MSGPACK_DEPTH:
                raise StreamError(f"{what}: msgpack nested deeper than {MAX_MSGPACK_DEPTH} levels")
            items = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in items if isinstance(child, (dict, list))
                         or not isinstance(child, _PLAIN))
        elif not isinstance(item, _PLAIN):
            raise StreamError(f"{what}: unsupported msgpack value {type(item).__name__}")


def pack_msgpack(value: dict, what: str = "msgpack body", check: Callable[[bytes], Any] | None = None) -> bytes:
    """The body of a msgpack record; ValueError unless a reader would accept it: the plain
    msgpack rules, or ``check(body)``, the record's own decoder (which applies them too)."""
    try:
        body = msgpack.packb(value, use_bin_type=True, strict_types=False)
        if check is None:
            unpack_msgpack(body, what)
        else:
            check(body)
    except StreamError as exc:
        raise ValueError(f"writer refuses: {exc.msg}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"writer refuses: {what}: {exc}") from None
    return body


@dataclass(frozen=True)
class DomainConfig:
    TYPE: ClassVar[RecordType] = RecordType.DOMAIN_CONFIG
    config: dict

    def pack(self) -> bytes:
        return pack_msgpack(self.config, "DOMAIN_CONFIG")

    @classmethod
    def unpack(cls, body: bytes) -> DomainConfig:
        return cls(unpack_msgpack(body, "DOMAIN_CONFIG"))


def name_ok(name: str) -> bool:
    """A device or field name: 1 to MAX_NAME ASCII characters, none of them NUL
    (specs/device-state.md, "Conventions")."""
    return 1 <= len(name) <= MAX_NAME and name.isascii() and "\0" not in name


def check_name(name: str, what: str) -> None:
    """StreamError naming ``what`` unless ``name`` is :func:`name_ok`."""
    if not name_ok(name):
        raise StreamError(f"{what} {name!r} is not 1 to {MAX_NAME} ASCII characters without NUL")


_DEVICE_KEYS = {"device": str, "instance": int, "version": int, "min_version": int, "fields": dict}


@dataclass(frozen=True)
class DeviceState:
    """One device's state from the stub's device model, versioned per device."""

    TYPE: ClassVar[RecordType] = RecordType.DEVICE_STATE
    device: str
    instance: int
    version: int
    min_version: int
    fields: dict

    def pack(self) -> bytes:
        # a writer makes only what readers accept: decoded once, as a reader would
        return pack_msgpack({key: getattr(self, key) for key in _DEVICE_KEYS}, "DEVICE_STATE", self.unpack)

    @classmethod
    def unpack(cls, body: bytes) -> DeviceState:
        value = unpack_msgpack(body, "DEVICE_STATE")
        if set(value) != set(_DEVICE_KEYS):
            raise StreamError(f"DEVICE_STATE keys are {sorted(value)}, expected {sorted(_DEVICE_KEYS)}")
        for key, kind in _DEVICE_KEYS.items():
            if not isinstance(value[key], kind) or isinstance(value[key], bool):
                raise StreamError(f"DEVICE_STATE {key} is {type(value[key]).__name__}, expected {kind.__name__}")
        check_name(value["device"], "DEVICE_STATE device name")
        if not 0 <= value["instance"] <= 0xFFFF_FFFF:
            raise StreamError(f"DEVICE_STATE instance {value['instance']} out of range")
        if not 1 <= value["min_version"] <= value["version"] <= 0xFFFF_FFFF:
            raise StreamError(
                f"DEVICE_STATE versions must satisfy 1 <= min_version <= version, got "
                f"min_version {value['min_version']}, version {value['version']}"
            )
        device = value["device"]
        for name, field in value["fields"].items():
            if not name_ok(name):       # the message is made only for an error: this loop
                check_name(name, f"DEVICE_STATE {device} field name")   # runs in a downtime
            kind = type(field)      # msgpack gives exactly int or bytes: those first
            if kind is not bytes and (kind is not int or not 0 <= field < 1 << 64):
                _check_field(device, name, field)
        return cls(**value)

    def check_loadable(self, loader_version: int, loader_min_version: int) -> None:
        """Raise StreamError unless a loader at ``loader_version`` that still reads states
        back to ``loader_min_version`` can load this state (spec "DEVICE_STATE")."""
        if self.min_version > loader_version:
            raise StreamError(
                f"device {self.device}.{self.instance} state version {self.version} needs a "
                f"loader of version >= {self.min_version}, this one is {loader_version}"
            )
        if self.version < loader_min_version:
            raise StreamError(
                f"device {self.device}.{self.instance} state version {self.version} is older "
                f"than the oldest this loader reads ({loader_min_version})"
            )


def _check_field(device: str, name: str, field: Any) -> None:
    """A DEVICE_STATE field value: an int of 0..2^64-1 or a bin; StreamError otherwise."""
    if isinstance(field, bool) or not isinstance(field, (int, bytes)):
        raise StreamError(f"DEVICE_STATE {device} field {name} is "
                          f"{type(field).__name__}, expected an int or bin")
    if isinstance(field, int) and not 0 <= field < 1 << 64:
        raise StreamError(f"DEVICE_STATE {device} field {name} is {field}, outside 0..2^64-1")


@dataclass(frozen=True)
class DeviceBodies:
    """A VM's DEVICE_STATE records as their bodies, each with its (device, instance):
    what a capture gives (migrate/stub/devstate.py encodes the stub's binary form in C),
    framed by StreamWriter.device_bodies. Only :meth:`of` (from plain records, each packed
    and checked) and that encoder (the same bytes, by the same rules) make them."""
    keys: tuple = ()            # (device, instance) of each record
    bodies: tuple = ()

    @classmethod
    def of(cls, devices: list[dict]) -> DeviceBodies:
        """From plain records ({"device", "instance", "version", "min_version", "fields"});
        ValueError as DeviceState.pack."""
        records = [DeviceState(**device) for device in devices]
        return cls(tuple((r.device, r.instance) for r in records), tuple(r.pack() for r in records))

    def records(self) -> list[DeviceState]:
        """Decoded as a reader decodes them."""
        return [DeviceState.unpack(body) for body in self.bodies]

    def __len__(self) -> int:
        return len(self.bodies)


# ---- fixed-layout small records ---------------------------------------------------------

MEMORY_LAYOUT_V1 = struct.Struct("<IIQ")  # space, page_size, nr_pages
MEMORY_LAYOUT = struct.Struct("<IIII")  # space, page_size, nr_ranges, reserved
MEMORY_RANGE = struct.Struct("<QQ")  # first_pfn, nr_pages


@dataclass(frozen=True)
class MemoryLayout:
    """The memory of one address space: ``ranges`` of ``(first_pfn, nr_pages)``, strictly
    ascending, neither overlapping nor touching; none says the VM is absent. Version 1 had
    one range from pfn 0 (``unpack_v1``)."""

    TYPE: ClassVar[RecordType] = RecordType.MEMORY_LAYOUT
    space: Vm
    ranges: tuple[tuple[int, int], ...]
    page_size: int = PAGE_SIZE

    @classmethod
    def flat(cls, space: Vm, nr_pages: int) -> MemoryLayout:
        """``nr_pages`` pages from pfn 0 (none: the VM is absent)."""
        return cls(space, ((0, nr_pages),) if nr_pages else ())

    @property
    def nr_pages(self) -> int:
        return sum(n for _, n in self.ranges)

    def pack(self) -> bytes:
        _check_ranges(self.ranges, ValueError)
        return MEMORY_LAYOUT.pack(self.space, self.page_size, len(self.ranges), 0) + b"".join(
            MEMORY_RANGE.pack(first, n) for first, n in self.ranges)

    @classmethod
    def unpack(cls, body: bytes) -> MemoryLayout:
        if len(body) < MEMORY_LAYOUT.size:
            raise StreamError(f"MEMORY_LAYOUT body is {len(body)} bytes, shorter than its header")
        space, page_size, nr_ranges, reserved = MEMORY_LAYOUT.unpack_from(body)
        if reserved:
            raise StreamError(f"MEMORY_LAYOUT reserved field is 0x{reserved:x}, must be zero")
        _check_page_size(page_size)
        if nr_ranges > MAX_RANGES:
            raise StreamError(f"MEMORY_LAYOUT nr_ranges {nr_ranges} exceeds {MAX_RANGES}")
        need = MEMORY_LAYOUT.size + nr_ranges * MEMORY_RANGE.size
        if len(body) != need:
            raise StreamError(f"MEMORY_LAYOUT body is {len(body)} bytes, {nr_ranges} ranges need {need}")
        ranges = tuple(MEMORY_RANGE.iter_unpack(body[MEMORY_LAYOUT.size:]))
        _check_ranges(ranges, StreamError)
        return cls(vm_of(space), ranges, page_size)

    @classmethod
    def unpack_v1(cls, body: bytes) -> MemoryLayout:
        expect_length(body, MEMORY_LAYOUT_V1, "MEMORY_LAYOUT")
        space, page_size, nr_pages = MEMORY_LAYOUT_V1.unpack(body)
        _check_page_size(page_size)
        if not 0 <= nr_pages <= MAX_SPACE_PAGES:
            raise StreamError(f"MEMORY_LAYOUT nr_pages {nr_pages} outside 0..{MAX_SPACE_PAGES}")
        return cls.flat(vm_of(space), nr_pages)


def _check_page_size(page_size: int) -> None:
    if page_size != PAGE_SIZE:
        raise StreamError(f"MEMORY_LAYOUT page size {page_size}, only {PAGE_SIZE} is defined")


def _check_ranges(ranges, error: type[Exception]) -> None:
    end, total = -1, 0
    for first, count in ranges:
        if count == 0:
            raise error(f"MEMORY_LAYOUT range at pfn 0x{first:x} has no pages")
        if first <= end:
            raise error(f"MEMORY_LAYOUT range at pfn 0x{first:x} overlaps, touches or precedes "
                        f"the one before (ranges must be ascending and apart)")
        if first + count > PFN_LIMIT:
            raise error(f"MEMORY_LAYOUT range at pfn 0x{first:x} of {count} pages ends past "
                        f"pfn limit 0x{PFN_LIMIT:x}")
        end = first + count
        total += count
    if total > MAX_SPACE_PAGES:
        raise error(f"MEMORY_LAYOUT holds {total} pages, more than {MAX_SPACE_PAGES}")


@dataclass(frozen=True)
class Creator:
    """Optional: free text naming the program that wrote the stream."""

    TYPE: ClassVar[RecordType] = RecordType.CREATOR
    text: str

    def pack(self) -> bytes:
        return self.text.encode("utf-8")

    @classmethod
    def unpack(cls, body: bytes) -> Creator:
        """Never refuses (spec "CREATOR": a reader that does not know the type skips it,
        so one that knows it must not be stricter): the first MAX_CREATOR_TEXT bytes,
        invalid UTF-8 shown as U+FFFD."""
        return cls(bytes(body[:MAX_CREATOR_TEXT]).decode("utf-8", "replace"))


END = struct.Struct("<QQQ16s")  # record_count, page_count, stream_bytes, XXH3-128 digest


CHANNEL_SYNC_SIZE = 56      # its body (a channel stream's; dataplane.c reads and writes it)
CHANNELS_HEADER = struct.Struct("<II")  # count, reserved
CHANNEL_ENTRY = struct.Struct("<IIQQQ16s")  # index, rounds, records, pages, bytes, digest
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Channels:
    """The data channels that carried this stream's pages (a relocation's: specs/
    stream-format.md, "Channel streams"): each one's last CHANNEL_SYNC, in index order:
    ``(rounds, records, pages, bytes, digest)``."""

    TYPE: ClassVar[RecordType] = RecordType.CHANNELS
    channels: tuple[tuple[int, int, int, int, bytes], ...]

    def pack(self) -> bytes:
        if not 1 <= len(self.channels) <= MAX_CHANNELS:
            raise ValueError(f"{len(self.channels)} channels, 1..{MAX_CHANNELS}")
        return CHANNELS_HEADER.pack(len(self.channels), 0) + b"".join(
            CHANNEL_ENTRY.pack(i, *entry) for i, entry in enumerate(self.channels))

    @classmethod
    def unpack(cls, body: bytes) -> Channels:
        if len(body) < CHANNELS_HEADER.size:
            raise StreamError(f"CHANNELS body is {len(body)} bytes, shorter than its header")
        count, reserved = CHANNELS_HEADER.unpack_from(body)
        if reserved:
            raise StreamError(f"CHANNELS reserved field is 0x{reserved:x}, must be zero")
        if not 1 <= count <= MAX_CHANNELS:
            raise StreamError(f"CHANNELS count {count} outside 1..{MAX_CHANNELS}")
        need = CHANNELS_HEADER.size + count * CHANNEL_ENTRY.size
        if len(body) != need:
            raise StreamError(f"CHANNELS body is {len(body)} bytes, {count} channels need {need}")
        out = []
        for i, (index, *entry) in enumerate(CHANNEL_ENTRY.iter_unpack(body[CHANNELS_HEADER.size:])):
            if index != i:
                raise StreamError(f"CHANNELS entry {i} is for channel {index}")
            out.append(tuple(entry))
        return cls(tuple(out))


@dataclass(frozen=True)
class End:
    TYPE: ClassVar[RecordType] = RecordType.END
    record_count: int
    page_count: int
    stream_bytes: int
    digest: bytes

    def pack(self) -> bytes:
        return END.pack(self.record_count, self.page_count, self.stream_bytes, self.digest)

    @classmethod
    def unpack(cls, body: bytes) -> End:
        expect_length(body, END, "END")
        return cls(*END.unpack(body))
