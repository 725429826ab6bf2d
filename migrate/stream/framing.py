"""Record framing (specs/stream-format.md, section "Record framing"): the 16-byte record
header, the CRC-32 and the zero padding, shared by the reader and the writer."""

from __future__ import annotations

import struct
import zlib

from migrate.stream.records import CRC_COVERED_HEADER, RECORD_HEADER, padded

_COVERED = struct.Struct("<III")  # type, body_length, reserved: the CRC-covered prefix


def record_crc(record_type: int, body: bytes, reserved: int = 0) -> int:
    """CRC-32 (zlib.crc32) over type, body_length and reserved as written, then the body."""
    covered = _COVERED.pack(record_type, len(body), reserved)
    assert len(covered) == CRC_COVERED_HEADER
    return zlib.crc32(body, zlib.crc32(covered))


def frame(record_type: int, body: bytes) -> bytes:
    """A whole record: header, body, zero padding to a multiple of 8 bytes."""
    head = RECORD_HEADER.pack(record_type, len(body), 0, record_crc(record_type, body))
    return head + body + bytes(padded(len(body)) - len(body))
