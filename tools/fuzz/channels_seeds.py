#!/usr/bin/env python3
"""Seed inputs of the channel receiver's harness (tools/fuzz/channels_fuzz.c, whose header
comment describes the input: a setup, then the channels' byte streams), written into
tests/fuzz-corpus/channels (or DIR). The streams come from the independent channel-stream
encoder of tests/test_dataplane.py (ChannelWriter): well-formed ones of one to three
channels, rounds, both record types, zero pages over data, memfd and plain ranges, the
stub's space; and hostile ones, one fault each.

    .venv/bin/python tools/fuzz/channels_seeds.py [DIR]
"""
from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zstandard  # noqa: E402

from tests.test_dataplane import ChannelWriter  # noqa: E402

PAGE = 4096


def setup(streams: list[bytes], *, open_late=False, stub=0, fix_crc=False, fix_sync=False, high=False,
          pages=(8,), memfd=(), gaps=(1, 1), first=0, stub_pages=4, stub_first=0, end=0, handoff=False) -> bytes:
    """The harness's input: its setup bytes, then the streams (channels: len(streams))."""
    b0 = (len(streams) - 1) | open_late << 2 | stub << 3 | fix_crc << 5 | fix_sync << 6 | high << 7
    b1 = (len(pages) - 1) | sum(1 << (2 + i) for i in memfd) | end << 5 | handoff << 7
    counts = [(list(pages) + [1, 1, 1])[i] - 1 for i in range(3)]
    gap = sum((g - 1) << (2 * i) for i, g in enumerate(gaps))
    head = bytes([b0, b1, *counts, gap]) + struct.pack("<H", first) + bytes([(stub_first << 2) | (stub_pages - 1)])
    for s in streams[:-1]:
        head += len(s).to_bytes(3, "little")
    return head + b"".join(streams)


