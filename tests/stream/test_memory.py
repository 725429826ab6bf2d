"""Memory bounded by design (specs/stream-format.md, "Memory"): the peak RSS of the reader
and of every stream tool, measured in a subprocess on crafted streams, stays within
O(one record) of a run on a tiny stream, whatever the stream holds; decode_stream holds
about the stream twice (its input and its records), never an object per page entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from migrate.stream.framing import frame
from migrate.stream.pages import BATCH_HEADER, PAGE_ENTRY
from migrate.stream.records import DomainConfig, End, Header, MemoryLayout, RecordType, Vm

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "stream" / "fixtures" / "golden-v1.hvmstream"
MIB = 1 << 20
SLACK = 8 * MIB             # interpreter noise between two runs of one command


def write_stream(path: Path, records: list[bytes]) -> Path:
    """Header, the framed ``records`` (the first must be a DOMAIN_CONFIG), END."""
    digest, size, pages = xxhash.xxh3_128(), 0, 0
    with open(path, "wb") as f:
        for part in [Header().pack(), *records]:
            digest.update(part)
            f.write(part)
            size += len(part)
            if part[:4] == RecordType.PAGE_DATA.to_bytes(4, "little"):
                pages += BATCH_HEADER.unpack_from(part, 16)[1]
        f.write(frame(RecordType.END, End(len(records), pages, size, digest.digest()).pack()))
    return path


def layouts(guest_pages: int) -> list[bytes]:
    return [frame(RecordType.MEMORY_LAYOUT, MemoryLayout.flat(Vm.GUEST, guest_pages).pack()),
            frame(RecordType.MEMORY_LAYOUT, MemoryLayout.flat(Vm.STUB, 0).pack())]


def config(**extra) -> bytes:
    return frame(RecordType.DOMAIN_CONFIG, DomainConfig({"name": "m", **extra}).pack())


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("memory")
    zero_batch = frame(RecordType.PAGE_DATA, BATCH_HEADER.pack(0, 1024)
                       + b"".join(PAGE_ENTRY.pack(pfn, 1, 0) for pfn in range(1024)))
    one_zero = frame(RecordType.PAGE_DATA, BATCH_HEADER.pack(0, 1) + PAGE_ENTRY.pack(3, 1, 0))
    return {
        # 4M ZERO entries (64 MiB), then a 32 MiB record of an unknown optional type
        "zeros": write_stream(d / "zeros.hvm", [config(), *layouts(4096), *[zero_batch] * 4096,
                                                 frame(0x8000_7777, bytes(32 * MIB))]),
        # a configuration value as large as a msgpack body may be, many small page records
        # (a line each in inspect's table) and many skipped ones
        "wide": write_stream(d / "wide.hvm", [config(blob=bytes(MIB - 8192), text="x\n" * 2000),
                                               *layouts(16), *[frame(0x8000_7777, b"")] * 200_000,
                                               *[one_zero] * 200_000]),
    }


PROGRAM = """
import sys
from pathlib import Path
what, path = sys.argv[1], sys.argv[2]
if what == "decode":
    from migrate.stream import decode_stream
    records = decode_stream(Path(path).read_bytes())
    print(len(records))
else:
    from migrate.cli import hvm
    try:
        hvm(["stream", what, path], standalone_mode=False)
    finally:
        sys.stdout.flush()
# VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's over exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024, file=sys.stderr)
"""


def peak(what: str, path: Path) -> tuple[int, str]:
    """Peak RSS in bytes of one run, and what it printed."""
    run = subprocess.run([sys.executable, "-c", PROGRAM, what, str(path)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stderr.strip().splitlines()[-1]), run.stdout


@pytest.mark.parametrize("what", ["verify", "inspect", "dump"])
def test_tools_hold_one_record(streams, what) -> None:
    base, _ = peak(what, GOLDEN)
    used, out = peak(what, streams["zeros"])
    assert "END" in out or "ok" in out
    assert used - base < 1.25 * 32 * MIB + SLACK, f"{what}: {(used - base) / MIB:.0f} MiB over the base"
    used, out = peak(what, streams["wide"])
    assert used - base < MIB + SLACK, f"{what}: {(used - base) / MIB:.0f} MiB over the base"
    assert max(len(line) for line in out.splitlines()) <= 1100          # values cut short


def test_decode_stream_holds_the_stream_about_twice(streams) -> None:
    base, _ = peak("decode", GOLDEN)
    size = streams["zeros"].stat().st_size
    used, out = peak("decode", streams["zeros"])
    assert int(out) == 4096 + 4          # the unknown record is skipped
    # the input, its records (16 bytes per ZERO entry: about the input again), one record
    assert used - base < 2 * size + 1.25 * 32 * MIB + SLACK, f"{(used - base) / MIB:.0f} MiB over the base"


def test_inspect_counts_distinct_pages_of_ranges_in_a_byte_each(tmp_path) -> None:
    """The tools' page count is one byte per page of the layout's ranges, whatever the pfns."""
    from click.testing import CliRunner
    from migrate.cli import hvm
    from migrate.stream import StreamWriter, ZERO_PAGE
    from migrate.stream.sample import sample_cpu
    w = StreamWriter()
    parts = [w.start(), w.record(DomainConfig({"name": "r"})), *[w.record(r) for r in sample_cpu(Vm.GUEST)],
             w.record(MemoryLayout(Vm.GUEST, ((0, 16), (1 << 39, 16)))), w.record(MemoryLayout.flat(Vm.STUB, 0)),
             w.pages(Vm.GUEST, [(3, ZERO_PAGE), ((1 << 39) + 5, b"x" * 4096), ((1 << 39) + 15, ZERO_PAGE)]),
             w.pages(Vm.GUEST, [((1 << 39) + 5, ZERO_PAGE)]), w.finish()]
    path = tmp_path / "ranges.hvm"
    path.write_bytes(b"".join(parts))
    res = CliRunner().invoke(hvm, ["stream", "inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "4 page entries: 1 data, 3 zero, 1 resent; 3 distinct pages, 29 never sent" in res.output
