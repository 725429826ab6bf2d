"""Shared fixtures for the stream tests: the sample stream and a map of its records."""

from __future__ import annotations

import pytest

from migrate.stream.records import HEADER, RECORD_HEADER, padded
from migrate.stream.sample import sample_stream
from migrate.stream.writer import StreamWriter
from migrate.stream.records import DomainConfig, MemoryLayout, Vm


def record_spans(data: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, type, body_length, total length) of each record of a well-formed stream."""
    spans, at = [], HEADER.size
    while at < len(data):
        record_type, length, _, _ = RECORD_HEADER.unpack_from(data, at)
        total = RECORD_HEADER.size + padded(length)
        spans.append((at, record_type, length, total))
        at += total
    return spans


@pytest.fixture(scope="session")
def sample() -> bytes:
    return sample_stream()


@pytest.fixture(scope="session")
def spans(sample: bytes) -> list[tuple[int, int, int, int]]:
    return record_spans(sample)


@pytest.fixture
def started() -> tuple[StreamWriter, list[bytes]]:
    """A writer that has written the header, a DOMAIN_CONFIG and both MEMORY_LAYOUTs
    (guest 16 pages, stub 4 pages); tests append records and call finish()."""
    writer = StreamWriter()
    parts = [writer.start(), writer.record(DomainConfig({"name": "t"})),
             writer.record(MemoryLayout.flat(Vm.GUEST, 16)), writer.record(MemoryLayout.flat(Vm.STUB, 4))]
    return writer, parts
