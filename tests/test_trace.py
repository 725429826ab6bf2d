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


def test_pause_profile_gives_each_step_its_samples_by_side():
    """tools/pause_profile.py's attribution: the steps are the marks every pause has, in
    order; a sample counts for the side whose process it fell in during that pause (the
    same pid is S in one move and R in the next), pid 0 as an idle core, the rest as
    other; samples outside the pauses count nowhere."""
    import pause_profile

    def mark(t, pid, label):
        return (t, pid, pid, 0.0, label)
    first = [mark(1.000, 10, "S pause asked"), mark(1.001, 20, "R END read"), mark(1.002, 10, "S RUNNING read")]
    # the second move: pid 20 is the source now, and a mark only this pause has
    second = [mark(2.000, 20, "S pause asked"), mark(2.0005, 20, "S only here"), mark(2.001, 30, "R END read"),
              mark(2.003, 20, "S RUNNING read")]
    samples = [(0.5, 10), (1.0002, 10), (1.0004, 0), (1.0006, 20), (1.0015, 10), (1.0016, 99),
               (2.0002, 20), (2.0008, 10), (2.002, 30), (2.0021, 0), (2.5, 20)]
    names, table = pause_profile.attribute([first, second], samples)
    assert names == ["S pause asked -> R END read", "R END read -> S RUNNING read"]
    assert [round(ms, 3) for ms in table[0]["ms"]] == [1.0, 1.0] and [round(ms, 3) for ms in table[1]["ms"]] == [1.0, 2.0]
    assert {k: v for k, v in table[0].items() if k != "ms"} == {"S": 2, "idle": 1, "R": 1, "other": 1}
    assert {k: v for k, v in table[1].items() if k != "ms"} == {"S": 1, "other": 1, "R": 1, "idle": 1}
    text = pause_profile.report(names, table, 2)
    assert "S pause asked -> R END read" in text and "whole pause: S 33%  D 0%  R 22%  idle 22%  other 22%" in text
