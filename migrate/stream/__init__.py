"""The hvm-migrate stream format, sans-I/O (specs/stream-format.md).

``StreamWriter`` turns records into bytes; ``StreamReader`` turns bytes back into records;
every problem with the input is a ``StreamError`` (``StreamTruncated`` when it ends early).
"""

from migrate.stream.cpu import CpuidPolicy, CpuModel, MsrPolicy
from migrate.stream.errors import StreamError, StreamTruncated
from migrate.stream.hvm import HvmState
from migrate.stream.pages import ZERO_PAGE, PageBatch, PageType
from migrate.stream.reader import DONE, NEED_DATA, StreamReader, decode_stream
from migrate.stream.records import (
    FORMAT_VERSION, MAX_PAGES_PER_BATCH, MAX_RECORD_BODY, PAGE_SIZE, Channels, Creator, DeviceBodies,
    DeviceState, DomainConfig, End, Header, MemoryLayout, RecordType, Vm,
)
from migrate.stream.writer import StreamWriter, encode_stream

__all__ = [
    "Channels", "CpuModel", "CpuidPolicy", "MsrPolicy", "DONE", "FORMAT_VERSION", "MAX_PAGES_PER_BATCH", "MAX_RECORD_BODY", "NEED_DATA", "PAGE_SIZE",
    "ZERO_PAGE", "Creator", "DeviceBodies", "DeviceState", "DomainConfig", "End", "Header", "HvmState",
    "MemoryLayout", "PageBatch", "PageType", "RecordType", "StreamError", "StreamReader",
    "StreamTruncated", "StreamWriter", "Vm", "decode_stream", "encode_stream",
]
