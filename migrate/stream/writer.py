"""The stream writer (specs/stream-format.md, sections "Stream header", "Record framing",
"Ordering" and "END"). It does no I/O: every method returns the bytes to send.

The writer keeps the counts and the XXH3-128 digest that END carries, and refuses to
produce a stream that breaks the ordering rules (ValueError).
"""

from __future__ import annotations

from typing import Any, Iterable

import xxhash

from migrate.stream.cpu import MsrPolicy
from migrate.stream.errors import StreamError
from migrate.stream.framing import frame, frame_many
from migrate.stream.hvm import CODECS, BodyScan, HvmBodies, HvmState
from migrate.stream.order import StreamOrder
from migrate.stream.pages import PageBatch
from migrate.stream.records import MAX_PAGES_PER_BATCH, MAX_RECORD_BODY, DeviceBodies, End, Header, RecordType, Vm


class StreamWriter:
    def __init__(self) -> None:
        self._digest = xxhash.xxh3_128()
        self._offset = 0
        self._records = 0
        self._pages = 0
        self._order = StreamOrder()
        self._scan = BodyScan()                 # hvm_bodies' check of what it framed
        self._started = False
        self._finished = False

    def start(self, header: Header | None = None) -> bytes:
        """The stream header; must be the first thing written."""
        if self._started:
            raise ValueError("stream header already written")
        self._started = True
        return self._emit((header or Header()).pack())

    def record(self, record: Any) -> bytes:
        """One record (any record dataclass), after checking the ordering rules."""
        self._check_order(self._order.observe, record)
        if isinstance(record, MsrPolicy):
            self._scan.prepare(self._order.msr_policies)
        pages = len(record.pages) if isinstance(record, PageBatch) else 0
        return self.raw(record.TYPE, record.pack(), pages)

    def hvm_bodies(self, bodies: HvmBodies) -> bytes:
        """One VM's HVM context records from their bodies (a capture in C made them): framed,
        then checked as a restore's reader checks them (hvm.BodyScan: the framing, each
        body's value rules, a VCPU_MSRS against its MSR_POLICY) and by the ordering rules.
        The first record that does not pass is decoded and observed, which says why."""
        for length in bodies.lengths:
            self._check_body(length)
        framed = frame_many(bodies.types, bodies.lengths, bodies.data)
        pos, i, at = 0, 0, 0
        types, vcpu_ids, lengths, vm_ = bodies.types, bodies.vcpu_ids, bodies.lengths, Vm(bodies.vm)
        while i < len(types):
            found = self._scan.run(framed, pos, self._order)
            for rtype, vm, vcpu_id, length, total in found:
                if rtype != types[i] or vcpu_id != vcpu_ids[i] or vm is not vm_:
                    break
                pos, at, i = pos + total, at + length, i + 1
            else:
                if found:
                    continue
            self._refuse(vm_, types[i], vcpu_ids[i], bodies.data[at:at + lengths[i]])
        self._records += len(bodies.types)
        return self._emit(framed)

    def device_bodies(self, devices: DeviceBodies) -> bytes:
        """DEVICE_STATE records from their bodies (a capture made them: DeviceBodies), framed
        after the ordering rules' check of each (device, instance)."""
        if not devices.bodies:
            return b""
        for (device, instance), body in zip(devices.keys, devices.bodies):
            self._check_body(len(body))
            self._check_order(self._order.device, device, instance)
        self._records += len(devices.bodies)
        return self._emit(frame_many((RecordType.DEVICE_STATE,) * len(devices.bodies),
                                     tuple(len(b) for b in devices.bodies), b"".join(devices.bodies)))

    def _refuse(self, vm: Vm, rtype: int, vcpu_id: int | None, body: bytes) -> None:
        """Raise why ``body`` (of ``vm``'s record ``rtype`` for ``vcpu_id``) cannot be
        written: the reader's own error for it, or that its body names another VM or vCPU."""
        if rtype not in CODECS:
            raise ValueError(f"writer refuses: record type 0x{int(rtype):x} is not an HVM context record")
        rtype = RecordType(rtype)
        try:
            record = HvmState.unpack_as(rtype, body)
        except StreamError as exc:
            raise ValueError(f"writer refuses: {exc.msg}") from None
        if (record.vm, record.vcpu_id) != (vm, vcpu_id):
            raise ValueError(f"writer refuses: {rtype.name} for {vm.name} vcpu {vcpu_id} says "
                             f"{record.vm.name} vcpu {record.vcpu_id}")
        self._check_order(self._order.observe, record)
        raise AssertionError(f"the context scan refused {rtype.name} of {vm.name} vcpu {vcpu_id}, which the "
                             "reader's own checks take")       # the two checks disagree: a bug

    def pages(self, space: Vm, pages: Iterable[tuple[int, bytes]], compressed: bool = False) -> bytes:
        """Any number of pages, split into batches of at most MAX_PAGES_PER_BATCH."""
        out, batch = [], []
        for page in pages:
            batch.append(page)
            if len(batch) == MAX_PAGES_PER_BATCH:
                out.append(self.record(PageBatch(space, tuple(batch), compressed)))
                batch = []
        if batch:
            out.append(self.record(PageBatch(space, tuple(batch), compressed)))
        return b"".join(out)

    @staticmethod
    def _check_order(check, *args) -> None:
        """Run an ordering check; its StreamError becomes the writer's ValueError."""
        try:
            check(*args)
        except StreamError as exc:
            raise ValueError(f"writer refuses: {exc.msg}") from None

    def _check_body(self, length: int) -> None:
        if not self._started or self._finished:
            raise ValueError("records go between start() and finish()")
        if length > MAX_RECORD_BODY:
            raise ValueError(f"record body of {length} bytes exceeds {MAX_RECORD_BODY}")

    def raw(self, record_type: int, body: bytes, page_count: int = 0) -> bytes:
        """Frame a body as-is, without ordering checks: for tests and tools that build
        unusual streams. Counted in END like any record."""
        self._check_body(len(body))
        self._records += 1
        self._pages += page_count
        return self._emit(frame(record_type, body))

    def check_pages(self, space: Vm, pfns) -> None:
        """The ordering rules for pages written without this writer (a data plane's):
        the space's layout came first and ``pfns`` lie in it."""
        self._check_order(self._order.pages, "page batch", space, pfns)

    def end(self, records: int, pages: int, offset: int, digest: bytes) -> bytes:
        """The END record of a stream whose bytes were written and counted elsewhere (the
        data plane's Output): ``records`` before END, ``pages`` entries, END's ``offset``,
        the XXH3-128 ``digest`` of everything before it. Nothing may follow it."""
        end = End(records, pages, offset, digest)
        self._check_order(self._order.observe, end)
        self._finished = True
        return frame(end.TYPE, end.pack())

    def finish(self) -> bytes:
        """The END record; nothing may follow it."""
        end = End(self._records, self._pages, self._offset, self._digest.digest())
        self._check_order(self._order.observe, end)
        data = self.raw(end.TYPE, end.pack())
        self._finished = True
        return data

    def _emit(self, data: bytes) -> bytes:
        self._digest.update(data)
        self._offset += len(data)
        return data


def encode_stream(records: Iterable[Any], header: Header | None = None) -> bytes:
    """A complete stream from records (END, if present, is replaced by a fresh one)."""
    writer = StreamWriter()
    out = [writer.start(header)]
    out += [writer.record(record) for record in records if not isinstance(record, End)]
    out.append(writer.finish())
    return b"".join(out)
