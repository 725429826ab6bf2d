#!/usr/bin/env python3
"""Print a trace (``HVM_TRACE=DIR``, migrate/trace.py) as one timeline per pause: every
mark from a source's "S pause asked" to its "S RUNNING read" (or to the next pause), with
the milliseconds since the pause was asked and since the mark before, and the CPU time the
marking thread used since its own mark before (in this pause: "cpu"), then the median of
each over all the pauses, and the CPU each side (S, D, R) used in a pause: a lower bound,
as each thread counts from its first mark in the pause on, and threads without marks (the
data plane's, the vCPUs') not at all. Wall time well above CPU time is waiting: for a
peer, or for a core.

    HVM_TRACE=/tmp/tr .venv/bin/python tools/bench_relocation.py --case idle --runs 5
    .venv/bin/python tools/trace_show.py /tmp/tr
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

START, END = "S pause asked", "S RUNNING read"


Mark = tuple  # (stamp, pid, tid, thread CPU seconds, label)


def read(directory: Path) -> list[Mark]:
    """Every mark of every process in ``directory``, in time order (lines that do not parse
    are skipped: a process killed mid-write)."""
    marks = []
    for path in directory.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split(" ", 4)
            try:
                stamp, pid, tid, cpu, label = fields
                marks.append((float(stamp), int(pid), int(tid), float(cpu), label))
            except ValueError:
                continue
    return sorted(marks)


def pauses(marks: list[Mark]) -> list[list[Mark]]:
    """The marks of each pause: from a START to its END (or the next START), in order."""
    out: list[list[Mark]] = []
    current = None
    for mark in marks:
        if mark[4] == START:
            current = [mark]
            out.append(current)
        elif current is not None:
            current.append(mark)
            if mark[4] == END:
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
    cpus: dict[str, list[float]] = {}
    sides: dict[str, list[float]] = {}          # per side, the CPU of its steps in each pause
    for n, marks in enumerate(found):
        t0, last = marks[0][0], marks[0][0]
        before: dict[int, float] = {}           # per thread, its CPU time at its mark before
        spent: dict[str, float] = {}
        if not opts.summary:
            print(f"-- pause {n}: ms since the pause was asked, since the mark before, cpu")
        for stamp, pid, tid, cpu, label in marks:
            used = (cpu - before[tid]) * 1e3 if tid in before else None
            before[tid] = cpu
            if not opts.summary:
                shown = f"{used:7.3f}" if used is not None else "      -"
                print(f"{(stamp - t0) * 1e3:8.3f} {(stamp - last) * 1e3:+7.3f} {shown} {pid:>7} {label}")
            steps.setdefault(label, []).append((stamp - t0) * 1e3)
            if used is not None:
                cpus.setdefault(label, []).append(used)
                spent[label[:1]] = spent.get(label[:1], 0.0) + used
            last = stamp
        for side, used in spent.items():
            sides.setdefault(side, []).append(used)
        if not opts.summary:
            print("   cpu ms by side: " + ", ".join(f"{side} {used:.3f}" for side, used in sorted(spent.items())))
    print(f"-- median ms since {START!r} over {len(found)} pauses, and the median cpu ms of the "
          "step to each mark (its thread's since its mark before)")
    for label, values in sorted(steps.items(), key=lambda kv: statistics.median(kv[1])):
        cpu = f"{statistics.median(cpus[label]):7.3f}" if label in cpus else "      -"
        print(f"{statistics.median(values):8.3f} {cpu}  {label} ({len(values)})")
    print("-- median cpu ms by side in a pause (each thread from its first mark in the pause on): " +
          ", ".join(f"{side} {statistics.median(values):.3f}" for side, values in sorted(sides.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
