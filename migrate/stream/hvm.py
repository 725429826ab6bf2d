"""HVM context records (specs/stream-format.md, section "HVM context records").

The KVM layer's state is plain data whose keys are the field names of the Linux KVM
structs (``struct kvm_regs``, ``kvm_sregs``, ...). Each record type has one layout,
declared once below as a :class:`Layout` and compiled to one little-endian
``struct.Struct`` that both ``pack`` and ``unpack`` use. Padding and reserved fields of the
kernel structs are not carried: ``pack`` ignores them, ``unpack`` restores them as zero.

Every body opens with ``vm u32, vcpu_id u32``; for platform records (PIC, IOAPIC, PIT,
CLOCK) ``vcpu_id`` is reserved and must be zero, and the dataclass holds ``None``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from migrate.stream._pages import ffi, lib
from migrate.stream.cpu import MSR_FEATURE
from migrate.stream.errors import StreamError
from migrate.stream.records import (
    MAX_MSRS, MAX_VCPU_ID, RECORD_HEADER, RecordType, Vm, expect_length, padded, vm_of,
)

PREFIX = "<II"  # vm, vcpu_id (reserved, zero, for platform records)
MAX_XCRS = 16  # entries of kvm_xcrs.xcrs (KVM_MAX_XCRS)


@dataclass(frozen=True)
class Field:
    """One field of a kernel struct. ``count`` > 0 makes it a list of that many items;
    ``nested`` makes it a dict (or a list of dicts); ``carried=False`` marks padding."""

    name: str
    code: str = ""
    count: int = 0
    nested: Layout | None = None
    carried: bool = True

    def format(self) -> str:
        if not self.carried:
            return ""
        one = self.nested.format if self.nested else self.code
        return one * max(self.count, 1)

    def zero(self) -> Any:
        one = 0 if self.nested is None else self.nested.zero()
        return [one] * self.count if self.count else one


def pad(name: str, count: int = 0) -> Field:
    return Field(name, count=count, carried=False)


class Layout:
    """A kernel struct as the stream carries it: carried fields in declaration order.

    ``flatten`` and ``build`` are generated once per layout as straight-line code (they
    are on a relocation's downtime path); their behaviour is the obvious walk over the
    fields: ``flatten`` appends the carried values in order and raises ValueError for a
    non-dict, an unknown key or a list of the wrong length (KeyError for a missing key);
    ``build`` makes the dict back from a flat tuple of values, padding as zero."""

    def __init__(self, *fields: Field) -> None:
        self.fields = fields
        self.format = "".join(f.format() for f in fields)
        self.width = sum((f.nested.width if f.nested else 1) * max(f.count, 1)   # values in the format
                         for f in fields if f.carried)
        self._names = frozenset(f.name for f in fields)
        self.flatten = self._make_flatten()
        self._build_at = self._make_build()

    def zero(self) -> dict:
        return {f.name: f.zero() for f in self.fields}

    def build(self, values: tuple, at: int = 0) -> dict:
        """The dict for ``self.width`` values of ``values`` from index ``at``."""
        return self._build_at(values, at)

    def _make_flatten(self):
        env: dict = {"_names": self._names, "_check": _check_items}
        lines = ["if v.__class__ is not dict and not isinstance(v, dict):",
                 "    raise ValueError(f'expected a dict, got {type(v).__name__}')",
                 "if not _names.issuperset(v):",
                 "    raise ValueError(f'unknown fields {sorted(set(v) - _names)}')"]
        for i, f in enumerate(self.fields):
            if not f.carried:
                continue
            get = f"v[{f.name!r}]"
            if f.nested:
                env[f"n{i}"] = f.nested.flatten
                if f.count:
                    lines.append(f"for item in _check({get}, {f.count}, {f.name!r}): n{i}(item, out)")
                else:
                    lines.append(f"n{i}({get}, out)")
            elif f.count:
                lines.append(f"out.extend(_check({get}, {f.count}, {f.name!r}))")
            else:
                lines.append(f"out.append({get})")
        code = "def flatten(v, out):\n" + "".join(f"    {line}\n" for line in lines)
        exec(code, env)     # noqa: S102 - generated from the layouts declared in this module
        return env["flatten"]

    def _make_build(self):
        env: dict = {}
        items, at = [], 0
        for i, f in enumerate(self.fields):
            if not f.carried:
                env[f"z{i}"] = f.zero
                items.append(f"{f.name!r}: z{i}()")
                continue
            if f.nested:
                env[f"b{i}"] = f.nested._build_at
                width = f.nested.width
                if f.count:
                    items.append(f"{f.name!r}: [b{i}(t, o + {at} + j * {width}) for j in range({f.count})]")
                else:
                    items.append(f"{f.name!r}: b{i}(t, o + {at})")
                at += width * max(f.count, 1)
            elif f.count:
                items.append(f"{f.name!r}: list(t[o + {at}:o + {at + f.count}])")
                at += f.count
            else:
                items.append(f"{f.name!r}: t[o + {at}]")
                at += 1
        exec(f"def build(t, o):\n    return {{{', '.join(items)}}}\n", env)    # noqa: S102 - as above
        return env["build"]


def _check_items(items, count: int, name: str):
    if len(items) != count:
        raise ValueError(f"{name} has {len(items)} items, expected {count}")
    return items


def fields(code: str, *names: str) -> tuple[Field, ...]:
    return tuple(Field(name, code) for name in names)


SEGMENT = Layout(
    Field("base", "Q"), Field("limit", "I"), Field("selector", "H"),
    *fields("B", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"),
    pad("padding"),
)
DTABLE = Layout(Field("base", "Q"), Field("limit", "H"), pad("padding", 3))
REGS = Layout(*fields("Q", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                      "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"))
SREGS = Layout(
    *(Field(name, nested=SEGMENT) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
    Field("gdt", nested=DTABLE), Field("idt", nested=DTABLE),
    *fields("Q", "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"),
    Field("interrupt_bitmap", "Q", count=4),
)
XCR = Layout(Field("xcr", "I"), pad("reserved"), Field("value", "Q"))
XCRS = Layout(Field("nr_xcrs", "I"), Field("flags", "I"), Field("xcrs", nested=XCR, count=16),
              pad("padding", 16))
EVENTS = Layout(
    Field("exception", nested=Layout(*fields("B", "injected", "nr", "has_error_code", "pending"),
                                     Field("error_code", "I"))),
    Field("interrupt", nested=Layout(*fields("B", "injected", "nr", "soft", "shadow"))),
    Field("nmi", nested=Layout(*fields("B", "injected", "pending", "masked"), pad("pad"))),
    Field("sipi_vector", "I"), Field("flags", "I"),
    Field("smi", nested=Layout(*fields("B", "smm", "pending", "smm_inside_nmi", "latched_init"))),
    Field("triple_fault", nested=Layout(Field("pending", "B"))),
    pad("reserved", 26),
    Field("exception_has_payload", "B"), Field("exception_payload", "Q"),
)
DEBUGREGS = Layout(Field("db", "Q", count=4), *fields("Q", "dr6", "dr7", "flags"), pad("reserved", 9))
PIC_CHIP = Layout(*fields("B", "last_irr", "irr", "imr", "isr", "priority_add", "irq_base",
                          "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi",
                          "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr",
                          "elcr_mask"))
PIC = Layout(Field("master", nested=PIC_CHIP), Field("slave", nested=PIC_CHIP))
IOAPIC = Layout(Field("base_address", "Q"), *fields("I", "ioregsel", "id", "irr"), pad("pad"),
                Field("redirtbl", "Q", count=24))
PIT_CHANNEL = Layout(
    Field("count", "I"), Field("latched_count", "H"),
    *fields("B", "count_latched", "status_latched", "status", "read_state", "write_state",
            "write_latch", "rw_mode", "mode", "bcd", "gate"),
    Field("count_load_time", "q"),
)
PIT = Layout(Field("channels", nested=PIT_CHANNEL, count=3), Field("flags", "I"), pad("reserved", 9))
PDPTRS = Layout(Field("flags", "Q"), Field("pdptrs", "Q", count=4))
CLOCK = Layout(Field("clock", "Q"), Field("flags", "I"), pad("pad0"), Field("realtime", "Q"),
               Field("host_tsc", "Q"), pad("pad", 4))


class StructCodec:
    """A dict shaped like a kernel struct <-> prefix + fixed fields."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.struct = struct.Struct(PREFIX + layout.format)

    def pack(self, vm: int, vcpu_id: int, state: Any) -> bytes:
        values: list = [vm, vcpu_id]
        self.layout.flatten(state, values)
        return self.struct.pack(*values)

    def unpack(self, body: bytes, what: str) -> tuple[int, int, Any]:
        expect_length(body, self.struct, what)
        values = self.struct.unpack(body)
        return values[0], values[1], self.layout.build(values, 2)


class ScalarCodec(StructCodec):
    """A single value: an int (``mp_state``) or a fixed-size byte string (LAPIC, XSAVE)."""

    def __init__(self, code: str) -> None:
        super().__init__(Layout(Field("value", code)))

    def pack(self, vm: int, vcpu_id: int, state: Any) -> bytes:
        if isinstance(state, (bytes, bytearray)) and len(state) != self.struct.size - 8:
            raise ValueError(f"expected {self.struct.size - 8} bytes, got {len(state)}")
        return super().pack(vm, vcpu_id, {"value": state})

    def unpack(self, body: bytes, what: str) -> tuple[int, int, Any]:
        vm, vcpu_id, state = super().unpack(body, what)
        return vm, vcpu_id, state["value"]


MSR_HEADER = struct.Struct(PREFIX + "II")  # vm, vcpu_id, count, reserved
MSR_ENTRY = struct.Struct("<IIQ")  # index, reserved (zero), value


class MsrCodec:
    """``{index: value}`` <-> count + entries in strictly ascending index order."""

    struct = MSR_HEADER

    def pack(self, vm: int, vcpu_id: int, state: dict) -> bytes:
        if len(state) > MAX_MSRS:
            raise ValueError(f"{len(state)} MSRs, at most {MAX_MSRS}")
        entries = b"".join(MSR_ENTRY.pack(index, 0, state[index]) for index in sorted(state))
        return MSR_HEADER.pack(vm, vcpu_id, len(state), 0) + entries

    def unpack(self, body: bytes, what: str) -> tuple[int, int, dict]:
        if len(body) < MSR_HEADER.size:
            raise StreamError(f"{what} body is {len(body)} bytes, shorter than its header")
        vm, vcpu_id, count, reserved = MSR_HEADER.unpack_from(body)
        if reserved:
            raise StreamError(f"{what} reserved field is 0x{reserved:x}, must be zero")
        if count > MAX_MSRS:
            raise StreamError(f"{what} count {count} exceeds {MAX_MSRS}")
        if len(body) != MSR_HEADER.size + count * MSR_ENTRY.size:
            raise StreamError(f"{what} body is {len(body)} bytes, {count} entries need "
                              f"{MSR_HEADER.size + count * MSR_ENTRY.size}")
        msrs: dict[int, int] = {}
        previous = -1
        for index, entry_reserved, value in MSR_ENTRY.iter_unpack(body[MSR_HEADER.size:]):
            if entry_reserved:
                raise StreamError(f"{what} entry for MSR 0x{index:x} has nonzero reserved field")
            if index <= previous:
                raise StreamError(f"{what} MSR indices not strictly ascending at 0x{index:x}")
            previous = index
            msrs[index] = value
        return vm, vcpu_id, msrs


VCPU_CODECS: dict[RecordType, Any] = {
    RecordType.VCPU_REGS: StructCodec(REGS),
    RecordType.VCPU_SREGS: StructCodec(SREGS),
    RecordType.VCPU_XSAVE: ScalarCodec("4096s"),
    RecordType.VCPU_XCRS: StructCodec(XCRS),
    RecordType.VCPU_MSRS: MsrCodec(),
    RecordType.VCPU_LAPIC: ScalarCodec("1024s"),
    RecordType.VCPU_EVENTS: StructCodec(EVENTS),
    RecordType.VCPU_MP_STATE: ScalarCodec("I"),
    RecordType.VCPU_DEBUGREGS: StructCodec(DEBUGREGS),
    RecordType.VCPU_PDPTRS: StructCodec(PDPTRS),
}
# vCPU record type -> the field of the KVM layer's vCPU state it carries (migrate.kvm.VcpuState,
# each named after its ioctl): the one place a vCPU record is tied to the state it holds. An
# optional type (bit 31) is one a restore can do without (its field is then None). The stream
# has no FPU record: VCPU_XSAVE carries the legacy FPU/SSE area too.
VCPU_FIELDS: dict[RecordType, str] = {
    RecordType.VCPU_REGS: "regs",
    RecordType.VCPU_SREGS: "sregs",
    RecordType.VCPU_XSAVE: "xsave",
    RecordType.VCPU_XCRS: "xcrs",
    RecordType.VCPU_MSRS: "msrs",
    RecordType.VCPU_LAPIC: "lapic",
    RecordType.VCPU_EVENTS: "events",
    RecordType.VCPU_MP_STATE: "mp_state",
    RecordType.VCPU_DEBUGREGS: "debugregs",
    RecordType.VCPU_PDPTRS: "pdptrs",
}
PLATFORM_CODECS: dict[RecordType, Any] = {
    RecordType.PIC: StructCodec(PIC),
    RecordType.IOAPIC: StructCodec(IOAPIC),
    RecordType.PIT: StructCodec(PIT),
    RecordType.CLOCK: StructCodec(CLOCK),
}
CODECS = {**VCPU_CODECS, **PLATFORM_CODECS}


@dataclass(frozen=True)
class HvmState:
    """One piece of a VM's HVM context: a vCPU's (``vcpu_id`` set) or the platform's
    (``vcpu_id`` None). ``state`` is the KVM layer's plain-data shape for ``type``."""

    type: RecordType
    vm: Vm
    vcpu_id: int | None
    state: Any
    body: bytes | None = field(default=None, compare=False, repr=False)    # as read (check_body)

    @property
    def TYPE(self) -> RecordType:  # noqa: N802 - same spelling as the class attribute elsewhere
        return self.type

    def pack(self) -> bytes:
        if (self.vcpu_id is None) != (self.type in PLATFORM_CODECS):
            raise ValueError(f"{self.type.name}: vcpu_id must be None exactly for platform records")
        vcpu_id = self.vcpu_id or 0
        if not 0 <= vcpu_id <= MAX_VCPU_ID:
            raise ValueError(f"vcpu_id {vcpu_id} outside 0..{MAX_VCPU_ID}")
        try:
            body = CODECS[self.type].pack(self.vm, vcpu_id, self.state)
            if self.type in _CHECKS:
                _CHECKS[self.type](self.state)      # a writer makes only what readers accept
            return body
        except StreamError as exc:
            raise ValueError(f"{self.type.name}: {exc.msg}") from None
        except (struct.error, KeyError, TypeError) as exc:
            raise ValueError(f"{self.type.name}: {exc!r}") from None

    @classmethod
    def unpack_as(cls, record_type: RecordType, body: bytes) -> HvmState:
        vm, vcpu_id, state = CODECS[record_type].unpack(body, record_type.name)
        if record_type in PLATFORM_CODECS:
            if vcpu_id:
                raise StreamError(f"{record_type.name} reserved vcpu_id field is {vcpu_id}, must be 0")
            return cls(record_type, vm_of(vm), None, state)
        if vcpu_id > MAX_VCPU_ID:
            raise StreamError(f"{record_type.name} vcpu_id {vcpu_id} exceeds {MAX_VCPU_ID}")
        if record_type in _CHECKS:
            _CHECKS[record_type](state)
        return cls(record_type, vm_of(vm), vcpu_id, state)

    @classmethod
    def check_body(cls, record_type: RecordType, body: bytes) -> HvmState:
        """What :meth:`unpack_as` refuses, refused, without keeping the decoded state: the
        record with its ``body`` and ``state`` None (:meth:`decoded` gives it). The types
        with rules on their values (VCPU_XCRS, VCPU_PDPTRS, VCPU_MSRS) are decoded for the
        check; the rest have no rules but the body's length, the VM and the vCPU id. For a
        restore that applies the bodies as they are (migrate/capture.py)."""
        if record_type in _DECODED:
            record = cls.unpack_as(record_type, body)
            return cls(record.type, record.vm, record.vcpu_id, None, bytes(body))
        expect_length(body, CODECS[record_type].struct, record_type.name)
        vm, vcpu_id = _PREFIX.unpack_from(body)
        if record_type in PLATFORM_CODECS:
            if vcpu_id:
                raise StreamError(f"{record_type.name} reserved vcpu_id field is {vcpu_id}, must be 0")
            return cls(record_type, vm_of(vm), None, None, bytes(body))
        if vcpu_id > MAX_VCPU_ID:
            raise StreamError(f"{record_type.name} vcpu_id {vcpu_id} exceeds {MAX_VCPU_ID}")
        return cls(record_type, vm_of(vm), vcpu_id, None, bytes(body))

    def decoded(self) -> HvmState:
        """This record with its state (decoded from its body if check_body left it out)."""
        return self if self.state is not None else HvmState.unpack_as(self.type, self.body)


@dataclass(frozen=True)
class HvmBodies:
    """One VM's HVM context records as bodies laid end to end in ``data`` (the record
    ``types``, ``vcpu_ids`` (None for platform records) and body ``lengths``, in the
    stream's order). A capture in C makes them (migrate/capture.py) without building the
    state as Python data; :meth:`of` makes the same from HvmState records, and
    :meth:`records` decodes them as a reader would."""

    vm: Vm
    types: tuple
    vcpu_ids: tuple
    lengths: tuple
    data: bytes

    @classmethod
    def of(cls, vm: Vm, records: list[HvmState]) -> HvmBodies:
        bodies = [record.pack() for record in records]
        return cls(vm, tuple(r.type for r in records), tuple(r.vcpu_id for r in records),
                   tuple(len(b) for b in bodies), b"".join(bodies))

    def bodies(self):
        """(type, vcpu_id, body) of each record."""
        at = 0
        for rtype, vcpu_id, length in zip(self.types, self.vcpu_ids, self.lengths):
            yield rtype, vcpu_id, self.data[at:at + length]
            at += length

    def records(self) -> list[HvmState]:
        return [HvmState.unpack_as(rtype, body) for rtype, _, body in self.bodies()]


_PREFIX = struct.Struct(PREFIX)
_DECODED = {RecordType.VCPU_XCRS, RecordType.VCPU_PDPTRS, RecordType.VCPU_MSRS}


class BodyScan:
    """Finds in C (``hvm_scan_records``) the run of HVM context records at a position of
    a reader's buffer that the reader would accept before their ordering rules: each
    record checked as :meth:`HvmState.check_body` and the record framing check it
    (reserved field, length, CRC, padding, VM and vCPU id, the value rules of VCPU_XCRS,
    VCPU_PDPTRS and VCPU_MSRS), and a VCPU_MSRS against its VM's MSR_POLICY as the
    ordering rules check it (StreamOrder). The scan stops at the first record that is
    anything else, which the reader then reads the slow way: that one raises the errors,
    so they are the same either way."""

    MAX_RUN = 64
    _RULES = {RecordType.VCPU_XCRS: lib.RULE_XCRS, RecordType.VCPU_PDPTRS: lib.RULE_PDPTRS,
              RecordType.VCPU_MSRS: lib.RULE_MSRS}

    def __init__(self) -> None:
        kinds = list(CODECS)
        self.types = frozenset(kinds)
        self._kinds = [(t, t in PLATFORM_CODECS) for t in kinds]
        self._table = (ffi.new("uint32_t[]", [int(t) for t in kinds]),
                       ffi.new("uint32_t[]", [CODECS[t].struct.size for t in kinds]),   # VCPU_MSRS: by its count
                       ffi.new("uint8_t[]", [platform for _, platform in self._kinds]),
                       ffi.new("uint8_t[]", [self._RULES.get(t, lib.RULE_NONE) for t in kinds]))
        self._out = (ffi.new("uint8_t[]", self.MAX_RUN), ffi.new("uint32_t[]", self.MAX_RUN),
                     ffi.new("uint32_t[]", self.MAX_RUN), ffi.new("uint32_t[]", self.MAX_RUN))
        self._policies: tuple = ()          # (the MsrPolicy objects, their C form)

    def prepare(self, policies: dict) -> tuple:
        """``policies`` (Vm -> MsrPolicy) as hvm_scan_records takes them: made once (a
        stream's MSR_POLICY records all come before its context records), by :meth:`run`
        or before it: a reader or writer calls this as each MSR_POLICY goes by, so that the
        first run (in a downtime) finds it made."""
        key = (policies.get(Vm.GUEST), policies.get(Vm.STUB))
        if not self._policies or any(a is not b for a, b in zip(self._policies[0], key)):
            arrays = [ffi.new("uint64_t[]", [word for index, flags, value in p.entries
                                             for word in (index | (lib.MSR_FEATURE_BIT if flags & MSR_FEATURE else 0),
                                                          value)] or [0]) if p is not None else ffi.NULL
                      for p in key]
            table = (ffi.new("uint64_t *[]", arrays),
                     ffi.new("int32_t[]", [len(p.entries) if p is not None else -1 for p in key]), arrays)
            self._policies = (key, table)
        return self._policies[1]

    def run(self, buf, pos: int, order) -> list[tuple]:
        """(type, vm, vcpu_id or None, body length, record length) of each record of the
        run at ``buf[pos:]`` that passes the checks above and then ``order``'s ordering
        rules (a StreamOrder: its MSR_POLICY records, and context_fits, which sees each
        record it lets through); empty if the first one does not (or is incomplete)."""
        types, sizes, platform, rules = self._table
        kinds, vms, vcpus, lengths = self._out
        policy_ptrs, policy_counts, _ = self.prepare(order.msr_policies)
        with memoryview(buf) as view, view[pos:] as rest:
            data = ffi.from_buffer("uint8_t[]", rest)
            try:
                n = lib.hvm_scan_records(data, len(rest), types, sizes, platform, rules, len(self._kinds),
                                         MAX_VCPU_ID, self.MAX_RUN, policy_ptrs, policy_counts,
                                         kinds, vms, vcpus, lengths)
            finally:
                ffi.release(data)       # the view's export ends here, not when the cdata is collected
        out, fits = [], order.context_fits
        for i in range(n):
            rtype, is_platform = self._kinds[kinds[i]]
            vm, vcpu_id = _VMS[vms[i]], None if is_platform else vcpus[i]
            if not fits(rtype, vm, vcpu_id):
                break
            out.append((rtype, vm, vcpu_id, lengths[i], RECORD_HEADER.size + padded(lengths[i])))
        return out


_VMS = (Vm.GUEST, Vm.STUB)


def _check_xcrs(state: dict) -> None:
    """VCPU_XCRS: ``nr_xcrs`` at most 16, ``flags`` zero, the entries from ``nr_xcrs``
    on all zero (spec "HVM context records", VCPU_XCRS): one meaning per body."""
    nr = state["nr_xcrs"]
    if nr > MAX_XCRS:
        raise StreamError(f"VCPU_XCRS nr_xcrs {nr} exceeds {MAX_XCRS}")
    if state["flags"]:
        raise StreamError(f"VCPU_XCRS flags 0x{state['flags']:x}, must be zero")
    for i, xcr in enumerate(state["xcrs"][nr:], nr):
        if xcr["xcr"] or xcr["value"]:
            raise StreamError(f"VCPU_XCRS entry {i} is not zero but nr_xcrs is {nr}")


def _check_pdptrs(state: dict) -> None:
    """VCPU_PDPTRS: ``flags`` is 0 or 1 (PDPTRS_VALID); a reader MUST refuse other bits."""
    if state["flags"] & ~1:
        raise StreamError(f"VCPU_PDPTRS flags 0x{state['flags']:x}: only bit 0 is defined")


_CHECKS = {RecordType.VCPU_XCRS: _check_xcrs, RecordType.VCPU_PDPTRS: _check_pdptrs}
