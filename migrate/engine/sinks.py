"""Where a save's stream goes: one interface for a file and for a relocation's link.

The saver writes the stream's header and records itself (small, framed by the stream
writer) and hands each round of pages to the sink, whose data plane (migrate.dataplane)
encodes and writes them from C threads. A :class:`FileSink` puts both into one stream on
one file descriptor, whose digest and counts the data plane keeps, so END is taken from
it. (A relocation's sink keeps the records on its control connection and sends the pages
on data channels: migrate.host.source.)
"""
from __future__ import annotations

import socket
import threading
from typing import Callable, Protocol

from .. import dataplane
from ..config import DEFAULT_COMPRESSION, Compression  # noqa: F401  (re-exported)
from ..stream import StreamWriter

ENCODE_WORKERS = 2          # the machines this runs on have two cores
DEFAULT_LEVEL = 1           # the zstd level when compressing: fastest at nearly the same size


class Sink(Protocol):
    """What the saver writes through."""

    def open(self, memory: dict, rate: float) -> None:
        """Before anything is written: each space's memory ranges (:func:`memory_ranges`),
        and the pacing of page output in bytes per second (0: none)."""

    def write(self, data: bytes, records: int = 1) -> None:
        """``records`` framed records (0: the stream header), in stream order."""

    def send_pages(self, pages: dict, compression: Compression, stable: bool,
                   end: bool = False, final: bool = False) -> dataplane.RoundStats:
        """``pages``: space -> its pfns (array('Q')), each page once in the caller's round,
        one space after the other. ``end``: these are the round's last pages (maybe none),
        and the round is complete after them (``final``: the stream's last round)."""

    def flush(self) -> None:
        """What was written should go out now."""

    def end(self, writer: StreamWriter) -> None:
        """The records that close the stream (END)."""

    @property
    def bytes(self) -> int:
        """Stream bytes written so far."""

    def cancel(self) -> None:
        """Stop a round in progress, from another thread."""

    def close(self) -> None:
        """Free the data plane (the descriptor stays the caller's)."""


def memory_ranges(spaces: dict) -> dict:
    """Each space's memory as the data plane's ranges (first_pfn, npages, memory)."""
    return {space: [dataplane.Range(*r[:3]) for r in part.memory_ranges()] for space, part in spaces.items()}


class RelaySink:
    """A stream handed to ``send(bytes)`` in order, for a link Python writes (a relocation's
    control connection): the data plane writes records and pages into a socket pair and
    a thread of this sink passes what comes out to ``send``; ``flush`` waits until all of
    it has been passed on, then calls ``flush_link``."""

    def __init__(self, send: Callable[[bytes], None], flush_link: Callable[[], None],
                 workers: int = ENCODE_WORKERS):
        self.send, self.flush_link, self.workers = send, flush_link, workers
        self.file = None
        self.ours, self.theirs = socket.socketpair()
        self.passed = 0
        self.error: BaseException | None = None
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._pump, name="stream-relay", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        try:
            while data := self.theirs.recv(1 << 20):
                self.send(data)
                with self.cv:
                    self.passed += len(data)
                    self.cv.notify_all()
        except BaseException as exc:       # the link failed: the saver sees it at its next write or flush
            with self.cv:
                self.error = exc
                self.cv.notify_all()
            self.theirs.close()            # and the data plane's writes fail from now on

    def open(self, memory: dict, rate: float) -> None:
        self.file = FileSink(self.ours.fileno(), self.workers)
        self.file.open(memory, rate)

    def write(self, data: bytes, records: int = 1) -> None:
        self._raise()
        self.file.write(data, records)

    def send_pages(self, pages: dict, compression: Compression, stable: bool,
                   end: bool = False, final: bool = False) -> dataplane.RoundStats:
        self._raise()
        return self.file.send_pages(pages, compression, stable)

    def flush(self) -> None:
        target = self.file.bytes
        with self.cv:
            self.cv.wait_for(lambda: self.passed >= target or self.error is not None)
        self._raise()
        self.flush_link()

    def end(self, writer: StreamWriter) -> None:
        self.file.end(writer)
        self.flush()

    @property
    def bytes(self) -> int:
        return self.file.bytes

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        if self.file is not None:
            self.file.cancel()
            self.ours.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.ours.close()
        self.thread.join(10)
        self.theirs.close()


class FileSink:
    """A stream into ``fd`` (a file), records and pages alike; the data plane keeps its
    digest and counts."""

    def __init__(self, fd: int, workers: int = ENCODE_WORKERS):
        self.fd, self.workers = fd, workers
        self.output = self.sender = None

    def open(self, memory: dict, rate: float) -> None:
        self.output = dataplane.Output(self.fd)
        self.sender = dataplane.Sender([self.output], self.workers, rate)
        for space, ranges in memory.items():
            self.sender.set_space(space, ranges)

    def write(self, data: bytes, records: int = 1) -> None:
        self.output.write(data, records)

    def send_pages(self, pages: dict, compression: Compression, stable: bool,
                   end: bool = False, final: bool = False) -> dataplane.RoundStats:
        return self.sender.round(pages, compression.code, compression.level, stable)[0]

    def flush(self) -> None:
        pass

    def end(self, writer: StreamWriter) -> None:
        s = self.output.state()
        self.output.write(writer.end(s.records, s.pages, s.offset, s.digest), 0)

    @property
    def bytes(self) -> int:
        return self.output.state().offset

    def cancel(self) -> None:
        if self.sender is not None:
            self.sender.cancel(shutdown_sockets=False)

    def close(self) -> None:
        """Frees the data plane, and with it its hold on guest memory (do it before the
        domain is destroyed)."""
        if self.sender is not None:
            self.sender.close()
        if self.output is not None:
            self.output.close()
        self.output = self.sender = None
