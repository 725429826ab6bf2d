"""The relocation channel: frames, messages and limits (specs/relocation.md, sections 2
and 3). Both ends use :class:`Channel` over a connected (TLS or plain) socket.
"""
from __future__ import annotations

import math
import select
import socket
import struct
import time

import msgpack

from ..text import one_line

PROTO = 1
STREAM_VERSIONS = [1, 2]        # what a destination reads; a source sends its writer's version
DEFAULT_CHANNELS = 2            # data channels a source asks for (section "Data channels")
MAX_GRANTED_CHANNELS = 8        # the most a destination grants (the stream's MAX_CHANNELS bounds CHANNELS)
CHANNEL_MAGIC = b"HVMCHAN1"
CHANNEL_PREAMBLE = struct.Struct("<8s16sII")     # magic, channel_id, index, reserved
CONTROL, DATA = 1, 2
FRAME = struct.Struct("<IHH")          # length, kind, reserved
MAX_CONTROL = 65536
MAX_DATA = 4 << 20
# A frame up to this size goes out in one write with its header (every control message,
# and the state records of a pause): two writes made two TLS records, each encrypted,
# sent and read on its own, on the downtime's path. A bigger body is not copied for it.
JOIN_BELOW = 64 << 10
MAX_ERROR_TEXT = 4096
CAPS = {CONTROL: MAX_CONTROL, DATA: MAX_DATA}

# timeouts, seconds (section 5); a wait for a frame is a deadline for the whole frame
DEFAULT = object()              # receive()'s timeout when none is given: FRAME_TIMEOUT
HANDSHAKE_TIMEOUT = 10.0
WELCOME_TIMEOUT = 30.0
FRAME_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0
RESTORED_TIMEOUT = 60.0
GO_TIMEOUT = 30.0
SYNC_TIMEOUT = 60.0
RESUME_TIMEOUT = 60.0
RUNNING_TIMEOUT = 30.0

# message keys and their types (unknown keys are ignored)
MESSAGES = {
    "HELLO": {"proto": int, "stream_versions": list, "name": str, "memory": int, "stub": bool,
              "disk": (str, type(None)), "live": bool},    # "cpu" (map) with stream version 2;
                                                            # optional "net": {"link", "name"} or nil,
                                                            # optional "vcpus" (int), "channels" (int),
                                                            # "handoff" (bool: GO on data channel 0 too)
    "WELCOME": {"proto": int, "stream_version": int},     # optional channels, channel_id, channel_token,
                                                            # handoff (bool)
    "SYNC": {"bytes": int},      # optional "round": page rounds the data channels ended
    "SYNCED": {"bytes": int},
    "STREAM_END": {"bytes": int},
    "RESTORED": {"seconds": float},
    "GO": {},
    "RUNNING": {},
    "ERROR": {"error": str},
}


ERROR_LINGER = 30.0          # seconds send_error reads on after ERROR (section 2)

class ChannelError(Exception):
    """The peer broke the protocol, closed, or the link failed."""


class PeerError(ChannelError):
    """The peer sent ERROR; the message is its text. ``not_resumed``: the ERROR said
    (key ``not_resumed`` true, after GO only) that the destination's copy never ran and
    is destroyed."""

    def __init__(self, text: str, not_resumed: bool = False):
        super().__init__(text)
        self.not_resumed = not_resumed


def ready(fds: dict, timeout: float) -> set[int]:
    """The descriptors among ``fds`` (a descriptor, or an object with fileno(), -> poll
    events) that are ready within ``timeout`` seconds (rounded up to a millisecond; 0: do
    not wait). poll(2), not select(2): a daemon holding many connections, and a receiving
    domain process, which has its descriptor numbers, have descriptors past FD_SETSIZE
    (1024), which select() cannot take. A hang-up or an error counts as ready (the read or
    write that follows says which)."""
    poller = select.poll()
    for fd, events in fds.items():
        poller.register(fd, events)
    return {fd for fd, _ in poller.poll(math.ceil(max(0.0, timeout) * 1000))}


def stream_cap(memory: int) -> int:
    """Most stream bytes one relocation may carry (section 2)."""
    return 64 * memory + (64 << 20)


def _check(message: dict) -> dict:
    kind = message.get("t")
    spec = MESSAGES.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ChannelError(f"unknown control message {kind!r}")
    for key, types in spec.items():
        value = message.get(key)
        if key not in message or not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise ChannelError(f"{kind} lacks {key} or it has the wrong type")
    return message


