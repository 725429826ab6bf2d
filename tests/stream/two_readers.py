"""What a reader hands out, in a form two readers can be compared by (the restore's reader,
with its context scan, against the decoding reader). tools/fuzz_stream.py has its own
for its inputs: a tool does not import from the tests."""
from __future__ import annotations

from migrate.stream import DONE, NEED_DATA, HvmState, StreamError, StreamReader


def read_pieces(data: bytes, sizes: list[int], **options) -> list:
    """Every record a ``StreamReader(**options)`` hands out for ``data`` fed in pieces of
    ``sizes`` (in turn), with the reader's ``last`` and ``offset`` after it (context
    records as (type, vm, vcpu_id, state)), then the error it raises (at EOF, if none
    before) as its words, offset, index and type."""
    reader, out, at, i = StreamReader(**options), [], 0, 0
    try:
        while at < len(data):
            reader.feed(data[at:at + sizes[i % len(sizes)]])
            at, i = at + sizes[i % len(sizes)], i + 1
            while (record := reader.next_record()) not in (NEED_DATA, DONE):
                if isinstance(record, HvmState):
                    record = (record.type, record.vm, record.vcpu_id, record.decoded().state)
                out.append((record, reader.last, reader.offset))
        reader.eof()
    except StreamError as exc:
        out.append((exc.msg, exc.offset, exc.record_index, exc.record_type))
    return out
