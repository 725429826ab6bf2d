"""Page batches from a memory view, encoded in parallel and written in order.

The hot path of a save: gather the pages of up to MAX_PAGES_PER_BATCH pfns, find the
all-zero ones (sent as ZERO entries, never as data), and zstd-compress the rest as one
frame (spec "PAGE_DATA_ZSTD"). Gathering holds the GIL briefly (one copy per page or per
contiguous run); zstd, CRC-32, BLAKE2b and file writes release it, so a small thread pool
keeps both cores busy while the caller frames and writes batches in stream order.
"""
from __future__ import annotations

import sys
import threading
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import zstandard

from ..stream import MAX_PAGES_PER_BATCH, PAGE_SIZE, ZERO_PAGE, PageType, Vm
from ..stream.pages import BATCH_HEADER

_LOCAL = threading.local()


@dataclass(frozen=True)
class EncodedBatch:
    space: Vm
    body: bytes
    compressed: bool
    count: int          # entries
    zero: int           # ZERO entries
    max_pfn: int


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_LOCAL, "compressors", None)
    if cache is None:
        cache = _LOCAL.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _pages_of(mem: memoryview, pfns: Sequence[int]) -> Iterable[bytes]:
    first, last = pfns[0], pfns[-1]
    if last - first == len(pfns) - 1:         # one contiguous run: one copy
        block = bytes(mem[first * PAGE_SIZE:(last + 1) * PAGE_SIZE])
        return (block[i:i + PAGE_SIZE] for i in range(0, len(block), PAGE_SIZE))
    return (bytes(mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]) for pfn in pfns)


def encode_pages(space: Vm, mem: memoryview, pfns: Sequence[int], level: int | None) -> EncodedBatch:
    """One PAGE_DATA (``level`` None) or PAGE_DATA_ZSTD body for ``pfns`` (ascending,
    1..MAX_PAGES_PER_BATCH of them) read from ``mem``; byte-identical to
    ``stream.pages.encode_batch`` for the same pages and level."""
    data_type = PageType.NORMAL if level is None else PageType.COMPRESSED
    entries = array("Q", bytes(16 * len(pfns)))     # pfn, then type | reserved << 32
    data = []
    for i, page in enumerate(_pages_of(mem, pfns)):
        entries[2 * i] = pfns[i]
        if page == ZERO_PAGE:
            entries[2 * i + 1] = PageType.ZERO
        else:
            entries[2 * i + 1] = data_type
            data.append(page)
    if sys.byteorder != "little":
        entries.byteswap()
    payload = b"".join(data)
    if level is not None and payload:
        payload = _compressor(level).compress(payload)
    body = BATCH_HEADER.pack(space, len(pfns)) + entries.tobytes() + payload
    return EncodedBatch(space, body, level is not None, len(pfns), len(pfns) - len(data), max(pfns))


def chunks(pfns: Sequence[int], size: int = MAX_PAGES_PER_BATCH) -> Iterable[Sequence[int]]:
    for at in range(0, len(pfns), size):
        yield pfns[at:at + size]


class BatchPipeline:
    """Encodes batches on ``threads`` workers and hands them to ``emit`` in submission
    order, at most ``depth`` in flight (bounded memory: depth x 4 MiB)."""

    def __init__(self, emit: Callable[[EncodedBatch], None], threads: int = 2, depth: int = 6):
        self.emit = emit
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")
        self._pending: deque = deque()

    def submit(self, space: Vm, mem: memoryview, pfns: Sequence[int], level: int | None) -> None:
        while len(self._pending) >= self.depth:
            self.emit(self._pending.popleft().result())
        self._pending.append(self._pool.submit(encode_pages, space, mem, pfns, level))

    def drain(self) -> None:
        while self._pending:
            self.emit(self._pending.popleft().result())

    def close(self) -> None:
        """Drop what is still queued and stop the workers (after an error too)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