def page(tag: int) -> bytes:
    return (bytes([tag]) * 64 + f"page {tag} ".encode() * 10)[:128] * (PAGE // 128)


def zbatch(space: int, entries: list[tuple[int, int]], frame: bytes) -> bytes:
    """A PAGE_DATA_ZSTD body with the given entries (pfn, page type) and frame."""
    return struct.pack("<II", space, len(entries)) + b"".join(struct.pack("<QII", p, t, 0) for p, t in entries) + frame


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    hi = 1 << 40

    # -- well formed --
    w = ChannelWriter(0)
    w.batch(0, [(1, page(1)), (2, page(2))])
    w.sync(0, final=True)
    out["one-raw"] = setup([w.data])
    out["one-raw-fixed"] = setup([w.data], fix_crc=True, fix_sync=True)

    w = ChannelWriter(0)
    w.batch(0, [(0, page(3)), (1, page(4)), (5, page(5))], compressed=True)
    w.sync(0)
    w.batch(0, [(1, bytes(PAGE)), (5, page(6)), (6, bytes(PAGE))])     # zero over data, zero over fresh
    w.sync(1, final=True)
    out["one-zstd-rounds-memfd"] = setup([w.data], pages=(8,), memfd=(0,))

    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    ch0.batch(0, [(7, page(7))])
    ch0.sync(0)
    ch0.sync(1, final=True)
    ch1.sync(0)
    ch1.batch(0, [(7, page(8)), (12, page(9))], compressed=True)
    ch1.sync(1, final=True)
    out["two-barrier"] = setup([ch0.data, ch1.data], pages=(8, 4), memfd=(1,), gaps=(2, 1))

    ws = [ChannelWriter(i) for i in range(3)]
    for rnd in range(3):
        for i, w in enumerate(ws):
            pfn = (i + rnd) % 3
            w.batch(0, [(pfn, page(10 * rnd + i))], compressed=bool(i & 1))
            w.batch(1, [(40 + (i + rnd) % 3, page(40 + i))], compressed=True)
            w.sync(rnd, final=rnd == 2)
    out["three-stub-memfd-open-late"] = setup([w.data for w in ws], stub=3, open_late=True, stub_first=40,
                                              stub_pages=4, pages=(4,))
    out["three-stub-memory"] = setup([w.data for w in ws], stub=2, stub_first=40, pages=(4,), fix_sync=True)

    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    ch0.batch(0, [(hi + 3, page(20)), (hi + 4, page(21))], compressed=True)
    ch0.batch(1, [(2, page(22))])
    ch0.sync(0, final=True)
    ch1.batch(0, [(hi + 12, page(23))])
    ch1.batch(1, [(1, page(24))], compressed=True)
    ch1.sync(0, final=True)
    out["two-high-stub-dropped"] = setup([ch0.data, ch1.data], stub=1, high=True, pages=(8, 4), gaps=(1, 1),
                                         stub_first=0)

    w = ChannelWriter(0)       # ranges at 100..103, 105..106, 110..117: runs across them
    w.batch(0, [(100, page(30)), (101, bytes(PAGE)), (102, page(31)), (103, page(32)), (105, page(33)),
                (106, page(34)), (110, bytes(PAGE)), (111, page(35))], compressed=True)
    w.sync(0)
    w.batch(0, [(102, bytes(PAGE)), (103, bytes(PAGE)), (105, bytes(PAGE)), (117, page(36))])
    w.sync(1)
    w.sync(2, final=True)
    out["one-three-ranges"] = setup([w.data], pages=(4, 2, 8), memfd=(1,), gaps=(1, 3), first=100)
    out["one-three-ranges-memfd"] = setup([w.data], pages=(4, 2, 8), memfd=(0, 2), gaps=(1, 3), first=100)

    # the handoff on channel 0: GO after its FINAL sync (specs/relocation.md)
    go = b"\x89HVMGO!1" + struct.pack("<II", 0, 0)
    w = ChannelWriter(0)
    w.batch(0, [(1, page(1))])
    w.sync(0, final=True)
    out["handoff-go"] = setup([w.data + go], handoff=True)
    out["handoff-go-paused"] = setup([w.data + go[:8] + struct.pack("<II", 1, 0)], handoff=True)
    out["handoff-go-bad-flags"] = setup([w.data + go[:8] + struct.pack("<II", 2, 0)], handoff=True)
    out["handoff-go-cut"] = setup([w.data + go[:11]], handoff=True)
    out["handoff-nothing-after-final"] = setup([w.data], handoff=True)
    out["handoff-end-3"] = setup([w.data + go], handoff=True, end=3)
    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    for i, c in enumerate((ch0, ch1)):
        c.batch(0, [(i, page(i))])
        c.sync(0, final=True)
    out["handoff-two-go-after-the-other"] = setup([ch0.data, ch1.data + go], handoff=True)
    out["handoff-two-go"] = setup([ch0.data + go, ch1.data], handoff=True)

    # closed early, freed while another thread waits
    for end in (2, 3):
        out[f"one-three-ranges-end-{end}"] = setup([w.data], pages=(4, 2, 8), memfd=(1,), gaps=(1, 3), first=100,
                                                   end=end)
    out["three-stub-end-3"] = setup([x.data for x in ws], stub=2, stub_first=40, pages=(4,), end=3)

    # -- hostile --
    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    ch0.batch(0, [(1, page(1))])
    ch0.sync(0, final=True)
    ch1.sync(0)
    ch1.batch(0, [(2, page(2))])
    ch1.sync(1, final=True)
    out["two-final-at-different-rounds"] = setup([ch0.data, ch1.data])
    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    ch0.sync(0)
    ch0.sync(1, final=True)
    ch1.sync(0, final=True)
    out["two-final-at-different-rounds-2"] = setup([ch0.data, ch1.data])

    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    for w in (ch0, ch1):
        w.batch(0, [(4, page(4))])
        w.sync(0, final=True)
    out["two-same-page-one-round"] = setup([ch0.data, ch1.data])
    out["two-same-page-one-round-end-3"] = setup([ch0.data, ch1.data], end=3)

    w = ChannelWriter(0)
    w.batch(0, [(3, page(3))])
    w.sync(0, final=True)
    bad = bytearray(w.data)
    bad[60] ^= 1
    out["bad-crc"] = setup([bytes(bad)])
    out["bad-crc-fixed"] = setup([bytes(bad)], fix_crc=True)
    out["bytes-after-final"] = setup([w.data + b"\0" * 8])
    out["cut-inside-a-record"] = setup([w.data[:-9]])
    out["cut-after-a-batch"] = setup([w.data[:48 + 16 + 8 + 16 + PAGE]])

    w = ChannelWriter(0)
    w.batch(0, [(3, page(3))], compressed=True)
    w.sync(0, final=True)
    body_len = struct.unpack_from("<I", w.data, 52)[0]
    bad = bytearray(w.data)
    bad[48 + 16 + body_len] = 1
    out["bad-padding"] = setup([bytes(bad)], fix_crc=True)

    for name, writer in [("bad-token", ChannelWriter(0, token=bytes(32))), ("bad-version", ChannelWriter(0, version=1)),
                         ("bad-index", ChannelWriter(1)), ("bad-magic", ChannelWriter(0, magic=b"\x89HVMPAIR"))]:
        writer.sync(0, final=True)
        out[name] = setup([writer.data])
    ch0, ch1 = ChannelWriter(0), ChannelWriter(0)
    ch0.batch(0, [(1, page(1))])
    ch0.sync(0, final=True)
    ch1.sync(0, final=True)
    out["two-second-header-bad"] = setup([ch0.data, ch1.data])

    def one(fn, **kw) -> bytes:
        w = ChannelWriter(0)
        fn(w)
        w.sync(0, final=True)
        return setup([w.data], **kw)

    out["outside-the-ranges"] = one(lambda w: w.batch(0, [(6, page(1))]), pages=(4, 4), gaps=(4, 1))
    out["stub-without-memory"] = one(lambda w: w.batch(1, [(0, page(1))]))
    out["unknown-space"] = one(lambda w: w.record(3, struct.pack("<II", 2, 1) + struct.pack("<QII", 0, 1, 0), 1))
    out["type-not-allowed"] = one(lambda w: w.record(3, struct.pack("<II", 0, 1) + struct.pack("<QII", 0, 2, 0), 1))
    out["not-a-channel-record"] = one(lambda w: w.record(0x30, b"\x80"))
    out["dup-in-one-round"] = one(lambda w: (w.batch(0, [(1, page(1))]), w.batch(0, [(1, page(2))], compressed=True)))
    out["sync-lies"] = setup([_lie(records=5)])
    out["sync-lies-fixed"] = setup([_lie(records=5)], fix_sync=True, fix_crc=True)
    out["sync-flags"] = setup([_lie(flags=3)])
    out["sync-wrong-round"] = setup([_sync_round(2)])
    out["huge-length"] = setup([bytes(ChannelWriter(0).data) + struct.pack("<IIII", 3, 1 << 30, 0, 0)])
    out["record-reserved"] = setup([bytes(ChannelWriter(0).data) + struct.pack("<IIII", 3, 0, 1, 0)])
    out["no-header"] = setup([bytes(ChannelWriter(0).data)[:20]])
    out["no-channels-bytes"] = setup([b"", b""])
    out["short-body"] = one(lambda w: w.record(3, b"\0\0\0\0", 0))
    out["entries-cut"] = one(lambda w: w.record(3, struct.pack("<II", 0, 2) + struct.pack("<QII", 1, 1, 0), 2))
    out["entry-reserved"] = one(lambda w: w.record(3, struct.pack("<II", 0, 1) + struct.pack("<QII", 1, 1, 9), 1))
    out["zstd-data-without-pages"] = one(lambda w: w.record(4, zbatch(0, [(1, 1)], b"\0" * 8), 1))

    data = b"".join(page(50 + i) for i in range(2))
    entries = [(1, 2), (2, 2)]
    framed = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    frames = {
        "zstd-checksum": framed,
        "zstd-bad-checksum": framed[:-1] + bytes([framed[-1] ^ 1]),
        "zstd-no-content-size": no_size,
        "zstd-skippable-first": skippable + framed,
        "zstd-skippable-after": framed + skippable,
        "zstd-bytes-after": framed + b"\0",
        "zstd-dictionary": _with_dict(framed),
        "zstd-window-8k": _with_window(framed, 3 << 3),
        "zstd-window-8m": _with_window(framed, 13 << 3),
        "zstd-window-4m": _with_window(framed, 12 << 3),
        "zstd-cut": framed[:-7],
    }
    for name, frame in frames.items():
        out[name] = one(lambda w: w.record(4, zbatch(0, entries, frame), 2))
    return out


def _lie(**lie) -> bytes:
    w = ChannelWriter(0)
    w.batch(0, [(1, page(1))])
    w.sync(0, final=True, **lie)
    return bytes(w.data)


def _sync_round(rnd: int) -> bytes:
    w = ChannelWriter(0)
    w.sync(rnd, final=True)
    return bytes(w.data)


def _with_dict(frame: bytes) -> bytes:
    """The frame with a one-byte Dictionary_ID (7) in its header (after the window byte)."""
    fhd = frame[4]
    assert fhd & 3 == 0
    at = 5 if fhd & 0x20 else 6
    return frame[:4] + bytes([fhd | 1]) + frame[5:at] + b"\x07" + frame[at:]


def _with_window(frame: bytes, wd: int) -> bytes:
    """A single-segment frame turned into one with a window descriptor."""
    fhd = frame[4]
    assert fhd & 0x20 and fhd >> 6, "single segment, a content size field"
    return frame[:4] + bytes([fhd & ~0x20 & 0xFF, wd]) + frame[5:]


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fuzz-corpus" / "channels"
    target.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (target / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
