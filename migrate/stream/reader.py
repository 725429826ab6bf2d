"""The sans-I/O stream reader (specs/stream-format.md, all sections; "Reading" gives the
order of checks).

Feed it bytes with :meth:`StreamReader.feed`; :meth:`StreamReader.next_record` returns the
next record, :data:`NEED_DATA` when it needs more input, or :data:`DONE` after END. Call
:meth:`StreamReader.eof` when the input ends: it raises StreamTruncated unless END was seen.
Every problem with the input raises StreamError naming the offset, record index and type;
after one, the reader raises the same error again.
"""

from __future__ import annotations

import mmap
from collections import deque
from functools import partial
from typing import Any, Callable

import xxhash

from migrate.stream import cpu
from migrate.stream.cpu import CpuidPolicy, CpuModel, MsrPolicy
from migrate.stream.errors import StreamError, StreamTruncated
from migrate.stream.framing import record_crc
from migrate.stream.hvm import CODECS, BodyScan, HvmState
from migrate.stream.order import StreamOrder
from migrate.stream.pages import PageBatch, RawPageBatch, decode_raw_batch
from migrate.stream.records import (
    BODY_CAPS, CHANNEL_ENTRY, CHANNEL_SYNC_SIZE, CHANNELS_HEADER, END, FORMAT_VERSION, HEADER, MAGIC, MAX_CHANNELS, MAX_HEADER_LENGTH, MAX_MSRS, MAX_RANGES,
    MAX_RECORD_BODY, MEMORY_LAYOUT, MEMORY_LAYOUT_V1, MEMORY_RANGE, MIN_READ_VERSION, OPTIONAL,
    RECORD_ALIGN, RECORD_HEADER, Channels, Creator, DeviceState, DomainConfig, End, Header,
    MAX_BATCH_BODY, MemoryLayout, RecordType, padded, reserved_optional,
)


# A page batch of which at least this much (header, body, padding) has come, but not all,
# is gathered in a buffer of its own rather than in the reader's buffer (StreamReader.feed).
BIG_RECORD = 1 << 18
_PAGE_TYPES = (RecordType.PAGE_DATA, RecordType.PAGE_DATA_ZSTD)
# What StreamReader.read_from reads at most at once when no page batch is being gathered.
READ_CHUNK = BIG_RECORD


class _PooledBuffer(mmap.mmap):
    """A buffer of a BufferPool: anonymous memory, faulted in only where it is written."""


