"""The checked-in golden stream (CRIU's crit-recode): it reads, and re-encoding its records
gives the same bytes. It is also the fixture a future version-2 reader must still read."""

from __future__ import annotations

from pathlib import Path

from migrate.stream import FORMAT_VERSION, End, StreamReader, decode_stream, encode_stream
from migrate.stream.records import END
from migrate.stream.sample import sample_stream

GOLDEN = Path(__file__).parent / "fixtures" / "golden-v1.hvmstream"


def test_golden_reads() -> None:
    records = decode_stream(GOLDEN.read_bytes())
    assert isinstance(records[-1], End)
    assert records[-1].stream_bytes == GOLDEN.stat().st_size - 16 - END.size


def test_golden_reencodes_byte_identical() -> None:
    data = GOLDEN.read_bytes()
    assert encode_stream(decode_stream(data)) == data


def test_golden_is_what_the_generator_makes() -> None:
    assert sample_stream() == GOLDEN.read_bytes(), "run tools/make_golden_stream.py and review"


def test_golden_header_version() -> None:
    reader = StreamReader()
    reader.feed(GOLDEN.read_bytes()[:64])
    reader.next_record()
    assert reader.header.version == FORMAT_VERSION == 1
