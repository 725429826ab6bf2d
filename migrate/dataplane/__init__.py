"""The data plane: page batches between guest memory and streams, in C threads that never
hold the GIL (``dataplane.c``; specs/stream-format.md "Channel streams", specs/relocation.md
"Data channels").

- :class:`Output`: a stream output (a file, or a socket with or without TLS) whose
  XXH3-128 digest and record and page counts follow every byte written to it, from Python
  (:meth:`Output.write`) or from a sender's workers;
- :class:`Sender`: worker threads that turn rounds of pfns into page batch records on one
  or more outputs (zero pages found, the rest compressed when that pays, CRC-32 framed);
- :class:`Receiver`: one thread per data channel, checking every record before it writes
  guest memory, the channels meeting at a barrier at the end of each round.

Python keeps the control plane: which pages a round sends, the other records, the handoff.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ._dataplane import ffi, lib

RAW, ZSTD, AUTO = 0, 1, 2
MODES = {"none": RAW, "zstd": ZSTD, "auto": AUTO}
ERR = 512
MAX_CHANNELS = 64
ANSWERS = {1: "running", 2: "paused", 3: "refused"}   # an ANSWER's code on channel 0
ANSWER_CODES = {answer: code for code, answer in ANSWERS.items()}
HANDSHAKE = 30.0        # seconds a data channel's TLS handshake may take in all (specs/relocation.md);
                        # on the source it counts from the connect, so it includes the receiving process's start


class DataplaneError(Exception):
    """The data plane failed; one line saying where and why."""


def _err() -> tuple:
    buf = ffi.new("char[]", ERR)
    return buf, ERR


def _text(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")


class TlsContext:
    """An OpenSSL context from a TLS directory (ca.pem, cert.pem, key.pem: hvm host
    keygen): TLS 1.3 only, the peer's certificate required and checked against ca.pem."""

    def __init__(self, server: bool, tls_dir: str | Path):
        d = Path(tls_dir)
        buf, n = _err()
        self.ptr = lib.dp_tls_context(int(server), str(d / "ca.pem").encode(), str(d / "cert.pem").encode(),
                                      str(d / "key.pem").encode(), buf, n)
        if self.ptr == ffi.NULL:
            raise DataplaneError(_text(buf))

    def close(self) -> None:
        if self.ptr is not None:
            lib.dp_tls_context_free(self.ptr)
            self.ptr = None

    __del__ = close


@dataclass(frozen=True)
class OutputState:
    records: int
    pages: int
    offset: int
    digest: bytes
    write_seconds: float


class Output:
    """A stream written to ``fd`` (not closed here). With ``tls`` (a client
    :class:`TlsContext`), the TLS handshake with ``host`` happens here, within
    ``handshake`` seconds in all; ``timeout``: each later write's (0: none)."""

    def __init__(self, fd: int, tls: TlsContext | None = None, host: str = "", timeout: float = 0.0,
                 handshake: float = HANDSHAKE):
        buf, n = _err()
        self.ptr = lib.dp_out_new(fd, tls.ptr if tls else ffi.NULL, host.encode(), timeout, handshake, buf, n)
        if self.ptr == ffi.NULL:
            raise DataplaneError(_text(buf))

    def write(self, data, records: int = 0, pages: int = 0) -> None:
        buf, n = _err()
        if lib.dp_out_write(self.ptr, ffi.from_buffer("uint8_t[]", data), len(data), records, pages, buf, n):
            raise DataplaneError(_text(buf))

    def state(self) -> OutputState:
        v = ffi.new("uint64_t[3]")
        digest = ffi.new("uint8_t[16]")
        seconds = ffi.new("double *")
        lib.dp_out_state(self.ptr, v, v + 1, v + 2, digest, seconds)
        return OutputState(v[0], v[1], v[2], bytes(digest), seconds[0])

    def channel_header(self, version: int, index: int, token: bytes) -> None:
        if len(token) != 32:
            raise ValueError("a channel token is 32 bytes")
        buf, n = _err()
        if lib.dp_out_channel_header(self.ptr, version, index, token, buf, n):
            raise DataplaneError(_text(buf))

    def sync(self, round_: int, final: bool = False) -> None:
        buf, n = _err()
        if lib.dp_out_sync(self.ptr, round_, int(final), buf, n):
            raise DataplaneError(_text(buf))

    def handoff(self, kind: str, also: int, timeout: float) -> str | None:
        """Channel 0 after its FINAL sync, on the source (specs/relocation.md, "The handoff on
        channel 0"): await ``kind``, ``"ready"`` or ``"answer"``. Returns ``"ready"``, or the
        answer (``"running"``, ``"paused"``, ``"refused"``), once it has come; ``"other"`` if
        the descriptor ``also`` (-1: none) became readable first; None if neither within
        ``timeout`` seconds (what has come is kept for the next call). DataplaneError when
        the channel ended or carried anything else."""
        buf, n = _err()
        value = ffi.new("uint32_t *")
        rc = lib.dp_out_handoff(self.ptr, int(kind == "answer"), also, timeout, value, buf, n)
        if rc < 0:
            raise DataplaneError(_text(buf))
        if rc == 1:
            return kind if kind == "ready" else ANSWERS[value[0]]
        return "other" if rc == 2 else None

    def go(self, paused: bool) -> None:
        """GO on channel 0, after its READY."""
        buf, n = _err()
        if lib.dp_out_go(self.ptr, int(paused), buf, n):
            raise DataplaneError(_text(buf))

    def close(self) -> None:
        """Ends TLS (close_notify) if any; the fd stays the caller's."""
        if self.ptr is not None:
            lib.dp_out_free(self.ptr)
            self.ptr = None


