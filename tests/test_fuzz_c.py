"""A short run of each libFuzzer harness of tools/fuzz_c.py (ASan + UBSan): the stub's
device model, the stream's C page helpers, the data plane's placement and channel receiver
and the run loop's exit decoding, each for a few seconds from the corpus kept in
tests/fuzz-corpus/NAME. A crash, a sanitizer report, a broken invariant or a leak fails
the test with libFuzzer's report."""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "fuzz_c.py"
SECONDS = 4
# inputs a short run must execute at least: the channel receiver starts threads, sockets and
# 8 MiB of buffers for every input (a few hundred inputs a second)
MIN_UNITS = {"channels": 150}


def load_tool():
    spec = importlib.util.spec_from_file_location("fuzz_c", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def binaries():
    tool = load_tool()
    why = tool.missing()
    if why is not None:
        pytest.skip(f"the C fuzz harnesses cannot be built: {why}")
    return tool.build()


@pytest.mark.parametrize("name", ["stub", "pages", "placement", "runloop", "channels"])
def test_harness_short_run(binaries, name, tmp_path) -> None:
    corpus = ROOT / "tests" / "fuzz-corpus" / name
    assert corpus.is_dir() and any(corpus.iterdir()), f"no corpus for {name}"
    (tmp_path / "new").mkdir()
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    limit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + 2048    # inherited: test_fuzz_short
    run = subprocess.run([str(binaries[name]), f"-max_total_time={SECONDS}", "-timeout=10",
                          f"-rss_limit_mb={limit}", "-seed=1", "-print_final_stats=1",
                          f"-artifact_prefix={tmp_path}/", str(tmp_path / "new"), str(corpus)],
                         capture_output=True, text=True, timeout=120, env=env)
    report = run.stderr
    assert run.returncode == 0, report[-4000:]
    assert "ERROR:" not in report and "runtime error" not in report, report[-4000:]
    units = int(re.search(r"stat::number_of_executed_units: (\d+)", report).group(1))
    assert units > MIN_UNITS.get(name, 1000), report[-2000:]
