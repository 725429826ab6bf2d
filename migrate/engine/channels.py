"""A stream whose pages travel on data channels (specs/stream-format.md, "Channel
streams"; specs/relocation.md, "Data channels"): the sending sink and the receiving end.

:class:`ChannelSink` is a save's sink: the main stream's records go to the link Python
writes (a relocation's control connection) and are digested by the stream writer; each
round's pages go out on the channels through the data plane, every channel ending the
round with a CHANNEL_SYNC; the stream closes with CHANNELS (each channel's FINAL sync),
then END. :class:`ChannelIntake` is a restore's: the data plane's receiver places the
pages of every channel straight into the domain's memory, and at END the restore checks
each channel against CHANNELS.
"""
from __future__ import annotations

import socket
import threading
from typing import Callable

from .. import dataplane
from ..stream import Channels, StreamWriter, Vm
from .sinks import ENCODE_WORKERS, Compression
from .state import RestoreError


class ChannelSink:
    """``send(bytes)`` and ``flush_link()``: the main stream's link. ``outputs``: one
    data plane Output per channel, its channel header written. ``workers``: encoding
    threads (default: one per channel, at least ENCODE_WORKERS)."""

    def __init__(self, send: Callable[[bytes], None], flush_link: Callable[[], None],
                 outputs: list[dataplane.Output], workers: int | None = None):
        self.send, self.flush_link, self.outputs = send, flush_link, outputs
        self.workers = workers or max(ENCODE_WORKERS, len(outputs))
        self.sender: dataplane.Sender | None = None
        self.round = 0
        self.main_bytes = 0
        self.finals: list | None = None

    def open(self, memory: dict, rate: float) -> None:
        self.sender = dataplane.Sender(self.outputs, self.workers, rate)
        for space, ranges in memory.items():
            self.sender.set_space(space, ranges)

    def write(self, data: bytes, records: int = 1) -> None:
        self.send(data)
        self.main_bytes += len(data)

    def send_pages(self, pages: dict, compression: Compression, stable: bool,
                   end: bool = False, final: bool = False) -> dataplane.RoundStats:
        self.flush_link()           # the destination places pages only once the main stream built the domain
        st, synced = self.sender.round(pages, compression.code, compression.level, stable,
                                       sync=self.round if end else None, final=final)
        if end:
            if final:       # what each FINAL sync said: CHANNELS repeats it
                self.finals = [(self.round + 1, s.records, s.pages, s.offset, s.digest) for s in synced]
            self.round += 1
        return st

    def flush(self) -> None:
        self.flush_link()

    def end(self, writer: StreamWriter) -> None:
        if self.finals is None:
            raise ValueError("the stream ends before its last page round")
        self.write(writer.record(Channels(tuple(self.finals))))
        self.write(writer.finish())
        self.flush()

    @property
    def bytes(self) -> int:
        return self.main_bytes + sum(out.state().offset for out in self.outputs)

    def cancel(self) -> None:
        if self.sender is not None:
            self.sender.cancel(shutdown_sockets=True)

    def close(self) -> None:
        """Frees the data plane (with its hold on guest memory) and ends the channels' TLS;
        the sockets are the caller's."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        for out in self.outputs:
            out.close()


class ChannelIntake:
    """The receiving end of ``count`` data channels: ``receiver`` (a data plane Receiver
    made with the relocation's token) gets each channel's socket as it arrives from
    ``fds`` (a unix socket on which each comes with its index, SCM_RIGHTS), at once: the
    channels start TLS and read their headers while the domain is built, and place pages
    once :meth:`attach` has told the receiver where the domain's memory is."""

    def __init__(self, receiver: dataplane.Receiver, fds: socket.socket):
        self.receiver, self.fds = receiver, fds
        self.sockets: list[socket.socket] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self._take, name="channel-intake", daemon=True)
        self.thread.start()

    def attach(self, domain, fresh_stub: bool) -> None:
        """Place pages into ``domain`` (the stub's are checked and dropped when the stub
        boots fresh)."""
        parts = {part.vm: part for part in domain.parts()}
        self.receiver.set_space(Vm.GUEST, [dataplane.Range(*r) for r in parts[Vm.GUEST].memory_ranges()])
        stub = [dataplane.Range(*r) for r in parts[Vm.STUB].memory_ranges()] if Vm.STUB in parts else []
        if fresh_stub:
            stub = [dataplane.Range(r.first_pfn, r.npages) for r in stub]
        if stub:
            self.receiver.set_space(Vm.STUB, stub)
        self.receiver.open()

    def _take(self) -> None:
        try:
            for _ in range(self.receiver.channels):
                msg, fds, _, _ = socket.recv_fds(self.fds, 16, 1)
                if not fds:
                    raise RestoreError("the channel socket closed before every channel came")
                sock = socket.socket(fileno=fds[0])
                self.sockets.append(sock)
                self.receiver.add(int.from_bytes(msg[:4], "little"), sock.fileno())
        except (OSError, RestoreError, dataplane.DataplaneError) as exc:
            self.error = str(exc)

    def wait_round(self, round_: int, timeout: float) -> bool:
        """True once every channel has ended round ``round_``."""
        if self.error:
            raise RestoreError(f"data channels: {self.error}")
        try:
            return self.receiver.wait(round_, timeout=timeout)
        except dataplane.DataplaneError as exc:
            raise RestoreError(str(exc)) from None

    def bytes(self) -> int:
        """Bytes the channels have carried so far, all together."""
        return self.receiver.bytes()

    def ended_final(self, round_: int) -> bool:
        """Every channel ended round ``round_`` with its FINAL sync (once :meth:`wait_round`
        said the round ended: each channel's sync is in its summary before that, while the
        count of FINAL syncs read grows only after it)."""
        summaries, _, _ = self.receiver.summary()
        return all(s.final and s.rounds == round_ + 1 for s in summaries)

    def finish(self, expected: Channels, timeout: float) -> None:
        """Wait for every channel's FINAL sync and compare each with CHANNELS (the wait ends
        with the FINAL syncs whatever round they ended: rounds other than CHANNELS says are
        named below, at once, not waited for)."""
        if len(expected.channels) != self.receiver.channels:
            raise RestoreError(f"CHANNELS lists {len(expected.channels)} channels, "
                               f"{self.receiver.channels} were opened")
        last = len(expected.channels) and expected.channels[0][0] - 1
        try:
            if not self.receiver.wait(max(last, 0), final=True, timeout=timeout):
                raise RestoreError(f"the data channels did not end within {timeout:g} s")
        except dataplane.DataplaneError as exc:
            raise RestoreError(str(exc)) from None
        if (error := self.receiver.error()) is not None:    # e.g. bytes after a FINAL sync
            raise RestoreError(error)
        summaries, _, _ = self.receiver.summary()
        for want, got in zip(expected.channels, summaries):
            have = (got.rounds, got.records, got.pages, got.bytes, got.digest)
            if not got.final or have != tuple(want):
                raise RestoreError(f"channel {got.index} ended with rounds {got.rounds}, records "
                                   f"{got.records}, pages {got.pages}, bytes {got.bytes}; CHANNELS "
                                   f"says {want[0]}, {want[1]}, {want[2]}, {want[3]} (or its digest "
                                   f"differs)")

    def close(self) -> None:
        self.receiver.close()
        self.fds.shutdown(socket.SHUT_RDWR)     # the taking thread, if still waiting, ends
        self.thread.join(5)
        for sock in self.sockets:
            sock.close()
        self.fds.close()
