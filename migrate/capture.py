"""A VM's HVM context records, captured from a paused VM and applied to a never-run one,
in one C call each (migrate/kvm/capture.c).

On a live relocation both sit inside the downtime. Through the KVM layer
(``VcpuState.capture``: each struct to a dict, each dict flattened and packed by
``HvmState.pack``; on the destination the reverse, then ``VcpuState.apply``) they run a few
thousand lines of Python, cold in processes that have just spent seconds on pre-copy:
capture and records took 1.5-1.7 ms of an idle guest's 4.5-5 ms pause, decoding and
applying them at the destination 1.3-1.5 ms (traced). Here the ioctls and the copies run in
C and give, and take, the same bytes as ``HvmState.pack``.

The copy program of each record is derived here, once per VM, from the two declarations
that already exist: the stream's layout of the record (``migrate.stream.hvm``: the
carried fields, in order) and the kernel struct as cffi compiled it from <linux/kvm.h>
(each field's offset and size). A carried field whose size differs between the two is an
error when the program is made, not a wrong byte in a stream. tests/test_capture.py
compares both directions with the KVM layer's, record by record, on real VMs.

Applying from bodies checks nothing about their values: a restore's reader has checked
them first (``HvmState.check_body``: the rules of "HVM context records"), and the
destination's KVM refuses what it cannot take, as it does for the Python apply.
"""
from __future__ import annotations

import errno
import struct

from .kvm._lib import ffi, lib
from .kvm.errors import KvmError, msr_refused
from .kvm.state import set_msrs
from .stream.hvm import (
    CLOCK, DEBUGREGS, EVENTS, IOAPIC, MSR_ENTRY, MSR_HEADER, PDPTRS, PIC_CHIP, PIT, PLATFORM_CODECS, REGS, SREGS,
    VCPU_FIELDS, XCRS, HvmBodies, Layout,
)
from .stream.records import RecordType, Vm

ZERO = lib.HVM_CAP_ZERO
_U32 = struct.Struct("<I")

# Each record kept as one kernel struct: the struct, the suffix of its KVM_GET_/KVM_SET_
# ioctls, and the stream's layout of it (None: the record carries the whole struct).
# VCPU_MSRS and the irqchips (PIC, IOAPIC) are built apart: _msrs_step, _irqchip_step.
STRUCTS: dict[RecordType, tuple[str, str, Layout | None]] = {
    RecordType.VCPU_REGS: ("struct kvm_regs", "REGS", REGS),
    RecordType.VCPU_SREGS: ("struct kvm_sregs", "SREGS", SREGS),
    RecordType.VCPU_XSAVE: ("struct kvm_xsave", "XSAVE", None),
    RecordType.VCPU_XCRS: ("struct kvm_xcrs", "XCRS", XCRS),
    RecordType.VCPU_LAPIC: ("struct kvm_lapic_state", "LAPIC", None),
    RecordType.VCPU_EVENTS: ("struct kvm_vcpu_events", "VCPU_EVENTS", EVENTS),
    RecordType.VCPU_MP_STATE: ("struct kvm_mp_state", "MP_STATE", None),
    RecordType.VCPU_DEBUGREGS: ("struct kvm_debugregs", "DEBUGREGS", DEBUGREGS),
    RecordType.VCPU_PDPTRS: ("struct kvm_sregs2", "SREGS2", PDPTRS),
    RecordType.PIT: ("struct kvm_pit_state2", "PIT2", PIT),
    RecordType.CLOCK: ("struct kvm_clock_data", "CLOCK", CLOCK),
}


def _field(ctype, name: str):
    for fname, cfield in ctype.fields:
        if fname == name:
            return cfield
    raise ValueError(f"{ctype.cname} has no field {name!r}")


def segments(layout: Layout, ctype, base: int = 0, at: dict | None = None) -> list[tuple[int, int]]:
    """(offset, length) in a ``ctype`` struct placed at ``base`` of each carried field of
    ``layout``, in the layout's order, adjacent ones merged. ``at``: offsets (from
    ``base``) of fields cffi does not declare (the ones in anonymous unions)."""
    out: list[tuple[int, int]] = []
    for f in layout.fields:
        if not f.carried:
            continue
        if at and f.name in at:
            offset, ftype = base + at[f.name], None
        else:
            cfield = _field(ctype, f.name)
            offset, ftype = base + cfield.offset, cfield.type
        if f.nested is not None:
            if f.count:
                item = ftype.item
                for i in range(f.count):
                    out += segments(f.nested, item, offset + i * ffi.sizeof(item))
            else:
                out += segments(f.nested, ftype, offset)
            continue
        size = struct.calcsize("<" + f.code) * max(f.count, 1)
        if ftype is not None and ffi.sizeof(ftype) != size:
            raise ValueError(f"{ctype.cname}.{f.name}: {ffi.sizeof(ftype)} bytes in the kernel, "
                             f"{size} in the stream")
        out.append((offset, size))
    merged: list[tuple[int, int]] = []
    for offset, size in out:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((offset, size))
    return merged


