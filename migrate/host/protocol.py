"""The control-socket protocol between `hvm` and a domain process.

A request is one msgpack map ``{"op": str, ...}``; the answer one msgpack
map ``{"ok": true, ...}`` or ``{"ok": false, "error": str}``.  Messages are
a msgpack stream (no extra framing); both sides bound what they buffer.
"""
from __future__ import annotations

import socket

import msgpack

MAX_MESSAGE = 1 << 20           # bytes one message may take
CONSOLE_CHUNK = 64 << 10        # console bytes one answer carries at most
INPUT_CHUNK = 4096              # console input bytes one request may carry


class ProtocolError(Exception):
    pass


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE, strict_map_key=True)


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(msgpack.packb(message, use_bin_type=True))


def receive(sock: socket.socket, unpack: msgpack.Unpacker) -> dict:
    """The next message from ``sock``; ProtocolError on EOF or garbage."""
    while True:
        try:
            message = next(unpack)
        except StopIteration:
            pass
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"malformed message: {exc}") from None
        else:
            if not isinstance(message, dict):
                raise ProtocolError("message is not a map")
            return message
        data = sock.recv(65536)
        if not data:
            raise ProtocolError("connection closed")
        try:
            unpack.feed(data)
        except msgpack.BufferFull:
            raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes") from None
