#!/usr/bin/env python3
"""Print a trace (``HVM_TRACE=DIR``, migrate/trace.py) as one timeline per pause: every
mark from a source's "S pause asked" to its "S RUNNING read" (or to the next pause), with
the milliseconds since the pause was asked and since the mark before, then the median of
each step over all the pauses.

    HVM_TRACE=/tmp/tr .venv/bin/python tools/bench_relocation.py --case idle --runs 5
    .venv/bin/python tools/trace_show.py /tmp/tr
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

START, END = "S pause asked", "S RUNNING read"


def read(directory: Path) -> list[tuple[float, int, str]]:
    """Every mark of every process in ``directory``, in time order (lines that do not parse
    are skipped: a process killed mid-write)."""
    marks = []
    for path in directory.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(" ")
            pid, _, label = rest.partition(" ")
            try:
                marks.append((float(stamp), int(pid), label))
            except ValueError:
                continue
    return sorted(marks)


def pauses(marks: list[tuple[float, int, str]]) -> list[list[tuple[float, int, str]]]:
    """The marks of each pause: from a START to its END (or the next START), in order."""
    out: list[list[tuple[float, int, str]]] = []
    current = None
    for mark in marks:
        if mark[2] == START:
            current = [mark]
            out.append(current)
        elif current is not None:
            current.append(mark)
            if mark[2] == END:
                current = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--summary", action="store_true", help="only the medians")
    opts = ap.parse_args(argv)
    found = pauses(read(opts.directory))
    if not found:
        print(f"no pause in {opts.directory} (no {START!r} mark)", file=sys.stderr)
        return 1
    steps: dict[str, list[float]] = {}
    for n, marks in enumerate(found):
        t0, last = marks[0][0], marks[0][0]
        if not opts.summary:
            print(f"-- pause {n}")
        for stamp, pid, label in marks:
            if not opts.summary:
                print(f"{(stamp - t0) * 1e3:8.3f} {(stamp - last) * 1e3:+7.3f} {pid:>7} {label}")
            steps.setdefault(label, []).append((stamp - t0) * 1e3)
            last = stamp
    print(f"-- median ms since {START!r} over {len(found)} pauses")
    for label, values in sorted(steps.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"{statistics.median(values):8.3f}  {label} ({len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
