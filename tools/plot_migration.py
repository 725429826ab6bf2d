"""Plot the per-round statistics of one relocation (``hvm migrate --stats-out FILE``) as a PNG:
pages sent and bandwidth per round (top), and the time line of the rounds with the
downtime and its parts (bottom).

    hvm migrate web1 node2:7410 --stats-out web1.json
    .venv/bin/python tools/plot_migration.py web1.json -o web1.png

matplotlib is a dependency of this tool only, not of hvm-migrate: when it is missing the
tool says so and installs it into the running interpreter's environment with pip (or only
says so with --no-install).
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path


def load_matplotlib(install: bool):
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        pass
    hint = f"{sys.executable} -m pip install matplotlib"
    if not install:
        raise SystemExit(f"plot_migration: matplotlib is not installed (a tool dependency, not a "
                         f"runtime one); install it with: {hint}")
    print(f"plot_migration: matplotlib is not installed; installing it for this tool: {hint}",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    return importlib.import_module("matplotlib")


def plot(stats: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = stats["rounds_detail"]
    idx = [r["round"] for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), height_ratios=[3, 2])
    top.bar(idx, [r["pages"] for r in rounds], color="tab:blue", label="pages sent")
    top.set_yscale("log")
    top.set_xlabel("round")
    top.set_ylabel("pages sent (log)")
    top.set_xticks(idx)
    bw = top.twinx()
    bw.plot(idx, [r["bandwidth"] / 1e6 for r in rounds], "o-", color="tab:red", label="bandwidth")
    bw.plot(idx, [r["dirty_rate"] * 4096 / 1e6 for r in rounds], "s--", color="tab:orange",
            label="dirty rate")
    bw.set_ylabel("MB/s")
    lines = top.get_legend_handles_labels()[0] + bw.get_legend_handles_labels()[0]
    top.legend(lines, [h.get_label() for h in lines], loc="upper right")
    top.set_title(f"{stats.get('name', '?')} -> {stats.get('target', '?')}: "
                  f"{stats['seconds'] * 1e3:.0f} ms, {stats['bytes'] / 1e6:.1f} MB, "
                  f"{stats['rounds']} rounds, downtime {stats['downtime'] * 1e3:.1f} ms")

    # time line: setup, the rounds, then the downtime parts
    t, y = 0.0, 0
    bottom.barh(y, stats["setup"] * 1e3, left=0, color="tab:gray")
    bottom.text(0, y + 0.45, "setup", fontsize=8)
    t = stats["setup"]
    for r in rounds:
        bottom.barh(1, r["seconds"] * 1e3, left=t * 1e3, color="tab:blue" if r["round"] % 2 else "tab:cyan",
                    edgecolor="white")
        t += r["seconds"]
    bottom.text(stats["setup"] * 1e3, 1.45, "rounds", fontsize=8)
    start = (stats["seconds"] - stats["downtime"]) * 1e3
    for name, color in (("downtime_final", "tab:red"), ("downtime_restore", "tab:purple"),
                        ("downtime_resume", "tab:green")):
        width = stats[name] * 1e3
        bottom.barh(2, width, left=start, color=color, label=f"{name[9:]} {width:.1f} ms")
        start += width
    bottom.set_yticks([0, 1, 2], ["setup", "pre-copy", "downtime"])
    bottom.set_xlabel("ms since connect")
    bottom.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stats", type=Path, help="the JSON file of hvm migrate --stats-out")
    ap.add_argument("-o", "--output", type=Path, help="PNG to write (default: STATS with .png)")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing matplotlib")
    opts = ap.parse_args()
    stats = json.loads(opts.stats.read_text())
    if not stats.get("rounds_detail"):
        raise SystemExit(f"plot_migration: {opts.stats} has no rounds_detail (not hvm migrate --stats-out?)")
    load_matplotlib(not opts.no_install)
    out = opts.output or opts.stats.with_suffix(".png")
    plot(stats, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
