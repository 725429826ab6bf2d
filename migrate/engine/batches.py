"""Page batches from a memory view, encoded in parallel and written in order.

The hot path of a save: gather the pages of up to MAX_PAGES_PER_BATCH pfns, find the
all-zero ones (sent as ZERO entries, never as data), and zstd-compress the rest as one
frame (spec "PAGE_DATA_ZSTD"). One C call (``migrate.stream._pages.hvm_gather_pages``) tests each page
for zeroes, writes the entries and copies the non-zero pages into a buffer that each
encoding thread reuses; zstd then reads that buffer, and the record's CRC-32 is computed
on the same thread. The C call, zstd and CRC-32 release the GIL, so a small thread pool
(one per process, shared by its saves) keeps both cores busy while the caller digests
(XXH3-128, also GIL-free), frames and writes batches in stream order, body pieces as
they are (no joined copy).

The engine's default zstd level is :data:`DEFAULT_LEVEL` (1): on the issue-4 mix it is
about 1.5x faster than level 3 for a file 0.4% of guest RAM larger.
"""
from __future__ import annotations

import threading
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import zstandard

from ..stream import MAX_PAGES_PER_BATCH, PAGE_SIZE, PageType, RecordType, Vm
from ..stream.framing import parts_crc
from ..stream.pages import BATCH_HEADER
from ..stream._pages import ffi, lib

DEFAULT_LEVEL = 1
_LOCAL = threading.local()


@dataclass(frozen=True)
class EncodedBatch:
    space: Vm
    parts: tuple            # the body, in pieces: header + entries, then the page data
    compressed: bool
    count: int              # entries
    zero: int               # ZERO entries
    max_pfn: int
    crc: int                # framing.parts_crc of the body

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_LOCAL, "compressors", None)
    if cache is None:
        cache = _LOCAL.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _gather_buffer() -> memoryview:
    """This thread's buffer for one batch's non-zero pages (reused: no page faults)."""
    buf = getattr(_LOCAL, "gather", None)
    if buf is None:
        buf = _LOCAL.gather = memoryview(bytearray(MAX_PAGES_PER_BATCH * PAGE_SIZE))
    return buf


def _pfn_array(pfns: Sequence[int]) -> array:
    if isinstance(pfns, range):
        return array("Q", pfns)
    return pfns if isinstance(pfns, array) and pfns.typecode == "Q" else array("Q", pfns)


def encode_pages(space: Vm, mem: memoryview, pfns: Sequence[int], level: int | None,
                 stable: bool = False) -> EncodedBatch:
    """One PAGE_DATA (``level`` None) or PAGE_DATA_ZSTD body for ``pfns`` (ascending,
    1..MAX_PAGES_PER_BATCH of them, each a page of ``mem``); byte-identical to
    ``stream.pages.encode_batch`` for the same pages and level.

    ``stable``: ``mem`` cannot change meanwhile (the domain is paused). Then a run of
    consecutive non-zero pages is compressed straight from guest memory, without the
    gather copy; a running guest's pages are always copied first, so the compressor
    never reads memory that changes under it."""
    count = len(pfns)
    if not 1 <= count <= MAX_PAGES_PER_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_PAGES_PER_BATCH} pages, got {count}")
    data_type = PageType.NORMAL if level is None else PageType.COMPRESSED
    pfn_array = _pfn_array(pfns)
    head = bytearray(BATCH_HEADER.size + 16 * count)
    BATCH_HEADER.pack_into(head, 0, space, count)
    direct = (stable and level is not None and pfn_array[-1] - pfn_array[0] == count - 1)
    gather = _gather_buffer()

    def run(copy: bool) -> int:
        n = lib.hvm_gather_pages(ffi.from_buffer("uint8_t[]", mem), len(mem) // PAGE_SIZE,
                                 ffi.from_buffer("uint64_t[]", pfn_array), count, data_type,
                                 ffi.from_buffer("uint8_t[]", head, require_writable=True) + BATCH_HEADER.size,
                                 ffi.from_buffer("uint8_t[]", gather, require_writable=True) if copy
                                 else ffi.NULL)
        if n < 0:
            raise ValueError(f"pfn 0x{pfn_array[-1 - n]:x} is outside memory of "
                             f"{len(mem) // PAGE_SIZE} pages")
        return n

    n_data = run(copy=not direct)
    if direct and n_data == count:      # every page holds data: compress it in place
        data = mem[pfn_array[0] * PAGE_SIZE:(pfn_array[-1] + 1) * PAGE_SIZE]
    else:
        if direct and n_data:           # some zero pages among them: gather after all
            run(copy=True)
        data = gather[:n_data * PAGE_SIZE]
    if not n_data:
        payload = b""
    elif level is None:
        payload = bytes(data)           # the buffer is reused by the next batch
    else:
        payload = _compressor(level).compress(data)
    parts = (bytes(head), payload) if payload else (bytes(head),)
    record_type = RecordType.PAGE_DATA if level is None else RecordType.PAGE_DATA_ZSTD
    return EncodedBatch(space, parts, level is not None, count, count - n_data,
                        pfn_array[-1], parts_crc(record_type, parts))


def chunks(pfns: Sequence[int], size: int = MAX_PAGES_PER_BATCH) -> Iterable[Sequence[int]]:
    for at in range(0, len(pfns), size):
        yield pfns[at:at + size]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
POOL_THREADS = 2


def _pool() -> ThreadPoolExecutor:
    """The process's encoding workers, made on first use and kept: every save of the
    process shares them, so a save starts no threads and its workers' gather buffers and
    zstd contexts are warm (a paused domain's last round is on the downtime path)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="encode")
        return _POOL


class BatchPipeline:
    """Encodes batches on the process's shared workers and hands them to ``emit`` in
    submission order, at most ``depth`` in flight (bounded memory: depth x 4 MiB)."""

    def __init__(self, emit: Callable[[EncodedBatch], None], depth: int = 6):
        self.emit = emit
        self.depth = depth
        self._pending: deque = deque()

    def submit(self, space: Vm, mem: memoryview, pfns: Sequence[int], level: int | None,
               stable: bool = False) -> None:
        while len(self._pending) >= self.depth:
            self.emit(self._pending.popleft().result())
        self._pending.append(_pool().submit(encode_pages, space, mem, pfns, level, stable))

    def encode_here(self, space: Vm, mem: memoryview, pfns: Sequence[int], level: int | None,
                    stable: bool = False) -> None:
        """Encode on the calling thread, after what is queued: for a few pages, handing
        them to a worker and waiting costs more than encoding them."""
        self.drain()
        self.emit(encode_pages(space, mem, pfns, level, stable))

    def drain(self) -> None:
        while self._pending:
            self.emit(self._pending.popleft().result())

    def close(self) -> None:
        """Drop what is still queued and wait for batches already being encoded (they
        read guest memory the caller may release next); the workers stay for the next save."""
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:   # the save already failed; its first error wins
                    pass
        self._pending.clear()
