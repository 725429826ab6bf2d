"""The stream's one error contract (specs/stream-format.md, section "Errors").

Everything wrong with a stream's bytes raises :class:`StreamError`; input that ends before
the END record raises its subclass :class:`StreamTruncated`. Any other exception escaping
the reader is a bug.
"""

from __future__ import annotations

from ..text import one_line


class StreamError(Exception):
    """A stream is malformed. Carries where: byte offset, record index and record type.

    Code that decodes a record body raises it with only a message; the reader fills in
    the position (see :meth:`at`) before it reaches the caller.
    """

    def __init__(
        self,
        msg: str,
        offset: int | None = None,
        record_index: int | None = None,
        record_type: int | None = None,
    ) -> None:
        msg = one_line(msg)      # hostile input must not make a huge line
        super().__init__(msg, offset, record_index, record_type)
        self.msg = msg
        self.offset = offset
        self.record_index = record_index
        self.record_type = record_type

    def at(self, offset: int, record_index: int | None, record_type: int | None) -> StreamError:
        """The same error, of the same class, placed at a position in the stream."""
        return type(self)(self.msg, offset, record_index, record_type)

    def __str__(self) -> str:
        return (
            f"{self.msg} (offset {_show(self.offset)}, record {_show(self.record_index)}, "
            f"type {_show_type(self.record_type)})"
        )


class StreamTruncated(StreamError):
    """The input ended before the END record."""


def _show(value: int | None) -> str:
    return "-" if value is None else str(value)


def _show_type(record_type: int | None) -> str:
    if record_type is None:
        return "-"
    from migrate.stream.records import type_name  # local: records imports this module

    return type_name(record_type)