class BufferPool:
    """Buffers in which a StreamReader gathers page batches, used again and again: a
    restore reads its stream into memory that is already there instead of having a fresh
    buffer, zeroed and faulted in page by page, for every batch (on some hosts the first
    write to fresh memory runs at a tenth of memcpy's speed).

    The reader takes a buffer for each batch it gathers and gives it back itself when it
    hands the batch on without its body; when it hands the body on (``raw_pages``, as a
    view of the buffer), whoever takes the batch gives the buffer back with :meth:`put`
    once nothing reads the body any more, or drops it (then it is freed as any object
    is). At most ``keep`` free buffers are kept; the rest are freed. Thread-safe."""
    SIZE = RECORD_HEADER.size + padded(MAX_BATCH_BODY)     # the largest page batch, framed

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._free: deque = deque()

    def get(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes (at most SIZE: the reader gathers only page
        batches, whose bodies the caps bound) of a free buffer, or of a new one. Its
        contents are undefined."""
        try:
            buf = self._free.pop()
        except IndexError:
            buf = _PooledBuffer(-1, self.SIZE, flags=mmap.MAP_PRIVATE)     # plain anonymous memory
        return memoryview(buf)[:size]

    def put(self, view) -> None:
        """Give back the buffer ``view`` is a view of, and release ``view``; the caller
        and every other view of that buffer must not read it any more. Anything that is
        not a view of a pool's buffer is left as it is."""
        if not isinstance(view, memoryview) or type(view.obj) is not _PooledBuffer:
            return
        buf = view.obj
        try:
            view.release()
        except BufferError:         # something still holds the view's buffer: not free
            return
        if len(self._free) < self.keep:
            self._free.append(buf)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
DONE = _Sentinel("DONE")
_SKIPPED = _Sentinel("SKIPPED")  # internal: an unknown optional record was passed over

KNOWN_INCOMPAT_FLAGS = 0  # versions 1 and 2 define none
MAX_SKIPPED_KEPT = 64

Decoder = Callable[[bytes], Any]
_V1_DECODERS: dict[int, Decoder] = {
    RecordType.DOMAIN_CONFIG: DomainConfig.unpack,
    RecordType.MEMORY_LAYOUT: MemoryLayout.unpack_v1,
    RecordType.PAGE_DATA: partial(PageBatch.unpack_as, RecordType.PAGE_DATA),
    RecordType.PAGE_DATA_ZSTD: partial(PageBatch.unpack_as, RecordType.PAGE_DATA_ZSTD),
    **{record_type: partial(HvmState.unpack_as, record_type) for record_type in CODECS},
    RecordType.DEVICE_STATE: DeviceState.unpack,
    RecordType.CREATOR: Creator.unpack,
}
def _channel_sync(body: bytes) -> Any:
    """CHANNEL_SYNC, a type of version 2 that only a channel stream carries: refused."""
    raise StreamError("CHANNEL_SYNC in the main stream (it belongs in a channel stream)")


# Version 2: MEMORY_LAYOUT holds ranges; the CPU records are new.
_V2_DECODERS: dict[int, Decoder] = {
    **_V1_DECODERS,
    RecordType.MEMORY_LAYOUT: MemoryLayout.unpack,
    RecordType.CPU_MODEL: CpuModel.unpack,
    RecordType.CPUID_POLICY: CpuidPolicy.unpack,
    RecordType.MSR_POLICY: MsrPolicy.unpack,
    RecordType.CHANNELS: Channels.unpack,
    RecordType.CHANNEL_SYNC: _channel_sync,
}
# One decoder table per readable format version (this one and the one before).
DECODERS: dict[int, dict[int, Decoder]] = {1: _V1_DECODERS, 2: _V2_DECODERS}
# Largest body of each known type, per version (spec "Caps", "Body caps"): fixed sizes and
# BODY_CAPS; a type the version does not know may be up to MAX_RECORD_BODY. Checked before
# the body is waited for.
_V1_CAPS: dict[int, int] = {
    RecordType.END: END.size, RecordType.MEMORY_LAYOUT: MEMORY_LAYOUT_V1.size,
    **{record_type: codec.struct.size for record_type, codec in CODECS.items()},
    **BODY_CAPS,
}
_V2_CAPS: dict[int, int] = {
    **_V1_CAPS,
    RecordType.MEMORY_LAYOUT: MEMORY_LAYOUT.size + MAX_RANGES * MEMORY_RANGE.size,
    RecordType.CPU_MODEL: cpu.CPU_MODEL.size,
    RecordType.CPUID_POLICY: cpu.COUNT_HEADER.size + cpu.MAX_CPUID_ENTRIES * cpu.CPUID_ENTRY.size,
    RecordType.MSR_POLICY: cpu.COUNT_HEADER.size + MAX_MSRS * cpu.MSR_POLICY_ENTRY.size,
    RecordType.CHANNELS: CHANNELS_HEADER.size + MAX_CHANNELS * CHANNEL_ENTRY.size,
    RecordType.CHANNEL_SYNC: CHANNEL_SYNC_SIZE,     # a type of the version, refused by name
}
CAPS: dict[int, dict[int, int]] = {1: _V1_CAPS, 2: _V2_CAPS}
# The mandatory types of each version, whose optional-bit twins are reserved: END and
# what it decodes (or refuses by name: CHANNEL_SYNC).
MANDATORY: dict[int, frozenset[int]] = {version: frozenset({RecordType.END, *decoders})
                                        for version, decoders in DECODERS.items()}
# What raw_pages=True puts in place of the PageBatch decoders ("bodies": without looking
# at the page data, which the caller's placement checks, as the data plane's Target does).
RAW_PAGE_DECODERS: dict[str, dict[int, Decoder]] = {
    mode: {record_type: partial(decode_raw_batch, record_type, data=mode == "decoded")
           for record_type in (RecordType.PAGE_DATA, RecordType.PAGE_DATA_ZSTD)}
    for mode in ("decoded", "bodies")}
# What hvm_bodies=True puts in place of the HVM context decoders: the same checks, the
# bodies kept and decoded only where a rule needs their values (HvmState.check_body).
HVM_BODY_DECODERS: dict[int, Decoder] = {record_type: partial(HvmState.check_body, record_type)
                                         for record_type in CODECS}


class StreamReader:
    def __init__(self, *, leave_trailing: bool = False, raw_pages: bool | str = False,
                 hvm_bodies: bool = False, pool: BufferPool | None = None) -> None:
        """``leave_trailing``: bytes after END are left untouched in :attr:`trailing`
        instead of being an error. ``raw_pages``: page batches come out as
        :class:`~migrate.stream.pages.RawPageBatch` (same checks, no per-page objects);
        ``raw_pages="bodies"``: the same, except that the page data is left as it is, for
        a caller that checks it when it places the pages (the data plane's Target: its
        length, and the zstd frame by the rules of "PAGE_DATA_ZSTD"). ``hvm_bodies``: HVM
        context records keep their bodies and are decoded only where a rule needs their
        values (:meth:`~migrate.stream.hvm.HvmState.check_body`: same checks), for a
        restore that applies the bodies as they are. ``pool``: page batches are gathered
        in its buffers (see BufferPool for who gives them back), instead of a new buffer
        each."""
        self.leave_trailing = leave_trailing
        self.pool = pool
        self.raw_pages = raw_pages
        self.hvm_bodies = hvm_bodies
        self.header: Header | None = None
        self.skipped: list[tuple[int, int]] = []  # (offset, type) of the first skipped optional records
        self.skipped_count = 0                     # all of them (the list keeps MAX_SKIPPED_KEPT)
        self._buf = bytearray()
        self._pos = 0  # read position in _buf
        # A page batch of which BIG_RECORD bytes are here but not all: its own buffer of
        # exactly its size (header checked), filled by feed(), instead of _buf, which would
        # grow and copy it, and its body handed on without another copy.
        self._big: bytearray | memoryview | None = None
        self._big_have = 0
        self._scratch: bytearray | None = None     # read_from's buffer for other bytes
        self._offset = 0  # stream offset of _buf[_pos]
        self._index = 0  # index of the next record
        self._pages = 0
        self._digest = xxhash.xxh3_128()
        self._order = StreamOrder()
        self._decoders: dict[int, Decoder] = {}
        self._caps: dict[int, int] = {}
        self._done = False
        self._failed: StreamError | None = None
        self._scan: BodyScan | None = None     # with hvm_bodies: runs of context records checked in C
        self._run: deque = deque()             # what the last scan found, not yet handed out
        self.last: tuple = (0, None, None)  # offset, index and type of the last record returned

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet consumed: after a record is returned,
        the offset of the next record's header."""
        return self._offset

    @property
    def trailing(self) -> bytes:
        """Bytes received after END (only with ``leave_trailing``)."""
        return bytes(self._buf[self._pos:]) if self._done else b""

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; they are copied, so ``data`` may be reused."""
        if self._failed:
            raise self._failed
        if self._big is not None:
            take = min(len(data), len(self._big) - self._big_have)
            with memoryview(data) as view:
                self._big[self._big_have:self._big_have + take] = view[:take]
                self._big_have += take
                if take < len(data):
                    self._buf += view[take:]
            return
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data
        if self._done and data:
            self._check_trailing()

    def read_from(self, readinto: Callable[[memoryview], int]) -> int:
        """Take the next bytes of the stream from ``readinto(view)``, which reads into
        ``view`` and returns how many bytes it read (0: the input has ended), as a raw
        file's ``readinto`` does; returns that count. Called once: the rest of a page
        batch being gathered in a buffer of its own is read straight into it (no copy);
        other bytes, at most READ_CHUNK, go through a buffer of the reader's, as
        :meth:`feed` takes them."""
        if self._failed:
            raise self._failed
        big = self._big
        if big is not None and self._big_have < len(big):
            with memoryview(big) as view:
                n = readinto(view[self._big_have:])
            self._big_have += n
            return n
        if self._scratch is None:
            self._scratch = bytearray(READ_CHUNK)
        with memoryview(self._scratch) as view:
            n = readinto(view)
            if n:
                self.feed(view[:n])
        return n

    def next_record(self) -> Any:
        if self._failed:
            raise self._failed
        try:
            if self._done:
                self._check_trailing()
                return DONE
            if self.header is None and self._read_header() is NEED_DATA:
                return NEED_DATA
            record = self._read_record()
            while record is _SKIPPED:
                record = self._read_record()
            if self._done:
                self._check_trailing()
            return record
        except StreamError as exc:
            self._failed = exc
            raise

    def take_run(self) -> list:
        """The rest of a run of HVM context records that the last :meth:`next_record` call
        found and checked with the one it returned (``hvm_bodies``), each as next_record
        would return it, in order, consumed: a restore takes a VM's context records in one
        call instead of one each, inside the pause. Empty when there is none."""
        run = []
        while self._run:
            run.append(self._run_record())
        return run

    def eof(self) -> None:
        """The input has ended: raise StreamTruncated unless END was read."""
        if self._failed:
            raise self._failed
        if self._done:
            return
        pending = len(self._buf) - self._pos
        if self._big is not None:
            pending += self._big_have
        if self.header is None:
            msg = f"input ended inside the stream header ({pending} bytes)"
            record_type = index = None
        else:
            msg = f"input ended before END ({pending} bytes of an incomplete record)"
            index = self._index
            record_type = (RECORD_HEADER.unpack_from(self._big)[0] if self._big is not None
                           else RECORD_HEADER.unpack_from(self._buf, self._pos)[0] if pending >= 16 else None)
        self._failed = StreamTruncated(msg, self._offset + pending, index, record_type)
        raise self._failed

    close = eof

    # ---- header -----------------------------------------------------------------------

    def _read_header(self) -> Any:
        data = self._buf[self._pos:]
        seen = bytes(data[:len(MAGIC)])
        if seen != MAGIC[:len(seen)]:
            raise StreamError(f"bad magic {seen.hex()}, expected {MAGIC.hex()}", 0)
        if len(data) < HEADER.size:
            return NEED_DATA
        _, version, length, incompat, _compat = HEADER.unpack_from(data)
        if version > FORMAT_VERSION or version < MIN_READ_VERSION:
            age = "newer" if version > FORMAT_VERSION else "older"
            raise StreamError(
                f"stream format version {version} is {age} than this reader reads "
                f"(versions {MIN_READ_VERSION}..{FORMAT_VERSION})", 0)
        if not HEADER.size <= length <= MAX_HEADER_LENGTH or length % RECORD_ALIGN:
            raise StreamError(f"header length {length} is not a multiple of {RECORD_ALIGN} "
                              f"in {HEADER.size}..{MAX_HEADER_LENGTH}", 0)
        if incompat & ~KNOWN_INCOMPAT_FLAGS:
            raise StreamError(f"unknown incompatible header flags 0x{incompat:x}", 0)
        if len(data) < length:
            return NEED_DATA
        self.header = Header(version, length, incompat, _compat)
        self._decoders = DECODERS[version]
        self._caps = CAPS[version]
        self._mandatory = MANDATORY[version]
        if self.raw_pages:
            mode = "bodies" if self.raw_pages == "bodies" else "decoded"
            self._decoders = {**self._decoders, **RAW_PAGE_DECODERS[mode]}
        if self.hvm_bodies:
            self._decoders = {**self._decoders, **HVM_BODY_DECODERS}
            self._scan = BodyScan()
        self._consume(length, digest=True)
        return self.header

    # ---- records ----------------------------------------------------------------------

    def _read_record(self) -> Any:
        if self._run:
            return self._run_record()
        start, index = self._offset, self._index
        big = self._big
        if big is not None:
            if self._big_have < len(big):
                return NEED_DATA
            buf, pos = big, 0
        else:
            buf, pos = self._buf, self._pos
        if len(buf) - pos < RECORD_HEADER.size:
            return NEED_DATA
        record_type, length, reserved, crc = RECORD_HEADER.unpack_from(buf, pos)
        if big is None and self._scan is not None and record_type in self._scan.types:
            self._take_run()
            if self._run:
                return self._run_record()
        try:
            if reserved:
                raise StreamError(f"record header reserved field is 0x{reserved:x}, must be zero")
            cap = self._caps.get(record_type, MAX_RECORD_BODY)
            if length > cap:
                kind = "this type's cap" if cap < MAX_RECORD_BODY else "MAX_RECORD_BODY"
                raise StreamError(f"record body length {length} exceeds {cap} ({kind})")
            total = RECORD_HEADER.size + padded(length)
            if len(buf) - pos < total:
                # a page batch (capped at about 5 MiB) once BIG_RECORD bytes of it are here:
                # a bare header allocates nothing beyond what has come
                if big is None and record_type in _PAGE_TYPES and len(buf) - pos >= BIG_RECORD:
                    self._start_big(total)
                return NEED_DATA
            body_at = pos + RECORD_HEADER.size
            with memoryview(buf) as view, view[body_at:body_at + length] as body_view:
                if record_crc(record_type, body_view) != crc:
                    raise StreamError(f"record CRC-32 mismatch (stored 0x{crc:08x})")
                if any(view[body_at + length:pos + total]):
                    raise StreamError("record padding is not zero")
                # an unknown record is skipped without copying its body (spec "Memory"); a
                # raw page batch in a buffer of its own is handed on without a copy
                if record_type not in self._decoders and record_type != RecordType.END:
                    body = b""
                elif big is not None and self.raw_pages:
                    body = memoryview(big)[body_at:body_at + length]
                else:
                    body = bytes(body_view)
            if record_type == RecordType.END:
                return self._end(body, total)
            record = self._decode(record_type, body)
        except StreamError as exc:
            raise exc.at(start, index, record_type) from None
        self.last = (start, index, record_type)
        self._consume(total, digest=True)
        self._index += 1
        return record

    def _start_big(self, total: int) -> None:
        """Move the record begun at the read position into a buffer of its own (its size,
        ``total``, already checked against the caps), which feed() fills."""
        have = len(self._buf) - self._pos
        self._big = self.pool.get(total) if self.pool is not None else bytearray(total)
        with memoryview(self._buf) as view:
            self._big[:have] = view[self._pos:]
        self._big_have = have
        del self._buf[:]
        self._pos = 0

    def _take_run(self) -> None:
        """Queue the run of HVM context records BodyScan finds at the read position, as far
        as the ordering rules let them through, each made as HvmState.check_body makes it;
        the stream digest covers them now. The first record the scan or the rules stop at
        is left to the slow way (_read_record), which raises its error."""
        at = self._pos
        found = self._scan.run(self._buf, at, self._order)
        with memoryview(self._buf) as view:
            for record_type, vm, vcpu_id, length, total in found:
                body_at = at + RECORD_HEADER.size
                self._run.append((HvmState(record_type, vm, vcpu_id, None, bytes(view[body_at:body_at + length])),
                                  total))
                at += total
            self._digest.update(view[self._pos:at])

    def _run_record(self) -> HvmState:
        """The next record _take_run queued (checked and digested)."""
        record, total = self._run.popleft()
        self.last = (self._offset, self._index, record.type)
        self._consume(total, digest=False)
        self._index += 1
        return record

    def _decode(self, record_type: int, body: bytes) -> Any:
        decoder = self._decoders.get(record_type)
        if decoder is None:
            if not record_type & OPTIONAL:
                raise StreamError("unknown mandatory record type")
            if reserved_optional(record_type, self._mandatory):
                raise StreamError("the optional bit is set on a mandatory record type "
                                  "(reserved: refused, never skipped)")
            self.skipped_count += 1
            if len(self.skipped) < MAX_SKIPPED_KEPT:       # memory: a stream may skip millions
                self.skipped.append((self._offset, record_type))
            return _SKIPPED
        record = decoder(body)
        if isinstance(record, RawPageBatch):
            # in one range from pfn 0 the highest pfn decides; an error names the first bad pfn
            quick = (record.max_pfn,) if self._order.flat(record.space) else None
            try:
                self._order.pages(record.TYPE.name, record.space, quick or record.pfns())
            except StreamError:
                if quick:
                    self._order.pages(record.TYPE.name, record.space, record.pfns())
                raise
            self._pages += record.count
            return record
        self._order.observe(record)
        if isinstance(record, PageBatch):
            self._pages += len(record.pages)
        elif isinstance(record, MsrPolicy) and self._scan is not None:
            self._scan.prepare(self._order.msr_policies)
        return record

    def _end(self, body: bytes, total: int) -> End:
        end = End.unpack(body)
        self._order.observe(end)
        expected = End(self._index, self._pages, self._offset, self._digest.digest())
        for name in ("record_count", "page_count", "stream_bytes", "digest"):
            got, want = getattr(end, name), getattr(expected, name)
            if got != want:
                shown = (got.hex(), want.hex()) if name == "digest" else (got, want)
                raise StreamError(f"END {name} is {shown[0]}, the stream has {shown[1]}")
        self._consume(total, digest=False)
        self._index += 1
        self._done = True
        return end

    def _check_trailing(self) -> None:
        extra = len(self._buf) - self._pos
        if extra and not self.leave_trailing:
            self._failed = StreamError(f"{extra} bytes after END", self._offset, self._index, None)
            raise self._failed

    def _consume(self, size: int, digest: bool) -> None:
        if self._big is not None:           # the whole of it; what follows is in _buf
            if digest:
                self._digest.update(self._big)
            if self.pool is not None and not self.raw_pages:    # else its body went on as a view
                self.pool.put(self._big)
            self._big = None
            self._offset += size
            return
        if digest:
            with memoryview(self._buf) as view:
                self._digest.update(view[self._pos:self._pos + size])
        self._pos += size
        self._offset += size


FEED_CHUNK = 1 << 20


def decode_stream(data: bytes, *, leave_trailing: bool = False) -> list:
    """Every record of a complete stream held in memory, END last. The input is fed in
    pieces, so the reader's buffer holds one record at a time; the records returned hold
    about the bytes of the stream (page batches as :class:`~migrate.stream.pages.PageList`,
    16 bytes per entry), whatever the stream holds (spec "Memory")."""
    reader = StreamReader(leave_trailing=leave_trailing)
    records = []
    with memoryview(data) as view:
        at = 0
        while True:
            record = reader.next_record()
            if record is DONE:
                if at < len(view):              # the rest: an error or trailing bytes
                    reader.feed(view[at:])
                    reader.next_record()
                return records
            if record is NEED_DATA:
                if at >= len(view):
                    reader.eof()
                reader.feed(view[at:at + FEED_CHUNK])
                at += FEED_CHUNK
                continue
            records.append(record)
