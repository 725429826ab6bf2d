"""A short run of tools/fuzz_stream.py in its plain random-mutation mode: any exception
other than StreamError out of the reader fails this test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fuzz_stream.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("fuzz_stream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_fuzz_finds_no_bug() -> None:
    assert load_tool().run_random(iterations=2000, seed=20261126) > 0


def test_seeds_read_cleanly_and_crc_repair_is_identity_on_them() -> None:
    tool = load_tool()
    for seed in tool.seeds():
        tool.one_input(seed)
        assert tool.repair_crcs(seed) == seed