class Channel:
    """Frames over a connected socket. ``receive()`` returns ``("control", dict)`` or
    ``("data", bytes)``; an ERROR from the peer raises :class:`PeerError`."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def _recv_exact(self, n: int, deadline: float | None) -> bytes:
        """``n`` bytes, all of them by ``deadline`` (time.monotonic(); None: no limit): a
        peer that trickles a byte now and then does not keep a frame open longer."""
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelError("timed out waiting for the peer")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                raise ChannelError("timed out waiting for the peer") from None
            except OSError as exc:
                raise ChannelError(f"connection failed: {exc}") from None
            if not chunk:
                raise ChannelError("connection closed by the peer")
            buf += chunk
        return bytes(buf)

    def receive(self, timeout=DEFAULT, expecting: str | None = None):
        """The next frame, whole, within ``timeout`` seconds (DEFAULT: FRAME_TIMEOUT as it
        is when called; None: no limit). The limit is on the whole frame, not on each read:
        a peer trickling a byte now and then cannot hold the connection open.
        ``expecting``: a control message is due (its name, for the error): a DATA frame
        is refused from its header, its body (up to 4 MiB) never read."""
        if timeout is DEFAULT:
            timeout = FRAME_TIMEOUT
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sock.settimeout(timeout)
        length, kind, reserved = FRAME.unpack(self._recv_exact(FRAME.size, deadline))
        if kind not in CAPS or reserved:
            raise ChannelError(f"bad frame header (kind {kind}, reserved {reserved})")
        if length > CAPS[kind] or (kind == DATA and length == 0):
            raise ChannelError(f"frame of {length} bytes out of bounds for kind {kind}")
        if kind == DATA and expecting is not None:
            raise ChannelError(f"expected {expecting}, got DATA")
        body = self._recv_exact(length, deadline)
        if kind == DATA:
            return "data", body
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True, max_str_len=MAX_CONTROL,
                                      max_bin_len=MAX_CONTROL, max_array_len=256, max_map_len=64)
        except Exception as exc:        # msgpack raises several types for bad input
            raise ChannelError(f"malformed control message: {exc}") from None
        if not isinstance(message, dict):
            raise ChannelError("control message is not a map")
        _check(message)
        if message["t"] == "ERROR":
            raise PeerError(one_line(message["error"], MAX_ERROR_TEXT), message.get("not_resumed") is True)
        return "control", message

    def expect(self, kind: str, timeout=DEFAULT) -> dict:
        _, message = self.receive(timeout, expecting=kind)
        if message["t"] != kind:
            raise ChannelError(f"expected {kind}, got {message['t']}")
        return message

    def _send(self, kind: int, body) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            if len(body) <= JOIN_BELOW:     # one write: one TLS record, one segment
                self.sock.sendall(FRAME.pack(len(body), kind, 0) + body)
            else:
                self.sock.sendall(FRAME.pack(len(body), kind, 0))
                self.sock.sendall(body)
        except socket.timeout:
            raise ChannelError("timed out sending to the peer") from None
        except OSError as exc:
            raise ChannelError(f"connection failed: {exc}") from None

    def send(self, kind: str, **fields) -> None:
        body = msgpack.packb({"t": kind, **fields}, use_bin_type=True)
        if len(body) > MAX_CONTROL:
            raise ChannelError(f"{kind} message too large")
        self._send(CONTROL, body)

    def send_error(self, text: str, linger: float = ERROR_LINGER, **extra) -> None:
        """Best effort: the link may be what failed. Then half-close and read (and drop)
        what the peer still sends until it closes, falls silent for a second, or
        ``linger`` seconds pass: closing with unread input makes the kernel reset the
        connection, and a reset can destroy our ERROR before the peer reads it (a source
        still streaming would then see only a broken pipe, not the reason)."""
        try:
            self.send("ERROR", error=" ".join(str(text).split())[:MAX_ERROR_TEXT], **extra)
        except ChannelError:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(min(linger, 1.0))
            deadline = time.monotonic() + linger
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except (OSError, ValueError):
            pass

    def send_data(self, data) -> None:
        view = memoryview(data)
        for at in range(0, len(view), MAX_DATA):
            self._send(DATA, view[at:at + MAX_DATA])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class DataBuffer:
    """Collects the engine's small writes into DATA frames of ``size`` bytes."""

    def __init__(self, channel: Channel, size: int = 1 << 20):
        self.channel, self.size = channel, size
        self.buf = bytearray()
        self.sent = 0

    def write(self, data) -> None:
        self.buf += data
        if len(self.buf) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.channel.send_data(self.buf)
            self.sent += len(self.buf)
            self.buf = bytearray()
