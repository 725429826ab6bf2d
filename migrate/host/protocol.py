"""The control-socket protocol between `hvm` and a domain process.

A request is one msgpack map ``{"op": str, ...}``; the answer one msgpack
map ``{"ok": true, ...}`` or ``{"ok": false, "error": str}``.  Messages are
a msgpack stream (no extra framing); both sides bound what they buffer.
"""
from __future__ import annotations

import os
import socket

import msgpack

from ..config import DEFAULT_COMPRESSION, Compression, Convergence

MAX_MESSAGE = 1 << 20           # bytes one message may take
CONSOLE_CHUNK = 64 << 10        # console bytes one answer carries at most
INPUT_CHUNK = 4096              # console input bytes one request may carry


class ProtocolError(Exception):
    pass


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE, strict_map_key=True)


MAX_FDS = 2                     # file descriptors one request may carry (SCM_RIGHTS)


def send(sock: socket.socket, message: dict, fds=()) -> None:
    """Send ``message``; ``fds`` (file descriptors) go with its first bytes."""
    data = msgpack.packb(message, use_bin_type=True)
    if fds:
        data = data[socket.send_fds(sock, [data], list(fds)):]
    sock.sendall(data)


def receive(sock: socket.socket, unpack: msgpack.Unpacker, fds: list | None = None) -> dict:
    """The next message from ``sock``; ProtocolError on EOF or garbage. File descriptors
    that come with it are appended to ``fds``, or closed when ``fds`` is None (nobody
    asked for them)."""
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
        data, passed, _, _ = socket.recv_fds(sock, 65536, MAX_FDS)
        for fd in passed:
            if fds is None:
                os.close(fd)
            else:
                fds.append(fd)
        if not data:
            raise ProtocolError("connection closed")
        try:
            unpack.feed(data)
        except msgpack.BufferFull:
            raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes") from None


# The convergence keys of a live ``save`` or ``migrate`` request: name -> (type, check).
CONVERGENCE_KEYS = {
    "downtime_ms": ((int, float), lambda v: v >= 0),
    "max_bandwidth": ((int, float), lambda v: v > 0),       # bytes per second
    "precopy_timeout": ((int, float), lambda v: v > 0),      # seconds (--timeout)
    "on_timeout": (str, lambda v: v in ("cancel", "force")),
    "throttle": (bool, lambda v: True),
    "compress": ((int, str, type(None)), lambda v: _compression_ok(v)),
}


def _compression_ok(value) -> bool:
    """None (uncompressed), a zstd level, or the text Compression.of takes."""
    try:
        Compression.of(value)
    except ValueError:
        return False
    return True


def convergence_request(options: dict, what: str) -> dict:
    """The request keys for ``options`` (CONVERGENCE_KEYS given by a caller): TypeError for
    an unknown one; None means not given (but ``compress`` None: uncompressed)."""
    unknown = set(options) - set(CONVERGENCE_KEYS)
    if unknown:
        raise TypeError(f"unknown {what} options: {', '.join(sorted(unknown))}")
    return {k: v for k, v in options.items() if v is not None or k == "compress"}


def convergence_from_request(req: dict, what: str) -> tuple[Convergence, int | str | None]:
    """The Convergence and the compression (None: uncompressed; a zstd level; "auto",
    "none", "zstd[:LEVEL]") a request asks for; absent keys take the defaults (``compress``
    absent: auto). ValueError names a bad key."""
    opts = {}
    for key, (types, ok) in CONVERGENCE_KEYS.items():
        if key not in req or (req[key] is None and key != "compress"):
            continue
        value = req[key]
        if isinstance(value, bool) is not (types is bool) or not isinstance(value, types) or not ok(value):
            raise ValueError(f"{what}: bad {key} {value!r}")
        opts[key] = value
    conv = Convergence(downtime=opts.get("downtime_ms", 300) / 1000,
                       max_bandwidth=opts.get("max_bandwidth"), timeout=opts.get("precopy_timeout"),
                       on_timeout=opts.get("on_timeout", "cancel"), throttle=opts.get("throttle", False))
    return conv, opts.get("compress", DEFAULT_COMPRESSION)
