"""File helpers over the sans-I/O core (specs/stream-format.md, section "Reading").

The only module of the package that touches a file object.
"""

from __future__ import annotations

from typing import BinaryIO, Iterable, Iterator

from migrate.stream.reader import DONE, NEED_DATA, StreamReader

CHUNK = 1 << 20


def read_stream(fileobj: BinaryIO, *, chunk: int = CHUNK) -> Iterator:
    """Yield every record up to and including END, then check that the file ends there;
    raises StreamError / StreamTruncated. (A caller that must leave bytes after END
    unread drives a StreamReader(leave_trailing=True) itself.)"""
    reader = StreamReader()
    while True:
        record = reader.next_record()
        if record is DONE:
            while data := fileobj.read(chunk):
                reader.feed(data)
            return
        if record is not NEED_DATA:
            yield record
            continue
        data = fileobj.read(chunk)
        if not data:
            reader.eof()
        reader.feed(data)


def write_stream(fileobj: BinaryIO, pieces: Iterable[bytes]) -> int:
    """Write the writer's output pieces in order; returns the number of bytes written."""
    total = 0
    for piece in pieces:
        fileobj.write(piece)
        total += len(piece)
    return total