def _struct_segments(rtype: RecordType) -> tuple[str, str, list[tuple[int, int]]]:
    """The struct, ioctl suffix and segments of a record in STRUCTS."""
    ctype, suffix, layout = STRUCTS[rtype]
    segs = segments(layout, ffi.typeof(ctype)) if layout is not None else [(0, ffi.sizeof(ctype))]
    return ctype, suffix, segs


class _Step:
    """One ioctl of a capture and what it adds to a record body (capture.c)."""

    def __init__(self, fd: int, ctype: str, ioctl: str, rtype: int, vm: Vm, vcpu_id: int,
                 segs: list[tuple[int, int]], prefill: bytes = b"", size: int | None = None,
                 expect_rc: int = -1):
        self.ioctl, self.vcpu_id = ioctl, vcpu_id
        self.rtype = RecordType(rtype) if rtype else None
        self.size = size if size is not None else ffi.sizeof(ctype)
        self.fd, self.request, self.expect_rc, self.vm = fd, getattr(lib, ioctl), expect_rc, vm
        self.prefill = ffi.new("uint8_t[]", prefill or b"\0")
        self.prefill_len = len(prefill)
        self.seg = ffi.new("uint32_t[]", [v for pair in segs for v in pair] or [0])
        self.nseg = len(segs)
        self.length = (8 if self.rtype else 0) + sum(n for _, n in segs)    # what it adds to the bodies

    def fill(self, slot) -> None:
        slot.fd, slot.size, slot.request, slot.expect_rc = self.fd, self.size, self.request, self.expect_rc
        slot.type, slot.vm, slot.vcpu_id = int(self.rtype or 0), int(self.vm), self.vcpu_id
        slot.prefill_len, slot.prefill, slot.nseg, slot.seg = self.prefill_len, self.prefill, self.nseg, self.seg


def _struct_step(fd, rtype: RecordType, vm, vcpu_id) -> _Step:
    ctype, suffix, segs = _struct_segments(rtype)
    return _Step(fd, ctype, "KVM_GET_" + suffix, rtype, vm, vcpu_id, segs)


def _msrs_step(fd, vm, vcpu_id, indices: list[int]) -> _Step:
    """VCPU_MSRS: count, reserved, then (index, reserved, value) in ascending index order,
    the kernel's kvm_msrs filled with the indices in that order."""
    ordered = sorted(indices)
    entry = ffi.sizeof("struct kvm_msr_entry")
    head = ffi.offsetof("struct kvm_msrs", "entries")
    index_at, data_at = ffi.offsetof("struct kvm_msr_entry", "index"), ffi.offsetof("struct kvm_msr_entry", "data")
    segs = [(ffi.offsetof("struct kvm_msrs", "nmsrs"), 4), (ZERO, 4)]
    for i in range(len(ordered)):
        segs += [(head + i * entry + index_at, 4), (ZERO, 4), (head + i * entry + data_at, 8)]
    prefill = _U32.pack(len(ordered)) + bytes(head - 4) + b"".join(_entry(index, entry, index_at)
                                                                   for index in ordered)
    return _Step(fd, "struct kvm_msrs", "KVM_GET_MSRS", RecordType.VCPU_MSRS, vm, vcpu_id, segs,
                 prefill=prefill, size=head + len(ordered) * entry, expect_rc=len(ordered))


def _entry(index: int, entry: int, index_at: int) -> bytes:
    out = bytearray(entry)
    _U32.pack_into(out, index_at, index)
    return bytes(out)


def _irqchip_segments(chip: str) -> list[tuple[int, int]]:
    """Segments of an irqchip's record (PIC: one chip of the two) in struct kvm_irqchip."""
    payload = lib.HVM_IRQCHIP_CHIP_OFFSET
    if chip == "KVM_IRQCHIP_IOAPIC":
        return segments(IOAPIC, ffi.typeof("struct kvm_ioapic_state"), payload,
                        {"redirtbl": lib.HVM_IOAPIC_REDIRTBL_OFFSET})
    return segments(PIC_CHIP, ffi.typeof("struct kvm_pic_state"), payload)


