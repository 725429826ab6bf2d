"""Record framing (specs/stream-format.md, section "Record framing"): the 16-byte record
header, the CRC-32 and the zero padding, shared by the reader and the writer.

``parts_crc`` and ``frame_parts`` frame a body given as pieces (a batch's entries, then
its data) without joining it: the save path computes the CRC on an encoding thread and
writes the pieces as they are."""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

from migrate.stream.records import CRC_COVERED_HEADER, RECORD_HEADER, padded

_COVERED = struct.Struct("<III")  # type, body_length, reserved (zero): the CRC-covered prefix
assert _COVERED.size == CRC_COVERED_HEADER


def record_crc(record_type: int, body: bytes) -> int:
    """CRC-32 (zlib.crc32) over type, body_length and reserved as written, then the body."""
    return zlib.crc32(body, zlib.crc32(_COVERED.pack(record_type, len(body), 0)))


def parts_crc(record_type: int, parts: Sequence[bytes]) -> int:
    """:func:`record_crc` of the body ``b"".join(parts)``, without joining it."""
    crc = zlib.crc32(_COVERED.pack(record_type, sum(len(p) for p in parts), 0))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def frame(record_type: int, body: bytes) -> bytes:
    """A whole record: header, body, zero padding to a multiple of 8 bytes."""
    return b"".join(frame_parts(record_type, (body,), record_crc(record_type, body)))


def frame_parts(record_type: int, parts: Sequence[bytes], crc: int | None = None) -> list:
    """The record :func:`frame` makes of ``b"".join(parts)``, as pieces to write in order
    (the body is not copied); ``crc``: its :func:`parts_crc`, if already known."""
    length = sum(len(p) for p in parts)
    if crc is None:
        crc = parts_crc(record_type, parts)
    pad = padded(length) - length
    return [RECORD_HEADER.pack(record_type, length, 0, crc), *parts] + ([bytes(pad)] if pad else [])
