"""What a reader hands out, in a form two readers can be compared by (the restore's reader,
with its context scan, against the decoding reader): tools/fuzz_stream.py's read_all,
which its fuzzer compares the two readers by, for a stream fed in pieces."""
from __future__ import annotations

import sys
from pathlib import Path

from migrate.stream import StreamReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from fuzz_stream import read_all  # noqa: E402


def read_pieces(data: bytes, sizes: list[int], **options) -> list:
    """Every record a ``StreamReader(**options)`` hands out for ``data`` fed in pieces of
    ``sizes`` (in turn), with the reader's ``last`` and ``offset`` after it (context
    records as (type, vm, vcpu_id, state)), then the error it raises (at EOF, if none
    before) as its text, words, offset, index and type."""
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at:at + sizes[i % len(sizes)]])
        at, i = at + sizes[i % len(sizes)], i + 1
    return read_all(StreamReader(**options), pieces)[0]