def _irqchip_step(fd, rtype, vm, chip: str) -> _Step:
    prefill = _U32.pack(getattr(lib, chip))        # chip_id, the struct's first field (offset 0)
    return _Step(fd, "struct kvm_irqchip", "KVM_GET_IRQCHIP", rtype, vm, 0, _irqchip_segments(chip),
                 prefill=prefill)


class StateCapture:
    """The HVM context records of one VM (``space``: its address space in the stream):
    each vCPU's in ``VCPU_FIELDS`` order (VCPU_PDPTRS where KVM has KVM_CAP_SREGS2), then
    the platform's, as ``engine.state.state_records`` orders them. Built once per VM;
    :meth:`capture` may run any number of times, on the paused VM."""

    def __init__(self, space: Vm, vm, vcpus: list, msr_indices: list[int]):
        if lib.HVM_IOAPIC_NUM_PINS != 24:
            raise ValueError(f"this kernel's IOAPIC has {lib.HVM_IOAPIC_NUM_PINS} pins; the stream carries 24")
        sregs2 = vm.kvm.has("KVM_CAP_SREGS2")
        steps: list[_Step] = []
        for vcpu in vcpus:
            for rtype in VCPU_FIELDS:
                if rtype is RecordType.VCPU_MSRS:
                    steps.append(_msrs_step(vcpu.fd, space, vcpu.id, msr_indices))
                elif rtype is not RecordType.VCPU_PDPTRS or sregs2:
                    steps.append(_struct_step(vcpu.fd, rtype, space, vcpu.id))
        steps += [
            _irqchip_step(vm.fd, RecordType.PIC, space, "KVM_IRQCHIP_PIC_MASTER"),
            _irqchip_step(vm.fd, 0, space, "KVM_IRQCHIP_PIC_SLAVE"),
            _irqchip_step(vm.fd, RecordType.IOAPIC, space, "KVM_IRQCHIP_IOAPIC"),
            _struct_step(vm.fd, RecordType.PIT, space, 0),
            _struct_step(vm.fd, RecordType.CLOCK, space, 0),
        ]
        self.space = space
        self.steps = steps
        self.c_steps = ffi.new("struct hvm_cap_step[]", len(steps))
        for step, slot in zip(steps, self.c_steps):
            step.fill(slot)
        records = [s for s in steps if s.rtype is not None]
        self.types = tuple(s.rtype for s in records)
        self.vcpu_ids = tuple(None if s.rtype in PLATFORM_CODECS else s.vcpu_id for s in records)
        self.scratch = ffi.new("uint8_t[]", max(s.size for s in steps))
        self.out_size = sum(s.length for s in steps)
        self.out = ffi.new("uint8_t[]", self.out_size)
        self.lens = ffi.new("uint32_t[]", len(records))
        self.failed = ffi.new("uint32_t *")

    def capture(self) -> HvmBodies:
        """The VM's records now (KvmError naming the ioctl that failed)."""
        n = lib.hvm_capture(self.c_steps, len(self.steps), self.scratch, len(self.scratch), self.out,
                            self.out_size, self.lens, self.failed)
        if n < 0:
            step = self.steps[self.failed[0]]
            raise KvmError(step.ioctl, -n, "capturing state: short read" if -n == errno.EIO else "capturing state")
        return HvmBodies(self.space, self.types, self.vcpu_ids, tuple(self.lens), ffi.buffer(self.out, n)[:])


# -- applying ------------------------------------------------------------------------------------
class _Apply:
    """One set ioctl of an apply, its segments as (struct offset, body offset, length)
    triples (capture.c, hvm_apply)."""

    def __init__(self, name: str, fd: int, ctype: str, ioctl: str, segs: list[tuple[int, int]],
                 body_at: int = 8, get: str | None = None, prefill: bytes = b"", size: int | None = None,
                 expect: int = -1):
        self.name, self.ioctl, self.fd = name, ioctl, fd
        self.size = size or ffi.sizeof(ctype)
        self.expect = expect
        self.request = getattr(lib, ioctl)
        self.get_request = getattr(lib, get) if get else 0
        triples, at = [], body_at
        for offset, length in segs:
            triples += [offset, at, length]
            at += length
        self.body_end = at
        self.seg = ffi.new("uint32_t[]", triples or [0])
        self.nseg = len(segs)
        self.prefill = ffi.new("uint8_t[]", prefill or b"\0")
        self.prefill_len = len(prefill)

    def fill(self, slot) -> None:
        slot.fd, slot.size, slot.request, slot.get_request = self.fd, self.size, self.request, self.get_request
        slot.prefill_len, slot.prefill, slot.nseg, slot.seg = self.prefill_len, self.prefill, self.nseg, self.seg
        slot.expect = self.expect


