"""Marks on one clock across processes (migrate/trace.py) and their timeline
(tools/trace_show.py)."""
import re
import subprocess
import sys
from pathlib import Path

from migrate import trace

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import trace_show  # noqa: E402


def test_marks_of_two_processes_make_one_timeline(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tr"
    monkeypatch.setattr(trace, "_dir", None)
    trace.mark("S pause asked")                     # off: nothing written anywhere
    assert not out.exists()
    trace.enable(str(out))
    try:
        trace.mark("S pause asked")
        child = "from migrate import trace; trace.mark('R state applied')"
        subprocess.run([sys.executable, "-c", child], check=True, env={"HVM_TRACE": str(out), "PATH": ""})
        trace.mark("S RUNNING read")
        trace.mark("S after the pause")
    finally:
        trace.enable(None)
    assert len(list(out.iterdir())) == 2                               # a file per process
    marks = trace_show.read(out)
    assert [m[4] for m in marks] == ["S pause asked", "R state applied", "S RUNNING read", "S after the pause"]
    assert marks[0][2] == marks[2][2] != marks[1][2]                   # the thread that marked
    assert 0 <= marks[0][3] <= marks[2][3]                              # its CPU time, which only grows
    [pause] = trace_show.pauses(marks)
    assert [m[4] for m in pause] == ["S pause asked", "R state applied", "S RUNNING read"]
    (out / "torn").write_text("12.5 77 77 0.25 fine\nnot a mark\n12.6 77 x\n")    # a torn line is skipped
    assert len(trace_show.read(out)) == 5
    assert trace_show.main([str(out), "--summary"]) == 0
    text = capsys.readouterr().out
    assert "over 1 pauses" in text and text.index("R state applied") < text.index("S RUNNING read")
    assert re.search(r"by side in a pause .*: S \d+\.\d{3}$", text, re.M)     # S's one step with a CPU figure


def test_no_pause_says_so(tmp_path):
    assert trace_show.main([str(tmp_path)]) == 1
