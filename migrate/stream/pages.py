"""Page batches (specs/stream-format.md, sections "PAGE_DATA" and "PAGE_DATA_ZSTD").

A batch carries up to ``MAX_PAGES_PER_BATCH`` pages of one address space. The writer
finds all-zero pages itself and sends them without data. In a PAGE_DATA_ZSTD batch the
data of the non-zero pages is one zstd frame; its declared content size is checked against
the number of pages before anything is decompressed.

Two decoded forms: :class:`PageBatch` holds one ``(pfn, bytes)`` pair per page (for tools,
tests and the fuzzer); :class:`RawPageBatch` (``StreamReader(raw_pages=True)``) holds the
batch as the stream has it, the checked entry table and one buffer of decompressed data,
with no per-page Python objects, for the restore engine to scatter in one C call. Both
pass the same checks with the same errors; the entry checks of the raw form run in C
(``migrate.stream._pages.hvm_check_entries``).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Sequence

import zstandard

from migrate.stream._pages import ffi, lib
from migrate.stream.errors import StreamError
from migrate.stream.records import MAX_PAGES_PER_BATCH, PAGE_SIZE, RecordType, Vm, vm_of

BATCH_HEADER = struct.Struct("<II")  # space, count
PAGE_ENTRY = struct.Struct("<QII")  # pfn, page type, reserved (zero)
ZERO_PAGE = bytes(PAGE_SIZE)
ZSTD_LEVEL = 3
MAX_PFN = (1 << 64) - 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame (RFC 8878); skippable frames are refused
MAX_ZSTD_WINDOW = MAX_PAGES_PER_BATCH * PAGE_SIZE  # largest window a frame may ask for


class PageType(IntEnum):
    NORMAL = 0  # 4096 bytes of data follow, uncompressed (PAGE_DATA only)
    ZERO = 1  # all-zero page, no data (both batch kinds)
    COMPRESSED = 2  # data is in the batch's zstd frame (PAGE_DATA_ZSTD only)


_DATA_TYPE = {RecordType.PAGE_DATA: PageType.NORMAL, RecordType.PAGE_DATA_ZSTD: PageType.COMPRESSED}


class PageList(Sequence):
    """The pages of a decoded batch as ``(pfn, data)`` pairs, made when asked for from
    the batch's entry table and data: a decoded batch holds 16 bytes per entry plus its
    data pages, not a Python tuple per page (spec "Memory": a stream of 4M ZERO entries
    must not cost hundreds of bytes per entry). Compares equal to a tuple of the pairs."""

    __slots__ = ("_entries", "_data")

    def __init__(self, entries: bytes, data) -> None:
        self._entries = entries         # checked entry table, 16 bytes per page
        self._data = data               # the data pages in entry order (bytes or a view)

    def __len__(self) -> int:
        return len(self._entries) // PAGE_ENTRY.size

    def __iter__(self):
        at = 0
        for pfn, page_type, _ in PAGE_ENTRY.iter_unpack(self._entries):
            if page_type == PageType.ZERO:
                yield pfn, ZERO_PAGE
            else:
                yield pfn, bytes(self._data[at:at + PAGE_SIZE])
                at += PAGE_SIZE

    def __getitem__(self, index):
        return tuple(self)[index]

    def __eq__(self, other) -> bool:
        if isinstance(other, (PageList, tuple, list)):
            return len(self) == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PageList({len(self)} pages)"

    def pfns(self) -> list[int]:
        return [pfn for pfn, _, _ in PAGE_ENTRY.iter_unpack(self._entries)]


@dataclass(frozen=True)
class PageBatch:
    """Pages of one address space. ``pages`` holds ``(pfn, data)`` pairs; a zero page's
    data is the shared :data:`ZERO_PAGE`. A decoded batch's ``pages`` is a
    :class:`PageList`, which makes the pairs when asked."""

    space: Vm
    pages: tuple[tuple[int, bytes], ...]
    compressed: bool = False

    @property
    def TYPE(self) -> RecordType:  # noqa: N802 - records expose TYPE
        return RecordType.PAGE_DATA_ZSTD if self.compressed else RecordType.PAGE_DATA

    def pack(self) -> bytes:
        return encode_batch(self.space, self.pages, self.compressed)

    def pfns(self) -> list[int]:
        if isinstance(self.pages, PageList):
            return self.pages.pfns()
        return [pfn for pfn, _ in self.pages]

    @classmethod
    def unpack_as(cls, record_type: RecordType, body: bytes) -> PageBatch:
        return decode_batch(record_type, body)


def encode_batch(space: int, pages: Iterable[tuple[int, bytes]], compressed: bool,
                 level: int = ZSTD_LEVEL) -> bytes:
    """One batch body; zero pages are detected here and never sent as data. ``level`` is
    the zstd level of a compressed batch (the writer's choice, spec "PAGE_DATA_ZSTD")."""
    entries, data = [], []
    data_type = PageType.COMPRESSED if compressed else PageType.NORMAL
    for pfn, page in pages:
        if len(page) != PAGE_SIZE or not 0 <= pfn <= MAX_PFN:
            raise ValueError(f"page {pfn}: need 0 <= pfn < 2**64 and {PAGE_SIZE} bytes, got {len(page)}")
        is_zero = page == ZERO_PAGE
        entries.append(PAGE_ENTRY.pack(pfn, PageType.ZERO if is_zero else data_type, 0))
        if not is_zero:
            data.append(bytes(page))
    if not 1 <= len(entries) <= MAX_PAGES_PER_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_PAGES_PER_BATCH} pages, got {len(entries)}")
    payload = b"".join(data)
    if compressed and payload:
        payload = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(payload)
    return BATCH_HEADER.pack(space, len(entries)) + b"".join(entries) + payload