def _msrs_apply(fd: int, count: int) -> tuple[RecordType, _Apply]:
    """KVM_SET_MSRS straight from a VCPU_MSRS body of ``count`` entries: its entries are
    struct kvm_msr_entry as they are (index, reserved zero, value), after kvm_msrs' 8-byte
    header; KVM must set all of them."""
    entries = ffi.sizeof("struct kvm_msr_entry")
    return RecordType.VCPU_MSRS, _Apply("msrs", fd, "struct kvm_msrs", "KVM_SET_MSRS",
                                        [(ffi.sizeof("struct kvm_msrs"), entries * count)] if count else [],
                                        body_at=MSR_HEADER.size, prefill=struct.pack("<II", count, 0),
                                        size=ffi.sizeof("struct kvm_msrs") + entries * count, expect=count)


def _struct_apply(fd: int, rtype: RecordType, get: str | None = None) -> tuple[RecordType, _Apply]:
    ctype, suffix, segs = _struct_segments(rtype)
    return rtype, _Apply(VCPU_FIELDS.get(rtype, rtype.name.lower()), fd, ctype, "KVM_SET_" + suffix, segs,
                         get=get)


def _in_step(exc: KvmError, what: str, step: str) -> KvmError:
    """``exc`` said of a step of an apply (``what``: which VM part)."""
    return KvmError(exc.ioctl, exc.errno, f"{what}, step {step}" + (f": {exc.detail}" if exc.detail else ""))


class _Program:
    """Apply steps made once, run with each call's bodies."""

    def __init__(self, steps: list[tuple[RecordType, _Apply]]):
        self.steps = steps
        self.c_steps = ffi.new("struct hvm_apply_step[]", max(len(steps), 1))
        for (_, step), slot in zip(steps, self.c_steps):
            step.fill(slot)
        self.scratch = ffi.new("uint8_t[]", max([s.size for _, s in steps] or [1]))
        self.failed = ffi.new("uint32_t *")

    def run(self, bodies: dict, what: str) -> None:
        keep = []
        for (rtype, step), slot in zip(self.steps, self.c_steps):
            body = bodies[rtype]
            if len(body) < step.body_end:
                raise ValueError(f"{rtype.name} body of {len(body)} bytes, {step.body_end} needed")
            buf = ffi.from_buffer("uint8_t[]", body)
            keep.append(buf)
            slot.body, slot.body_len = buf, len(body)
        rc = lib.hvm_apply(self.c_steps, len(self.steps), self.scratch, len(self.scratch), self.failed)
        if rc < 0:
            rtype, step = self.steps[self.failed[0]]
            done = self.c_steps[self.failed[0]].result
            if rc == -errno.ERANGE and step.expect >= 0 and done >= 0:     # KVM_SET_MSRS set only the first `done`
                index, _, value = MSR_ENTRY.unpack_from(bodies[rtype], MSR_HEADER.size + MSR_ENTRY.size * done)
                raise _in_step(msr_refused(index, value), what, step.name)
            raise _in_step(KvmError(step.ioctl, -rc), what, step.name)