@dataclass(frozen=True)
class RoundStats:
    batches: int
    pages: int
    zero_pages: int
    data_pages: int
    bytes: int
    zstd_batches: int
    raw_batches: int
    zstd_in: int
    zstd_out: int
    seconds: float
    encode_seconds: float       # summed over workers
    write_seconds: float        # summed over workers: time the outputs held them

    @classmethod
    def of(cls, st) -> "RoundStats":
        return cls(*(getattr(st, f) for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class SyncInfo:
    """What a CHANNEL_SYNC said of its channel: records, page entries, bytes and digest of
    everything before it."""
    records: int
    pages: int
    offset: int
    digest: bytes


class Range(NamedTuple):
    """Pages ``first_pfn`` .. ``first_pfn + npages - 1`` of an address space, held by
    ``memory`` (a buffer; None on a destination that checks the pages and drops them),
    which is the part of memory file ``fd`` from ``offset`` (-1: none). A destination
    writes through the file where there is one (see dataplane.c, put_pages)."""
    first_pfn: int
    npages: int
    memory: object = None
    fd: int = -1
    offset: int = 0


def _ranges(ranges, writable: bool):
    """Ranges -> C arrays, and the cdata keeping the buffers alive."""
    ranges = [Range(*r) for r in ranges]
    n = len(ranges)
    first, count = ffi.new("uint64_t[]", max(n, 1)), ffi.new("uint64_t[]", max(n, 1))
    fds, offs = ffi.new("int[]", max(n, 1)), ffi.new("uint64_t[]", max(n, 1))
    base = ffi.new("uint8_t *[]", max(n, 1))
    keep = [first, count, fds, offs, base]
    drop = all(r.memory is None for r in ranges)
    for i, r in enumerate(ranges):
        first[i], count[i], fds[i], offs[i] = r.first_pfn, r.npages, r.fd, r.offset
        if r.memory is not None:
            if len(r.memory) < r.npages * 4096:
                raise ValueError(f"range at pfn {r.first_pfn:#x}: buffer of {len(r.memory)} bytes "
                                 f"for {r.npages} pages")
            cdata = ffi.from_buffer("uint8_t[]", r.memory, require_writable=writable)
            keep.append(cdata)
            base[i] = cdata
    return n, first, count, ffi.NULL if drop else base, fds, offs, keep


class Sender:
    """``workers`` threads writing page records to ``outputs[worker % len(outputs)]``;
    ``rate``: bytes per second over all outputs (0: as fast as they take them). A send of
    one batch or less runs on the calling thread (to the first output) instead."""

    def __init__(self, outputs: list[Output], workers: int, rate: float = 0.0):
        self.outputs = list(outputs)
        arr = ffi.new("struct dp_out *[]", [o.ptr for o in self.outputs])
        buf, n = _err()
        self.ptr = lib.dp_sender_new(arr, len(self.outputs), workers, rate, buf, n)
        if self.ptr == ffi.NULL:
            raise DataplaneError(_text(buf))
        self._keep: dict[int, list] = {}

    def set_space(self, space: int, ranges: list[tuple[int, int, object]]) -> None:
        """The memory of ``space``: (first_pfn, npages, buffer) per range (read only)."""
        n, first, count, base, _, _, keep = _ranges(ranges, writable=False)
        buf, m = _err()
        if lib.dp_sender_set_space(self.ptr, space, n, first, count, base, buf, m):
            raise DataplaneError(_text(buf))
        self._keep[space] = keep

    def set_rate(self, rate: float) -> None:
        lib.dp_sender_set_rate(self.ptr, rate)

    def send(self, space: int, pfns, mode: int = RAW, level: int = 1, stable: bool = False) -> RoundStats:
        """Send pages ``pfns`` (an array('Q') or anything giving uint64s) of ``space``."""
        return self.round({space: pfns}, mode, level, stable)[0]

    def round(self, pages: dict, mode: int = RAW, level: int = 1, stable: bool = False,
              sync: int | None = None, final: bool = False) -> tuple[RoundStats, list[SyncInfo]]:
        """Send ``pages`` (space -> its pfns, each an array('Q') or anything giving uint64s),
        one space after the other; then, with ``sync``, end round ``sync`` on every output
        (CHANNEL_SYNC, FINAL with ``final``): what each sync said, in output order. One
        call for a whole round."""
        arrays = [p if isinstance(p, array) and p.typecode == "Q" else array("Q", p) for p in pages.values()]
        n = max(len(arrays), 1)
        spaces, counts = ffi.new("uint32_t[]", list(pages) or [0]), ffi.new("uint64_t[]", n)
        ptrs = ffi.new("uint64_t *[]", n)
        keep = []
        for i, pfns in enumerate(arrays):
            counts[i] = len(pfns)
            if len(pfns):
                keep.append(ffi.from_buffer("uint64_t[]", pfns))
                ptrs[i] = keep[-1]
        st = ffi.new("struct dp_round_stats *")
        synced = ffi.new("struct dp_sync_info[]", len(self.outputs)) if sync is not None else ffi.NULL
        buf, m = _err()
        if lib.dp_sender_round(self.ptr, len(arrays), spaces, ptrs, counts, mode, level, int(stable),
                               -1 if sync is None else sync, int(final), st, synced, buf, m):
            raise DataplaneError(_text(buf))
        infos = [SyncInfo(s.records, s.pages, s.offset, bytes(s.digest)) for s in synced] \
            if sync is not None else []
        return RoundStats.of(st), infos

    def cancel(self, shutdown_sockets: bool = True) -> None:
        lib.dp_sender_cancel(self.ptr, int(shutdown_sockets))

    def close(self) -> None:
        if self.ptr is not None:
            lib.dp_sender_free(self.ptr)
            self.ptr = None
            self._keep.clear()


@dataclass(frozen=True)
class ChannelSummary:
    """A channel at its last CHANNEL_SYNC: the rounds it ended, whether that was FINAL,
    its records (syncs included), page entries, bytes and digest up to that sync."""
    index: int
    rounds: int
    final: bool
    records: int
    pages: int
    bytes: int
    digest: bytes


class Receiver:
    """``channels`` data channels of one relocation (stream format ``version``, its 32-byte
    ``token``), TLS with a server :class:`TlsContext` or plain; each channel's socket is
    handed over with :meth:`add` and read by a thread of its own: its TLS handshake within
    ``handshake`` seconds in all, then each read within ``timeout``. ``cap``: most bytes
    all channels together may carry (a relocation's stream cap; 0: none); past it every
    channel fails, the record that crosses it not placed. ``handoff``: channel 0 goes on
    after its FINAL sync with the handoff (:meth:`handoff`)."""

    def __init__(self, channels: int, version: int, token: bytes, tls: TlsContext | None = None,
                 timeout: float = 60.0, handshake: float = HANDSHAKE, cap: int = 0, handoff: bool = False):
        if len(token) != 32:
            raise ValueError("a channel token is 32 bytes")
        buf, n = _err()
        self.tls = tls
        self.channels = channels
        ptr = lib.dp_receiver_new(channels, version, token, tls.ptr if tls else ffi.NULL, timeout, handshake,
                                  buf, n)
        if ptr == ffi.NULL:
            raise DataplaneError(_text(buf))
        # freed when the last reference goes (a thread may still be in wait() when another
        # closes it: close() stops everything, the memory stays until then)
        self.ptr = ffi.gc(ptr, lib.dp_receiver_free)
        if cap:
            lib.dp_receiver_set_cap(self.ptr, cap)
        if handoff:
            lib.dp_receiver_set_handoff(self.ptr)
        self._keep: dict[int, list] = {}

    def set_space(self, space: int, ranges: list) -> None:
        """Where pages of ``space`` go (:class:`Range`; memory all None: pages are checked
        and dropped). Before :meth:`open`."""
        n, first, count, base, fds, offs, keep = _ranges(ranges, writable=True)
        buf, m = _err()
        if lib.dp_receiver_set_space(self.ptr, space, n, first, count, base, fds, offs, buf, m):
            raise DataplaneError(_text(buf))
        self._keep[space] = keep

    def add(self, index: int, fd: int) -> None:
        """Take channel ``index``'s socket: its thread starts TLS and reads the channel
        header at once, and places pages once :meth:`open` has been called."""
        buf, n = _err()
        if lib.dp_receiver_add(self.ptr, index, fd, buf, n):
            raise DataplaneError(_text(buf))

    def open(self) -> None:
        """The memory is set (:meth:`set_space`): the channels may place pages."""
        lib.dp_receiver_open(self.ptr)

    def wait(self, round_: int, final: bool = False, timeout: float = 60.0) -> bool:
        """True once every channel has ended round ``round_``, or with ``final``, read its
        FINAL sync, whatever round that ended (the caller compares :meth:`summary` with
        the rounds it expects); False after ``timeout`` or once closed (from another
        thread); DataplaneError if a channel failed."""
        buf, n = _err()
        rc = lib.dp_receiver_wait(self.ptr, round_, int(final), timeout, buf, n)
        if rc < 0:
            raise DataplaneError(_text(buf))
        return rc == 1

    def error(self) -> str | None:
        buf, n = _err()
        return _text(buf) if lib.dp_receiver_error(self.ptr, buf, n) else None

    def bytes(self) -> int:
        """Bytes every channel has read or is reading so far, all together."""
        return lib.dp_receiver_bytes(self.ptr)

    def summary(self) -> tuple[list[ChannelSummary], float, int]:
        out = ffi.new("struct dp_channel_summary[]", self.channels)
        seconds, placed = ffi.new("double *"), ffi.new("uint64_t *")
        lib.dp_receiver_summary(self.ptr, out, seconds, placed)
        return ([ChannelSummary(s.index, s.rounds, bool(s.final), s.records, s.pages, s.bytes, bytes(s.digest))
                 for s in out], seconds[0], placed[0])

    def handoff(self) -> "Handoff":
        """Channel 0, once every channel has read its FINAL sync (made with ``handoff``),
        taken for the handoff: :meth:`close` no longer touches it. DataplaneError when it
        is not there to take."""
        buf, n = _err()
        ptr = lib.dp_receiver_handoff(self.ptr, buf, n)
        if ptr == ffi.NULL:
            raise DataplaneError(_text(buf))
        return Handoff(ptr)

    def close(self) -> None:
        """Stops every channel thread (and waits, from any thread, return at once); the
        sockets stay the caller's to close. Guest memory is no longer touched after it, and
        its buffers are let go."""
        lib.dp_receiver_close(self.ptr)
        self._keep.clear()


class Handoff:
    """The destination's end of channel 0 after its FINAL sync (specs/relocation.md, "The
    handoff on channel 0"): READY to the source, GO from it, then the ANSWER to GO. Its TLS session and a
    descriptor of its own (``fileno``, to poll) live until :meth:`close`."""

    def __init__(self, ptr):
        self.ptr = ptr          # its TLS session holds its context (SSL_new takes a reference)
        self.fd = lib.dp_handoff_fd(ptr)

    def fileno(self) -> int:
        return self.fd

    def ready(self) -> None:
        buf, n = _err()
        if lib.dp_handoff_ready(self.ptr, buf, n):
            raise DataplaneError(_text(buf))

    def go(self) -> bool | None:
        """Without waiting: None until GO has come whole, then whether it asks for the
        pair to stay paused; DataplaneError when the channel ended or carried anything else."""
        paused = ffi.new("int *")
        buf, n = _err()
        rc = lib.dp_handoff_go(self.ptr, paused, buf, n)
        if rc < 0:
            raise DataplaneError(_text(buf))
        return bool(paused[0]) if rc else None

    def answer(self, answer: str) -> None:
        """What became of GO: ``"running"``, ``"paused"`` or ``"refused"`` (it never ran)."""
        buf, n = _err()
        if lib.dp_handoff_answer(self.ptr, ANSWER_CODES[answer], buf, n):
            raise DataplaneError(_text(buf))

    def finish(self) -> None:
        """After the answer: its writing half ended, what came since dropped (the channel
        stays open until :meth:`close`)."""
        lib.dp_handoff_finish(self.ptr)

    def close(self) -> None:
        if self.ptr is not None:
            lib.dp_handoff_free(self.ptr)
            self.ptr = None

    __del__ = close


NEXT = 2**64 - 1        # Target.write's turn for a caller that writes one batch at a time


class Target:
    """Where the page batches of a stream read by the caller go (a file's restore). A batch
    is checked completely before a byte of it is written: :meth:`decode` checks it (and
    decompresses it) into one of ``slots``, writing nothing, and :meth:`write` places it
    (the last copy of a page wins). Threads may decode side by side, each into its own
    slot; the writes take turns in stream order, a batch's turn being its index among the
    stream's batches (from 0): :meth:`write` waits for it. A batch that failed its check
    passes its turn with :meth:`fail`; from the first failure on, nothing more is
    written. :meth:`place` decodes and writes one batch, for a single caller (not to be
    mixed with numbered turns on one target)."""

    def __init__(self, slots: int = 1):
        buf, n = _err()
        self.ptr = lib.dp_target_new(slots, buf, n)
        if self.ptr == ffi.NULL:
            raise DataplaneError(_text(buf))
        self.slots = slots
        self._keep: dict[int, list] = {}
        self._bodies: list = [None] * slots        # what each slot's decoded batch points into
        self._counts = [ffi.new("uint32_t[2]") for _ in range(slots)]
        self._errs = [_err() for _ in range(slots)]

    def set_space(self, space: int, ranges: list) -> None:
        n, first, count, base, fds, offs, keep = _ranges(ranges, writable=True)
        buf, m = _err()
        if lib.dp_target_set_space(self.ptr, space, n, first, count, base, fds, offs, buf, m):
            raise DataplaneError(_text(buf))
        self._keep[space] = keep

    def decode(self, slot: int, record_type: int, body) -> None:
        """Check a PAGE_DATA or PAGE_DATA_ZSTD body into ``slot``; DataplaneError with the
        reason if it is bad. ``body`` is held until the slot is written."""
        buf, n = self._errs[slot]
        cbody = ffi.from_buffer("uint8_t[]", body)
        self._bodies[slot] = None
        if lib.dp_target_decode(self.ptr, slot, record_type, cbody, len(body), buf, n):
            del cbody           # its hold on the body's buffer must not live on in a traceback
            raise DataplaneError(_text(buf))
        self._bodies[slot] = cbody

    def write(self, slot: int, turn: int = NEXT) -> tuple[int, int] | None:
        """Place the batch decoded into ``slot`` in its ``turn``: (pages, zero pages), or
        None when it is not written (an earlier batch failed, or :meth:`stop`);
        DataplaneError if writing it failed."""
        buf, n = self._errs[slot]
        c = self._counts[slot]
        try:
            rc = lib.dp_target_write(self.ptr, slot, turn, c, c + 1, buf, n)
        finally:
            self._bodies[slot] = None
        if rc < 0:
            raise DataplaneError(_text(buf))
        return (c[0], c[1]) if rc == 0 else None

    def fail(self, turn: int) -> bool:
        """Batch ``turn`` failed its check: pass its turn, writing nothing more from now on.
        True if it is the first batch to fail."""
        return bool(lib.dp_target_fail(self.ptr, turn))

    def stop(self) -> None:
        """Write nothing more: writes and fails waiting for their turns, or called later,
        return at once."""
        lib.dp_target_stop(self.ptr)

    def place(self, record_type: int, body) -> tuple[int, int]:
        """Check and place one batch: (pages, zero pages); DataplaneError if it is bad."""
        self.decode(0, record_type, body)
        placed = self.write(0)
        if placed is None:
            raise DataplaneError("an earlier batch failed or the target was stopped: nothing more is placed")
        return placed

    def close(self) -> None:
        if self.ptr is not None:
            lib.dp_target_free(self.ptr)
            self.ptr = None
            self._keep.clear()
            self._bodies = [None] * self.slots


__all__ = ["AUTO", "MODES", "RAW", "ZSTD", "ChannelSummary", "DataplaneError", "Output", "OutputState",
           "Range", "Receiver", "RoundStats", "Sender", "SyncInfo", "Target", "TlsContext"]
