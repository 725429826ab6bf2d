"""A TCP proxy on loopback for relocation fault tests: it sits between a source and a
destination daemon and relays both directions, for the control connection and for every
data channel (specs/relocation.md, "Data channels": a connection that opens with the
channel preamble), which it relays as raw bytes.

- ``frames=True`` (plain TCP, ``--insecure``): it parses the frames of
  specs/relocation.md section 2, calls ``on_control(direction, message)`` before it
  forwards each CONTROL message (return False to drop the message and close both sides),
  and can flip one byte inside guest page data: it follows the stream's record framing
  (specs/stream-format.md) in the source's DATA bytes and, in the first PAGE_DATA or
  PAGE_DATA_ZSTD record whose page data starts at or after ``flip_after`` stream bytes,
  XORs one byte in the middle of that data.
- ``frames=False`` (TLS): it flips the byte at ``flip_after`` of the raw source-to-
  destination byte stream (inside a TLS record), knowing nothing of the content.
With data channels the pages are on them: the flip then happens on channel 0 instead (its
records followed the same way past its preamble and channel header, or its raw bytes).
"""
from __future__ import annotations

import socket
import struct
import threading

import msgpack

FRAME = struct.Struct("<IHH")
RECORD = struct.Struct("<IIII")
STREAM_HEADER = 24
CHANNEL_HEAD = 32 + 48            # a channel's preamble, then its channel header
CHANNEL_MAGIC = b"HVMCHAN1"
PAGE_RECORDS = (3, 4)             # PAGE_DATA, PAGE_DATA_ZSTD


class PageDataFlipper:
    """Follows the record framing of the stream bytes it sees and flips one byte of page data."""

    def __init__(self, after: int, head: int = STREAM_HEADER):
        self.after = after
        self.pos = 0                  # stream offset of the next byte seen
        self.next_record = head
        self.pending = bytearray()    # a record header split across DATA frames
        self.flip_at: int | None = None
        self.flipped: dict | None = None

    def feed(self, data: bytes) -> bytes:
        buf = bytearray(data)
        start = self.pos
        end = start + len(buf)
        while self.flip_at is None and self.flipped is None and self.next_record < end:
            off = self.next_record - start
            if self.pending or off + RECORD.size > len(buf):
                need = RECORD.size - len(self.pending)
                self.pending += buf[max(off, 0):max(off, 0) + need]
                if len(self.pending) < RECORD.size:
                    break
                header, self.pending = bytes(self.pending), bytearray()
            else:
                header = bytes(buf[off:off + RECORD.size])
            rtype, length, _, _ = RECORD.unpack(header)
            body = self.next_record + RECORD.size
            if rtype in PAGE_RECORDS and length > 4096:
                count = struct.unpack_from("<I", self._peek(buf, start, body + 4, 4))[0] \
                    if body + 8 <= end else None
                if count is not None:
                    data_start = body + 8 + 16 * count
                    if data_start >= self.after:
                        self.flip_at = (data_start + body + length) // 2
                        self.flipped = {"record_type": rtype, "record_offset": self.next_record,
                                        "offset": self.flip_at}
            self.next_record = body + length + (-length) % 8
        if self.flip_at is not None and start <= self.flip_at < end:
            buf[self.flip_at - start] ^= 0x01
            self.flip_at = None
        self.pos = end
        return bytes(buf)

    @staticmethod
    def _peek(buf, start, offset, size):
        return bytes(buf[offset - start:offset - start + size])


class Proxy:
    def __init__(self, upstream: tuple[str, int], *, frames: bool, flip_after: int | None = None,
                 on_control=None):
        self.upstream, self.frames, self.on_control = upstream, frames, on_control
        self.flip_after = flip_after
        self.stream_flipper = PageDataFlipper(flip_after) if frames and flip_after is not None else None
        self.channel_flipper: PageDataFlipper | None = None
        self.raw_flipped = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.channels = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def flipper(self) -> PageDataFlipper | None:
        """The flipper of channel 0 if there are data channels, else the stream's."""
        return self.channel_flipper or self.stream_flipper

    @property
    def flipped(self) -> bool:
        return self.raw_flipped if not self.frames else bool(self.flipper and self.flipper.flipped
                                                              and self.flipper.flip_at is None)

    def _channel_flip(self, a: socket.socket, b: socket.socket, direction: str) -> None:
        """Channel 0 of a plain-TCP relocation: its records followed, one page data byte flipped."""
        self.channel_flipper = PageDataFlipper(self.flip_after, CHANNEL_HEAD)
        try:
            while data := a.recv(65536):
                b.sendall(self.channel_flipper.feed(data))
        except OSError:
            pass
        _end(a, b)

    def _accept(self) -> None:
        while True:
            try:
                src, _ = self.listener.accept()
            except OSError:
                return
            head = src.recv(8, socket.MSG_PEEK | socket.MSG_WAITALL)
            dst = socket.create_connection(self.upstream)
            self.socks += [src, dst]
            if head == CHANNEL_MAGIC:
                self.channels += 1
                flip = self.channels == 1 and self.flip_after is not None
                pump = self._raw if not flip else (self._channel_flip if self.frames else self._raw_flip)
                threading.Thread(target=pump, args=(src, dst, "S->D"), daemon=True).start()
                threading.Thread(target=self._raw, args=(dst, src, "D->S"), daemon=True).start()
                continue
            pump = self._frames if self.frames else self._raw_flip
            threading.Thread(target=pump, args=(src, dst, "S->D"), daemon=True).start()
            threading.Thread(target=pump, args=(dst, src, "D->S"), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _raw(self, a: socket.socket, b: socket.socket, direction: str, flip: bool = False) -> None:
        pos = 0
        try:
            while data := a.recv(65536):
                if flip and direction == "S->D" and self.flip_after is not None and pos <= self.flip_after < pos + len(data):
                    buf = bytearray(data)
                    buf[self.flip_after - pos] ^= 0x01
                    data, self.raw_flipped = bytes(buf), True
                pos += len(data)
                b.sendall(data)
        except OSError:
            pass
        _end(a, b)

    def _raw_flip(self, a: socket.socket, b: socket.socket, direction: str) -> None:
        self._raw(a, b, direction, flip=True)

    def _frames(self, a: socket.socket, b: socket.socket, direction: str) -> None:
        try:
            while True:
                header = _recv_exact(a, FRAME.size)
                length, kind, _ = FRAME.unpack(header)
                body = _recv_exact(a, length)
                if kind == 2 and direction == "S->D" and self.stream_flipper is not None:
                    body = self.stream_flipper.feed(body)
                elif kind == 1 and self.on_control is not None:
                    message = msgpack.unpackb(body, raw=False)
                    if self.on_control(direction, message) is False:
                        break
                b.sendall(header + body)
        except (OSError, EOFError):
            pass
        _end(a, b)


def _end(*socks: socket.socket) -> None:
    """One connection's relaying ended: end both of its sides (the others go on)."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)