class StateApply:
    """Applies one VM's HVM context records, from their bodies, to the never-run VM; in
    the order and with the rules of ``VcpuState.apply`` and ``PlatformState.apply``
    (migrate/kvm/state.py), whose docstrings say why: per vCPU sregs, PDPTRs (when KVM
    has KVM_CAP_SREGS2 and the record says they are valid), regs, xsave, xcrs, lapic,
    then the MSRs, mp_state, events, debugregs; the platform's irqchips, PIT, and of
    kvmclock only the clock.

    Which MSRs to set, and how, is the CPU policy's business (``msrs_to_apply``), so they
    are set from decoded values in Python, between two C programs; except where the caller
    says, with ``direct_msrs`` (the MSR indices of the VM's policy), that this host takes a
    VCPU_MSRS body of exactly those MSRs as it is: the vCPU's whole apply is then one C
    program (:meth:`takes_msrs_as_saved`)."""

    def __init__(self, vm, vcpus: list, direct_msrs: list[int] | None = None):
        self.vm, self.vcpus = vm, vcpus
        self.sregs2 = vm.kvm.has("KVM_CAP_SREGS2")
        self.before: list[tuple[_Program, _Program]] = []      # per vCPU: without, with the PDPTRs
        self.after: list[_Program] = []
        self.whole: list[tuple[_Program, _Program]] = []       # direct_msrs: before, MSRs, after
        self.direct_msrs = list(direct_msrs) if direct_msrs is not None else None
        for vcpu in vcpus:
            fd = vcpu.fd
            sregs = _struct_apply(fd, RecordType.VCPU_SREGS)
            rest = [_struct_apply(fd, rt) for rt in (RecordType.VCPU_REGS, RecordType.VCPU_XSAVE,
                                                     RecordType.VCPU_XCRS, RecordType.VCPU_LAPIC)]
            pdptrs = [_struct_apply(fd, RecordType.VCPU_PDPTRS, get="KVM_GET_SREGS2")] if self.sregs2 else []
            after = [_struct_apply(fd, rt) for rt in (RecordType.VCPU_MP_STATE, RecordType.VCPU_EVENTS,
                                                      RecordType.VCPU_DEBUGREGS)]
            self.before.append((_Program([sregs] + rest), _Program([sregs] + pdptrs + rest)))
            self.after.append(_Program(after))
            if self.direct_msrs is not None:
                msrs = [_msrs_apply(fd, len(self.direct_msrs))]
                self.whole.append((_Program([sregs] + rest + msrs + after),
                                   _Program([sregs] + pdptrs + rest + msrs + after)))
        pic_bytes = sum(n for _, n in _irqchip_segments("KVM_IRQCHIP_PIC_MASTER"))

        def chip(name, which, at=8):
            return _Apply(name, vm.fd, "struct kvm_irqchip", "KVM_SET_IRQCHIP", _irqchip_segments(which),
                          body_at=at, prefill=_U32.pack(getattr(lib, which)))
        self.platform = _Program([
            (RecordType.PIC, chip("pic_master", "KVM_IRQCHIP_PIC_MASTER")),
            (RecordType.PIC, chip("pic_slave", "KVM_IRQCHIP_PIC_SLAVE", 8 + pic_bytes)),
            (RecordType.IOAPIC, chip("ioapic", "KVM_IRQCHIP_IOAPIC")),
            _struct_apply(vm.fd, RecordType.PIT),
            # only the clock value: realtime and host_tsc would need KVM_CLOCK_REALTIME on
            # both hosts and the same time base (PlatformState.apply)
            (RecordType.CLOCK, _Apply("clock", vm.fd, "struct kvm_clock_data", "KVM_SET_CLOCK",
                                      [(ffi.offsetof("struct kvm_clock_data", "clock"), 8)])),
        ])

    def apply_platform(self, bodies: dict) -> None:
        """``bodies``: the platform records' bodies by type."""
        self.platform.run(bodies, "applying platform state")

    def takes_msrs_as_saved(self, body: bytes) -> bool:
        """This VCPU_MSRS body goes to KVM as it is (``direct_msrs``: exactly those MSRs)."""
        if self.direct_msrs is None:
            return False
        if len(body) != MSR_HEADER.size + MSR_ENTRY.size * len(self.direct_msrs):
            return False
        indices = memoryview(body)[MSR_HEADER.size:].cast("I")[::MSR_ENTRY.size // 4]     # each entry's first u32
        return not self.direct_msrs or indices.tolist() == self.direct_msrs

    def apply_vcpu(self, index: int, bodies: dict, msrs: dict[int, int] | None, pdptrs_valid: bool) -> None:
        """The vCPU ``index``'s records (bodies by type) and the MSRs to set (decoded, as the
        CPU policy lets them be set here: ``msrs_to_apply``), or None to set them from the
        VCPU_MSRS body as it is (only when :meth:`takes_msrs_as_saved` says so)."""
        what = f"applying vCPU {self.vcpus[index].id} state"
        without, with_pdptrs = self.whole[index] if msrs is None else self.before[index]
        (with_pdptrs if pdptrs_valid and self.sregs2 else without).run(bodies, what)
        if msrs is None:
            return
        try:
            set_msrs(self.vcpus[index], msrs)
        except KvmError as exc:
            raise _in_step(exc, what, "msrs") from exc
        self.after[index].run(bodies, what)


__all__ = ["STRUCTS", "StateApply", "StateCapture", "segments"]
