"""Short runs of tools/fuzz_stream.py: the structure-aware mutator without an engine, and
atheris (coverage-guided, libFuzzer) for a few seconds over the corpus kept in the repo.
Any exception other than StreamError / RestoreError out of the reader or a restore fails."""

from __future__ import annotations

import importlib.util
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.stream import DONE, NEED_DATA, StreamError, StreamReader

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "fuzz_stream.py"
CORPUS = ROOT / "tests" / "stream" / "fuzz-corpus"


def load_tool():
    spec = importlib.util.spec_from_file_location("fuzz_stream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutator_run_finds_no_bug() -> None:
    tool = load_tool()
    assert tool.run_random(iterations=1500, seed=20261204, corpus=tool.corpus_inputs([CORPUS])) > 0


def test_seeds_restore_cleanly_and_reframing_is_identity_on_them() -> None:
    tool = load_tool()
    for seed in tool.seeds():
        header, records = tool.split(seed)
        assert tool.reframe(header, records) == seed
        for last in (0, 1, 3):                  # the reader, and the restore engine both ways
            tool.one_input(seed + bytes([last]))


def where_it_fails(data: bytes) -> int | None:
    """The index of the record the reader refuses; None if it accepts the whole stream."""
    reader = StreamReader()
    try:
        reader.feed(data)
        while reader.next_record() not in (NEED_DATA, DONE):
            pass
        reader.eof()
        return None
    except StreamError as exc:
        return exc.record_index or 0


def test_mutants_reach_past_the_checksums() -> None:
    """Reframed mutants get past the framing: most are refused at a body, an ordering rule
    or a restore check, deep in the stream, not at the first CRC or at END's digest."""
    tool = load_tool()
    rng = random.Random(7)
    corpus = tool.seeds()
    mutate_bytes = tool._byte_mutate(rng)
    depths = [where_it_fails(tool.mutate(rng.choice(corpus), tool.MAX_INPUT, rng, corpus, mutate_bytes))
              for _ in range(600)]
    deep = sum(1 for d in depths if d is None or d >= 4)
    assert deep > 0.5 * len(depths), f"only {deep} of {len(depths)} mutants got past record 3"
    whole = depths.count(None)          # END's counts and digest checked: a restore would apply
    assert whole > 0.1 * len(depths), f"only {whole} of {len(depths)} mutants passed END's checks"


def test_atheris_short_run(tmp_path) -> None:
    """A few seconds of coverage-guided fuzzing; new inputs go to a temporary directory."""
    pytest.importorskip("atheris", reason="atheris is in the test extra of pyproject.toml")
    # libFuzzer's limit is on the peak RSS (ru_maxrss), which a child inherits from this
    # process: after the suite's 1 GiB guests it alone passed 1024 MiB (seen at 4.7 GiB)
    limit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + 1024
    run = subprocess.run([sys.executable, str(TOOL), "--runs", "15000", "-seed=13", "-timeout=10",
                          f"-rss_limit_mb={limit}", str(tmp_path), str(CORPUS)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    done = [line for line in run.stderr.splitlines() if "DONE" in line]
    assert done, run.stderr[-2000:]
    cov = int(done[-1].split("cov: ")[1].split()[0])
    assert cov > 300, done[-1]                   # it sees the Python code it drives