def _batch_header(what: str, body: bytes) -> tuple[int, int, int]:
    """(space, count, offset of the data) of a batch body, its sizes checked."""
    if len(body) < BATCH_HEADER.size:
        raise StreamError(f"{what} body is {len(body)} bytes, shorter than its header")
    space, count = BATCH_HEADER.unpack_from(body)
    if not 1 <= count <= MAX_PAGES_PER_BATCH:
        raise StreamError(f"{what} count {count} outside 1..{MAX_PAGES_PER_BATCH}")
    data_start = BATCH_HEADER.size + count * PAGE_ENTRY.size
    if len(body) < data_start:
        raise StreamError(f"{what} body is {len(body)} bytes, {count} entries need {data_start}")
    return space, count, data_start


def decode_batch(record_type: RecordType, body: bytes) -> PageBatch:
    what = record_type.name
    space, count, data_start = _batch_header(what, body)
    entries = list(PAGE_ENTRY.iter_unpack(body[BATCH_HEADER.size:data_start]))
    data_type = _DATA_TYPE[record_type]
    seen: set[int] = set()
    for pfn, page_type, reserved in entries:
        if page_type not in (PageType.ZERO, data_type):
            raise StreamError(f"{what} pfn 0x{pfn:x} has page type {page_type}, not allowed here")
        if reserved:
            raise StreamError(f"{what} pfn 0x{pfn:x} entry has nonzero reserved field")
        if pfn in seen:
            raise StreamError(f"{what} pfn 0x{pfn:x} appears twice in one batch")
        seen.add(pfn)
    n_data = sum(1 for entry in entries if entry[1] == data_type)
    data = memoryview(body)[data_start:]
    if record_type is RecordType.PAGE_DATA_ZSTD:
        data = _decompress(data, n_data * PAGE_SIZE, what)
    elif len(data) != n_data * PAGE_SIZE:
        raise StreamError(f"{what} carries {len(data)} data bytes, {n_data} pages need {n_data * PAGE_SIZE}")
    pages = PageList(memoryview(body)[BATCH_HEADER.size:data_start], data)   # views: body held once
    return PageBatch(vm_of(space), pages, record_type is RecordType.PAGE_DATA_ZSTD)


