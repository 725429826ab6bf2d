"""Device state records: the stub's binary form <-> plain records.

A record as the rest of the project sees it (and the stream carries it as
msgpack): ``{"device": str, "instance": int, "version": int,
"min_version": int, "fields": {name: int | bytes}}``.  The binary form lives
in stub memory (specs/device-state.md); parsing trusts nothing.
"""
from __future__ import annotations

import struct

from ..stream._pages import ffi as _ffi, lib as _lib
from ..stream.records import DeviceBodies
from . import abi

MAGIC = 0x42545344
VERSION = 1
NAME = 24
MAX_RECORDS = 64
KIND_U64, KIND_BYTES = 0, 1

HEADER = struct.Struct("<IIII")                  # magic, total_len, nrecords, version
REC = struct.Struct(f"<II{NAME}sIIII")           # rec_len, nfields, device, instance, version, min_version, pad
FIELD = struct.Struct(f"<{NAME}sII")             # name, kind, len


class DeviceStateError(ValueError):
    pass


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _name(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end <= 0:
        raise DeviceStateError(f"{what} name is empty or not terminated")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise DeviceStateError(f"{what} name is not ASCII") from None


def parse(buf: bytes | memoryview) -> list[dict]:
    """Records from the stub's state buffer; DeviceStateError if malformed."""
    buf = bytes(buf[:abi.STATE_SIZE])
    if len(buf) < HEADER.size:
        raise DeviceStateError("state buffer too short")
    magic, total, nrecords, version = HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise DeviceStateError(f"state buffer magic {magic:#x} version {version}: not device state v{VERSION}")
    if not HEADER.size <= total <= len(buf) or nrecords > MAX_RECORDS:
        raise DeviceStateError(f"state buffer length {total} or record count {nrecords} out of range")
    off, records = HEADER.size, []
    for _ in range(nrecords):
        if total - off < REC.size:
            raise DeviceStateError(f"record at {off} truncated")
        rec_len, nfields, dev, instance, ver, min_ver, pad = REC.unpack_from(buf, off)
        if rec_len < REC.size or rec_len > total - off or rec_len % 8 or pad:
            raise DeviceStateError(f"record at {off}: bad length {rec_len}")
        fields, foff, end = {}, off + REC.size, off + rec_len
        for _ in range(nfields):
            if end - foff < FIELD.size:
                raise DeviceStateError(f"field at {foff} truncated")
            raw, kind, length = FIELD.unpack_from(buf, foff)
            name = _name(raw, "field")
            body = foff + FIELD.size
            if kind not in (KIND_U64, KIND_BYTES) or (kind == KIND_U64 and length != 8) \
                    or _pad8(length) > end - body or name in fields:
                raise DeviceStateError(f"field {name!r} at {foff}: bad kind, length or duplicate")
            value = buf[body:body + length]
            fields[name] = int.from_bytes(value, "little") if kind == KIND_U64 else value
            foff = body + _pad8(length)
        if foff != end:
            raise DeviceStateError(f"record at {off}: {end - foff} stray bytes after its fields")
        records.append({"device": _name(dev, "device"), "instance": instance, "version": ver,
                        "min_version": min_ver, "fields": fields})
        off = end
    if off != total:
        raise DeviceStateError(f"{total - off} stray bytes after the last record")
    return records


def binary_size(record: dict) -> int:
    """Bytes ``record`` (fields already int or bytes) takes in the binary form."""
    return REC.size + sum(FIELD.size + _pad8(len(v) if isinstance(v, bytes) else 8)
                          for v in record["fields"].values())


def build(records: list[dict]) -> bytes:
    """The stub's binary form of ``records``; DeviceStateError if they do not fit."""
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        raise DeviceStateError("device state must be a list of at most 64 records")
    try:
        return _build(records)
    except (KeyError, TypeError, AttributeError, struct.error, OverflowError) as exc:
        raise DeviceStateError(f"malformed device record: {exc!r}") from None


def _build(records: list[dict]) -> bytes:
    out = bytearray(HEADER.size)
    for rec in records:
        body = bytearray()
        for name, value in rec["fields"].items():
            if isinstance(value, bool) or not isinstance(value, (int, bytes)):
                raise DeviceStateError(f"field {name!r}: {type(value).__name__} is neither int nor bytes")
            if isinstance(value, int):
                kind, data = KIND_U64, value.to_bytes(8, "little")
            else:
                kind, data = KIND_BYTES, value
            body += FIELD.pack(_encode_name(name), kind, len(data)) + data + bytes(_pad8(len(data)) - len(data))
        out += REC.pack(REC.size + len(body), len(rec["fields"]), _encode_name(rec["device"]),
                        rec["instance"], rec["version"], rec["min_version"], 0) + body
    if len(out) > abi.STATE_SIZE:
        raise DeviceStateError(f"device state of {len(out)} bytes exceeds {abi.STATE_SIZE}")
    HEADER.pack_into(out, 0, MAGIC, len(out), len(records), VERSION)
    return bytes(out)


def _encode_name(name: str) -> bytes:
    if not isinstance(name, str) or not name.isascii() or "\0" in name:
        raise DeviceStateError(f"name {name!r} must be an ASCII string")
    raw = name.encode("ascii")
    if not 0 < len(raw) < NAME:
        raise DeviceStateError(f"name {name!r} must be 1 to {NAME - 1} ASCII characters")
    return raw


class Encoder:
    """The stub's state buffer straight to DEVICE_STATE bodies in C (hvm_device_bodies,
    migrate/stream/_build_pages.py), without building the records in Python: a save's pause
    runs it. The same bodies as ``DeviceBodies.of(parse(buf))``, byte for byte, by the same
    checks (tests/test_devstate_bodies.py); what the C code refuses goes that slow way,
    whose error (DeviceStateError) says why."""

    def __init__(self) -> None:
        self.out = _ffi.new("uint8_t[]", 2 * abi.STATE_SIZE)
        self.ends = _ffi.new("uint32_t[]", MAX_RECORDS)
        self.instances = _ffi.new("uint32_t[]", MAX_RECORDS)
        self.names = _ffi.new("uint8_t[]", NAME * MAX_RECORDS)

    def bodies(self, buf: bytes | memoryview) -> DeviceBodies:
        data = bytes(buf[:abi.STATE_SIZE])      # read once: the checks rely on it holding still
        n = _lib.hvm_device_bodies(data, len(data), MAX_RECORDS, self.out, len(self.out), self.ends,
                                   self.instances, self.names)
        if n < 0:
            return _refused(data)
        out = _ffi.buffer(self.out, self.ends[n - 1] if n else 0)[:]
        starts = [0, *self.ends[0:n - 1]] if n else []
        names = _ffi.buffer(self.names, NAME * n)[:]
        keys = tuple((names[NAME * i:NAME * i + NAME].split(b"\0", 1)[0].decode("ascii"), self.instances[i])
                     for i in range(n))
        return DeviceBodies(keys, tuple(out[a:b] for a, b in zip(starts, self.ends[0:n])))


def _refused(data: bytes) -> DeviceBodies:
    """The slow way for a buffer the C encoder refused: raises why. Taking it would mean
    the two disagree, a bug."""
    try:
        DeviceBodies.of(parse(data))
    except DeviceStateError:
        raise
    except ValueError as exc:           # DeviceState.pack: "writer refuses: ..."
        raise DeviceStateError(str(exc)) from None
    raise AssertionError("the C encoder refused device state that parse and DeviceState.pack take")
