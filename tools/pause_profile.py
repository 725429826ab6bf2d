#!/usr/bin/env python3
"""Where the machine's cores went during each pause of a loopback benchmark: the pause
split into the steps between the marks every pause has (migrate/trace.py), and for each
step, which side's processes the CPU samples of ``perf record -a`` fell in (S the source's
domain process, D the destination's daemon, R the receiving domain process), how many
found a core idle, and how many fell elsewhere. The trace says when each side reached a
step; this says who held the cores meanwhile: a step whose cores are half idle waits (for a
wake-up, a peer), a step shared by two sides competes for the cores.

    .venv/bin/python tools/pause_profile.py --case idle --runs 9
    .venv/bin/python tools/pause_profile.py --freq 4000 -- --case paced63 --runs 5

Arguments after ``--`` (or any this tool does not know) go to tools/bench_relocation.py.
Needs perf (Debian: linux-perf) and the right to sample every CPU (root, or
kernel.perf_event_paranoid <= 0). Sampling costs the pause some time: compare steps and
shares within one run, not with a run without perf.
"""
from __future__ import annotations

import argparse
import bisect
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from trace_show import pauses, read  # noqa: E402

SIDES = ("S", "D", "R")


def steps_of(found: list[list]) -> list[str]:
    """The labels every pause has once, in the order of their median time in the pause."""
    counts: dict[str, list[float]] = {}
    for marks in found:
        seen = [m[4] for m in marks]
        for stamp, _, _, _, label in marks:
            if seen.count(label) == 1:
                counts.setdefault(label, []).append(stamp - marks[0][0])
    common = [label for label, times in counts.items() if len(times) == len(found)]
    return sorted(common, key=lambda label: statistics.median(counts[label]))


def attribute(found: list[list], samples: list[tuple[float, int]]) -> tuple[list[str], list[dict]]:
    """For each step between two consecutive common marks: its durations (ms, one per
    pause) and the samples (time, pid; pid 0: an idle core) inside it by side (S, D, R,
    idle, other). Returns the step names ("A -> B") and, per step, {"ms": [...], side: n}."""
    labels = steps_of(found)
    names = [f"{a} -> {b}" for a, b in zip(labels, labels[1:])]
    table = [{"ms": []} for _ in names]
    samples = sorted(samples)
    times = [t for t, _ in samples]
    for marks in found:
        at = {label: stamp for stamp, _, _, _, label in marks}
        side = {}
        for _, pid, _, _, label in marks:
            side.setdefault(pid, label[:1])
        for i, (a, b) in enumerate(zip(labels, labels[1:])):
            start, end = at[a], at[b]
            table[i]["ms"].append((end - start) * 1e3)
            for _, pid in samples[bisect.bisect_left(times, start):bisect.bisect_left(times, end)]:   # [start, end)
                who = "idle" if pid == 0 else side.get(pid, "other")
                table[i][who] = table[i].get(who, 0) + 1
    return names, table


def perf_samples(data: Path) -> list[tuple[float, int]]:
    """(CLOCK_MONOTONIC seconds, pid) of each sample in a perf.data file."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,time"], capture_output=True,
                         text=True, check=True).stdout
    samples = []
    for line in out.splitlines():
        fields = line.replace(":", " ").split()
        try:
            samples.append((float(fields[1]), int(fields[0])))
        except (IndexError, ValueError):
            continue
    return samples


def report(names: list[str], table: list[dict], pauses_seen: int) -> str:
    lines = [f"-- {pauses_seen} pauses; per step: median ms, then the share of both cores' samples "
             "by side (S source, D daemon, R receiver; idle: a core with nothing to run)"]
    width = max(len(n) for n in names)
    for name, row in zip(names, table):
        total = sum(v for k, v in row.items() if k != "ms") or 1
        shares = "  ".join(f"{who} {100 * row.get(who, 0) / total:3.0f}%" for who in (*SIDES, "idle", "other"))
        lines.append(f"{name:<{width}}  {statistics.median(row['ms']):6.2f} ms  {shares}")
    whole = {}
    for row in table:
        for k, v in row.items():
            if k != "ms":
                whole[k] = whole.get(k, 0) + v
    total = sum(whole.values()) or 1
    lines.append("whole pause: " + "  ".join(f"{who} {100 * whole.get(who, 0) / total:.0f}%"
                                             for who in (*SIDES, "idle", "other")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freq", type=int, default=2000, help="samples per second per CPU")
    opts, bench_args = ap.parse_known_args(argv)
    bench_args = [a for a in bench_args if a != "--"]
    if shutil.which("perf") is None:
        print("pause_profile: needs perf (Debian: linux-perf)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hvm-pause-profile-") as tmp:
        trace_dir, data = Path(tmp) / "trace", Path(tmp) / "perf.data"
        bench = [sys.executable, str(HERE / "bench_relocation.py"), *bench_args]
        cmd = ["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-F", str(opts.freq), "-o", str(data),
               "--", *bench]
        rc = subprocess.run(cmd, env={**os.environ, "HVM_TRACE": str(trace_dir)}).returncode
        if rc != 0:
            print(f"pause_profile: the benchmark (or perf) failed with exit status {rc}", file=sys.stderr)
            return 1
        found = pauses(read(trace_dir)) if trace_dir.is_dir() else []
        if not found:
            print("pause_profile: the benchmark left no traced pause", file=sys.stderr)
            return 1
        names, table = attribute(found, perf_samples(data))
    if not names:
        print("pause_profile: the pauses have fewer than two marks in common", file=sys.stderr)
        return 1
    print(report(names, table, len(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
