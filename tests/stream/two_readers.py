"""What a reader hands out, in a form two readers can be compared by (the restore's reader,
with its context scan, against the decoding reader): tools/fuzz_stream.py's read_all,
which its fuzzer compares the two readers by, for a stream fed in pieces."""
from __future__ import annotations

import sys
from pathlib import Path

from migrate.stream import StreamReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from fuzz_stream import PieceSource, read_all  # noqa: E402


def read_pieces(data: bytes, sizes: list[int], **options) -> list:
    """Every record a ``StreamReader(**options)`` hands out for ``data`` fed in pieces of
    ``sizes`` (in turn), with the reader's ``last`` and ``offset`` after it (context
    records as (type, vm, vcpu_id, state)), then the error it raises (at EOF, if none
    before) as its text, words, offset, index and type."""
    return read_all(StreamReader(**options), cut(data, sizes))[0]


def read_into(data: bytes, sizes: list[int], **options) -> list:
    """:func:`read_pieces`, the reader reading the pieces itself, as a restore reads a
    file (StreamReader.read_from), each read at most the rest of a piece."""
    return read_all(StreamReader(**options), PieceSource(cut(data, sizes)))[0]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at:at + sizes[i % len(sizes)]])
        at, i = at + sizes[i % len(sizes)], i + 1
    return pieces
