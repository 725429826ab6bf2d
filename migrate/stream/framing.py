"""Record framing (specs/stream-format.md, section "Record framing"): the 16-byte record
header, the CRC-32 and the zero padding, shared by the reader and the writer. (The data
plane frames its page records in C, migrate/dataplane/dataplane.c, by the same rules.)"""

from __future__ import annotations

from migrate.stream._pages import ffi, lib
from migrate.stream.records import RECORD_HEADER, padded


def crc32(data, crc: int = 0) -> int:
    """zlib.crc32(data, crc), computed in C (by carry-less multiplication where the CPU
    has it, several times zlib's speed), without the GIL."""
    return lib.hvm_crc32(crc, ffi.from_buffer("uint8_t[]", data), len(data)) if len(data) else crc


def record_crc(record_type: int, body: bytes) -> int:
    """CRC-32 (zlib's) over type, body_length and reserved (zero) as written, the
    CRC_COVERED_HEADER bytes, then the body; one C call."""
    return lib.hvm_record_crc(record_type, ffi.from_buffer("uint8_t[]", body), len(body))


def frame(record_type: int, body: bytes) -> bytes:
    """A whole record: header, body, zero padding to a multiple of 8 bytes."""
    length = len(body)
    return (RECORD_HEADER.pack(record_type, length, 0, record_crc(record_type, body)) + body
            + bytes(padded(length) - length))


def frame_many(types, lengths, bodies: bytes) -> bytes:
    """Records of these ``types`` whose bodies (of these ``lengths``) lie end to end in
    ``bodies``, each framed as :func:`frame` does, in one C call."""
    n = len(types)
    if len(lengths) != n or sum(lengths) != len(bodies):
        raise ValueError("frame_many: types, lengths and bodies disagree")
    out = ffi.new("uint8_t[]", sum(RECORD_HEADER.size + padded(length) for length in lengths))
    size = lib.hvm_frame_records(ffi.new("uint32_t[]", [int(t) for t in types]),
                                 ffi.new("uint32_t[]", list(lengths)), n,
                                 ffi.from_buffer("uint8_t[]", bodies), out)
    return ffi.buffer(out, size)[:]
