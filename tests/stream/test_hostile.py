"""Hostile bodies through every entry point that reads a stream without KVM
(specs/stream-format.md, "Errors"): the library's decode_stream, a restore (on a fake
domain: the engine, its C scatter, the collectors, the stub's device buffer) and the
`hvm stream verify|inspect|dump` commands. Only StreamError (and, for a restore,
RestoreError) may come out, and a command says one line. Bodies are made for their record
type by hypothesis and tools/fuzz_stream.py's generators, inside otherwise valid streams
whose CRCs and END are recomputed, so they reach the deep checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from migrate.cli import hvm
from migrate.engine.restore import restore
from migrate.engine.state import RestoreError
from migrate.stream import StreamError, decode_stream
from migrate.stub.devstate import DeviceStateError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fuzz_stream.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("fuzz_stream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = load_tool()
SEEDS = FUZZ.seeds()


@st.composite
def hostile_streams(draw) -> bytes:
    """A seed stream with one to three record bodies replaced by hostile ones."""
    header, records = FUZZ.split(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(records) - 2))           # not END: it is made afresh
        how = draw(st.sampled_from(["made", "bytes", "type"]))
        if how == "made":
            records[i][1] = FUZZ.hostile_body(records[i][0], records[i][1], draw(st.randoms(use_true_random=False)))
        elif how == "bytes":
            records[i][1] = draw(st.binary(max_size=300))
        else:
            records[i][0] = draw(st.sampled_from([*FUZZ.KNOWN_TYPES, 0x8000_0003, 0x8000_0030, 0x7777]))
    return FUZZ.reframe(header, records)


HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(exc: Exception) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) < 600, text[:300]


@HOSTILE
@given(hostile_streams())
def test_decode_stream_raises_only_stream_errors(data: bytes) -> None:
    try:
        decode_stream(data)
    except StreamError as exc:
        one_line(exc)


@HOSTILE
@given(hostile_streams(), st.booleans())
def test_restore_raises_only_stream_or_restore_errors(data: bytes, fresh_stub: bool) -> None:
    try:
        with FUZZ.fake_host():
            restore([data[:len(data) // 2], data[len(data) // 2:]], make_domain=FUZZ.fake_domain,
                    fresh_stub=fresh_stub)
    except (StreamError, RestoreError) as exc:
        one_line(exc)
    except DeviceStateError as exc:     # a fresh stub's LOAD refuses it: a DomainError on a real domain
        one_line(exc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(hostile_streams())
def test_stream_commands_say_one_line(tmp_path, data: bytes) -> None:
    path = tmp_path / "hostile.hvm"
    path.write_bytes(data)
    for verb in ("verify", "inspect", "dump"):
        res = CliRunner().invoke(hvm, ["stream", verb, str(path)])
        assert res.exit_code in (0, 1), (verb, res.output[-500:], res.exception)
        if res.exit_code == 1:
            assert res.output.startswith("Error: ") and len(res.output.splitlines()) == 1, res.output[:500]
        assert max(map(len, res.output.splitlines()), default=0) < 1100


@pytest.mark.parametrize("depth", [31, 500, 995, 1023, 1024, 5000])
def test_deep_nesting_is_one_line_everywhere(tmp_path, depth: int) -> None:
    """The crash of issue 13: a DOMAIN_CONFIG or DEVICE_STATE body nested 991..1023 deep
    raised RecursionError out of every entry point; at 1024 the message was empty."""
    for target in (1, 0x30):
        header, records = FUZZ.split(SEEDS[0])
        i = next(n for n, r in enumerate(records) if r[0] == target)
        records[i][1] = b"\x81\xa1a" + b"\x91" * depth + b"\xc0"
        data = FUZZ.reframe(header, records)
        refused = depth + 1 > 32
        def restore_it():
            with FUZZ.fake_host():
                restore([data], make_domain=FUZZ.fake_domain, fresh_stub=True)
        for run in (lambda: decode_stream(data), restore_it):
            try:
                run()
                assert not refused
            except StreamError as exc:          # a shallow DEVICE_STATE lacks its keys
                assert "nested deeper than 32 levels" in exc.msg if refused else "keys are" in exc.msg, exc
            except (RestoreError, DeviceStateError):
                assert not refused        # the shallow one is read, then refused by the restore
        path = tmp_path / "deep.hvm"
        path.write_bytes(data)
        res = CliRunner().invoke(hvm, ["stream", "verify", str(path)])
        assert res.exit_code == (1 if refused or target == 0x30 else 0), res.output
        assert len(res.output.splitlines()) == 1


def test_restore_refuses_page_batches_as_the_reader_does() -> None:
    """One reading of PAGE_DATA_ZSTD: the data plane's placement (a restore) refuses every
    frame the reader refuses (skippable, a dictionary, a window over 4 MiB, a bad
    checksum, bytes after the frame), with the stream error, not another exception."""
    import struct
    import zstandard
    page = bytes(range(256)) * 16
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(page)
    checked = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(page)
    frames = {
        "skippable": b"\x50\x2a\x4d\x18" + struct.pack("<I", 4096) + page,
        "dictionary": frame[:4] + bytes([frame[4] | 1, 7]) + frame[5:],
        "window": frame[:4] + bytes([frame[4] & ~0x20, 0x68]) + frame[5:],
        "checksum": checked[:-1] + bytes([checked[-1] ^ 1]),
        "after": frame + b"\0",
    }
    for name, bad in frames.items():
        header, records = FUZZ.split(SEEDS[1])             # a guest without a stub
        i = next(n for n, r in enumerate(records) if r[0] == 4)
        records[i][1] = struct.pack("<II", 0, 1) + struct.pack("<QII", 7, 2, 0) + bad
        data = FUZZ.reframe(header, records)
        with pytest.raises(StreamError):
            decode_stream(data)
        with FUZZ.fake_host(), pytest.raises(StreamError) as info:
            restore([data], make_domain=FUZZ.fake_domain)
        assert "PAGE_DATA_ZSTD" in str(info.value), (name, info.value)


def test_inspect_of_a_saved_disk_path_with_a_nul_byte_is_one_line() -> None:
    """`hvm stream inspect` shows what a restore would decide of the saved disk from the
    stream's own DOMAIN_CONFIG map, unchecked: a path with a NUL byte made os.stat raise
    ValueError ("embedded null byte") after the table was printed (found by the test above)."""
    from migrate.engine.compat import saved_disk_line
    assert saved_disk_line({"disk": "a\0b"}) == "disk: the saved path holds a NUL byte (a restore refuses it)"


def test_a_stub_layout_of_the_right_size_in_the_wrong_place_is_refused_by_its_ranges() -> None:
    """specs/stream-format.md "Restore" step 2: the stub's MEMORY_LAYOUT is the stub RAM's
    layout (one range from pfn 0), not just its page count; the refusal names both layouts."""
    import struct
    from migrate.stream.records import RecordType
    header, records = FUZZ.split((Path(__file__).parent / "fixtures" / "golden-v2.hvmstream").read_bytes())
    stub = next(r for r in records if r[0] == RecordType.MEMORY_LAYOUT and struct.unpack_from("<I", r[1])[0] == 1)
    assert struct.unpack_from("<QQ", stub[1], 16) == (0, 2048)
    stub[1] = stub[1][:16] + struct.pack("<QQ", 16, 2048)          # 2048 pages, from pfn 16
    records = [r for r in records if not (r[0] in (3, 4) and struct.unpack_from("<I", r[1])[0] == 1)]
    with FUZZ.fake_host(), pytest.raises(RestoreError) as info:
        restore([FUZZ.reframe(header, records)], make_domain=FUZZ.fake_domain)
    assert str(info.value) == ("stub MEMORY_LAYOUT is 2048 pages from pfn 0x10; this build's stub is "
                               "2048 pages from pfn 0x0"), info.value