@dataclass(frozen=True)
class RawPageBatch:
    """A checked batch without per-page objects: ``body`` is the record body as written,
    ``entries`` its entry table (16 bytes per page, spec "PAGE_DATA"), ``data`` the data
    pages in entry order, decompressed (or, from ``decode_raw_batch(data=False)``, the
    data as written, not yet checked); ``zero`` counts the ZERO entries, ``max_pfn`` is
    the highest pfn."""

    space: Vm
    count: int
    entries: memoryview
    data: memoryview
    compressed: bool
    zero: int
    max_pfn: int
    body: memoryview

    @property
    def TYPE(self) -> RecordType:  # noqa: N802 - records expose TYPE
        return RecordType.PAGE_DATA_ZSTD if self.compressed else RecordType.PAGE_DATA

    def pfns(self) -> list[int]:
        return [pfn for pfn, _, _ in PAGE_ENTRY.iter_unpack(self.entries)]

    def batch(self) -> PageBatch:
        """The same pages as a :class:`PageBatch` (of a batch decoded with its data)."""
        pages, at = [], 0
        for pfn, page_type, _ in PAGE_ENTRY.iter_unpack(self.entries):
            if page_type == PageType.ZERO:
                pages.append((pfn, ZERO_PAGE))
            else:
                pages.append((pfn, bytes(self.data[at:at + PAGE_SIZE])))
                at += PAGE_SIZE
        return PageBatch(self.space, tuple(pages), self.compressed)


def decode_raw_batch(record_type: RecordType, body: bytes, data: bool = True) -> RawPageBatch:
    """:func:`decode_batch` without splitting the pages: same checks, same errors.
    ``data`` False: the entries only; the page data is left as written, unchecked."""

    what = record_type.name
    space, count, data_start = _batch_header(what, body)
    view = memoryview(body)
    entries = view[BATCH_HEADER.size:data_start]
    data_type = _DATA_TYPE[record_type]
    out = ffi.new("uint32_t[2]")            # bad entry, data pages
    max_pfn = ffi.new("uint64_t *")
    err = lib.hvm_check_entries(ffi.from_buffer("uint8_t[]", entries), count, data_type,
                                out, out + 1, max_pfn)
    if err:
        pfn, page_type, _ = PAGE_ENTRY.unpack_from(entries, PAGE_ENTRY.size * out[0])
        reason = {lib.HVM_BAD_TYPE: f"has page type {page_type}, not allowed here",
                  lib.HVM_BAD_RESERVED: "entry has nonzero reserved field",
                  lib.HVM_DUPLICATE: "appears twice in one batch"}[err]
        raise StreamError(f"{what} pfn 0x{pfn:x} {reason}")
    n_data = out[1]
    pages = view[data_start:]
    if not data:
        pass
    elif record_type is RecordType.PAGE_DATA_ZSTD:
        pages = memoryview(_decompress(pages, n_data * PAGE_SIZE, what))
    elif len(pages) != n_data * PAGE_SIZE:
        raise StreamError(f"{what} carries {len(pages)} data bytes, {n_data} pages need {n_data * PAGE_SIZE}")
    return RawPageBatch(vm_of(space), count, entries, pages, record_type is RecordType.PAGE_DATA_ZSTD,
                        count - n_data, max_pfn[0], view)


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (a context per frame would be allocated and freed
    for every batch; one is not safe to share between threads)."""
    dctx = getattr(_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _LOCAL.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    return dctx


def _decompress(frame: bytes, expected: int, what: str) -> bytes:
    """Decompress one zstd frame that must hold exactly ``expected`` bytes; the declared
    size is checked before decompressing, so nothing is allocated from an unchecked length."""
    if expected == 0:
        if frame:
            raise StreamError(f"{what} has {len(frame)} data bytes but no compressed pages")
        return b""
    if bytes(frame[:4]) != ZSTD_MAGIC:
        raise StreamError(f"{what} bad zstd frame: magic {bytes(frame[:4]).hex() or '(none)'} is not "
                          f"{ZSTD_MAGIC.hex()} (skippable frames are refused)")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise StreamError(f"{what} bad zstd frame: {exc}") from None
    if params.dict_id:
        raise StreamError(f"{what} zstd frame names dictionary {params.dict_id}; none may be used")
    if params.window_size > MAX_ZSTD_WINDOW:
        raise StreamError(f"{what} zstd frame asks for a {params.window_size}-byte window, "
                          f"more than {MAX_ZSTD_WINDOW}")
    declared = params.content_size
    if declared != expected:
        shown = "unknown" if declared == zstandard.CONTENTSIZE_UNKNOWN else declared
        raise StreamError(f"{what} zstd frame declares {shown} bytes, expected {expected}")
    try:
        data = _decompressor().decompress(
            frame, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise StreamError(f"{what} bad zstd frame: {exc}") from None
    if len(data) != expected:
        raise StreamError(f"{what} zstd frame decompressed to {len(data)} bytes, expected {expected}")
    return data
