"""The checked-in golden streams (CRIU's crit-recode). Version 2, this writer's: it reads,
and re-encoding its records gives the same bytes. Version 1, written by the build before
version 2 (tools/make_golden_stream.py of that build): this reader still reads it."""

from __future__ import annotations

from pathlib import Path

from migrate.stream import (
    FORMAT_VERSION, CpuModel, End, MemoryLayout, StreamReader, Vm, decode_stream, encode_stream,
)
from migrate.stream.records import END
from migrate.stream.sample import sample_stream

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden-v2.hvmstream"
GOLDEN_V1 = FIXTURES / "golden-v1.hvmstream"


def header_version(path: Path) -> int:
    reader = StreamReader()
    reader.feed(path.read_bytes()[:64])
    reader.next_record()
    return reader.header.version


def test_golden_reads() -> None:
    records = decode_stream(GOLDEN.read_bytes())
    assert isinstance(records[-1], End)
    assert records[-1].stream_bytes == GOLDEN.stat().st_size - 16 - END.size
    assert {r.vm for r in records if isinstance(r, CpuModel)} == {Vm.GUEST, Vm.STUB}


def test_golden_reencodes_byte_identical() -> None:
    data = GOLDEN.read_bytes()
    assert encode_stream(decode_stream(data)) == data


def test_golden_is_what_the_generator_makes() -> None:
    assert sample_stream() == GOLDEN.read_bytes(), "run tools/make_golden_stream.py and review"


def test_golden_header_version() -> None:
    assert header_version(GOLDEN) == FORMAT_VERSION == 2


def test_version_1_golden_still_reads() -> None:
    records = decode_stream(GOLDEN_V1.read_bytes())
    assert header_version(GOLDEN_V1) == 1
    assert isinstance(records[-1], End)
    assert records[-1].stream_bytes == GOLDEN_V1.stat().st_size - 16 - END.size
    layouts = {r.space: r for r in records if isinstance(r, MemoryLayout)}
    assert layouts[Vm.GUEST] == MemoryLayout.flat(Vm.GUEST, 4096)     # one range from pfn 0
    assert not any(isinstance(r, CpuModel) for r in records)
