"""Record framing (specs/stream-format.md, section "Record framing"): the 16-byte record
header, the CRC-32 and the zero padding, shared by the reader and the writer. (The data
plane frames its page records in C, migrate/dataplane/dataplane.c, by the same rules.)"""

from __future__ import annotations

import struct
import zlib

from migrate.stream.records import CRC_COVERED_HEADER, RECORD_HEADER, padded

_COVERED = struct.Struct("<III")  # type, body_length, reserved (zero): the CRC-covered prefix
assert _COVERED.size == CRC_COVERED_HEADER


def record_crc(record_type: int, body: bytes) -> int:
    """CRC-32 (zlib.crc32) over type, body_length and reserved as written, then the body."""
    return zlib.crc32(body, zlib.crc32(_COVERED.pack(record_type, len(body), 0)))


def frame(record_type: int, body: bytes) -> bytes:
    """A whole record: header, body, zero padding to a multiple of 8 bytes."""
    length = len(body)
    return (RECORD_HEADER.pack(record_type, length, 0, record_crc(record_type, body)) + body
            + bytes(padded(length) - length))
