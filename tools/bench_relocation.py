"""Relocation on loopback: one domain moved back and forth between two host daemons (two
`hvm host serve` processes, each with its own state directory, TLS 1.3 with a fresh CA),
printing total time, downtime and where it went (specs/relocation.md, section 7), bytes
and rounds per relocation, then medians.

    .venv/bin/python tools/bench_relocation.py --workload idle --memory 64 --runs 5
    .venv/bin/python tools/bench_relocation.py --workload ledger --memory 256 --runs 5 --json
    .venv/bin/python tools/bench_relocation.py --workload ledger --memory 32 --runs 50 --check
    .venv/bin/python tools/bench_relocation.py --workload dirtier --arg 67108864 --arg 20000000
    .venv/bin/python tools/bench_relocation.py --workload idle --vcpus 1,2,4,8 --runs 5
    .venv/bin/python tools/bench_relocation.py --workload smp --vcpus 1,2,4,8 --runs 5

Bytes are compared with the guest memory actually touched: the allocated size of the
source domain process's memfds (guest RAM and the stub's), st_blocks * 512, taken just
before each move. A move that fails with the guest still running on its source is reported
and counted, and the runs go on. ``--check`` (ledger): after each move, waits for a new self-check line on
the destination and verifies its sum against ledger_sum (ping-pong); smp: waits for a new
round checked on the destination and fails on a BAD or STALL line. ``--vcpus 1,2,4,8``:
the same moves for a domain of each vCPU count in turn, in one run (the first count's
figures are the baseline the others are compared with): downtime and pause skew (first to
last vCPU stopped at the final pause) by vCPU count.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.domain import DomainConfig  # noqa: E402
from migrate.host import control, tls  # noqa: E402
from migrate.host.relocate import DOWNTIME_PARTS, migrate_domain  # noqa: E402
from migrate.guest import check  # noqa: E402

def touched_bytes(name: str, base: Path) -> int:
    """Allocated bytes of the domain process's memfds (guest RAM and stub RAM)."""
    pid = int((base / name / "pid").read_text())
    blocks = {}                   # by inode: a memfd may be open at several fds
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:"):
                st = os.stat(path)
                blocks[st.st_ino] = st.st_blocks * 512
        except OSError:
            continue
    return sum(blocks.values())


def console_text(name: str, base: Path) -> str:
    with control.DomainClient(name, base) as c:
        return c.console_text()


def ledger_check(name: str, base: Path, seed: int, npages: int, after_gen: int, timeout=20.0) -> int:
    """Wait for a self-check line past ``after_gen`` on this host; verify every sum there
    (vCPU 0's, with several: the others check themselves and say CORRUPT)."""
    import re
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console_text(name, base)
        lines = re.findall(r"^ledger ok (?:cpu=0 )?gen=(\d+) sum=([0-9a-f]{16}) ", text, re.MULTILINE)
        if "CORRUPT" in text:
            raise SystemExit(f"ledger CORRUPT on {base}:\n{text[-1000:]}")
        for gen, total in lines:
            if int(total, 16) != check.ledger_sum(seed, int(gen), npages):
                raise SystemExit(f"ledger sum wrong at gen {gen} on {base}")
        if lines and int(lines[-1][0]) > after_gen:
            return int(lines[-1][0])
        time.sleep(0.05)
    raise SystemExit(f"no new ledger line on {base} within {timeout}s")


def smp_check(name: str, base: Path, after_round: int, timeout=60.0) -> int:
    """Wait for a round checked past ``after_round`` on this host; no BAD or STALL line."""
    import re
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console_text(name, base)
        if re.search(r"^smp (BAD|STALL)", text, re.MULTILINE):
            raise SystemExit(f"smp check failed on {base}:\n{text[-1500:]}")
        rounds = [int(r) for r in re.findall(r"^smp ok round=(\d+) ", text, re.MULTILINE)]
        if rounds and rounds[-1] > after_round:
            return rounds[-1]
        time.sleep(0.05)
    raise SystemExit(f"no new smp round on {base} within {timeout}s")


KEYS = ("seconds", "setup", "downtime", "downtime_final", "downtime_restore", "downtime_resume",
        "pause_skew")
PARTS = DOWNTIME_PARTS


def serve(base: Path, tls_dir: str) -> tuple[subprocess.Popen, int]:
    """An `hvm host serve` on a free loopback port, state in ``base``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", "host", "serve", "--listen",
                             f"127.0.0.1:{port}", "--tls-dir", tls_dir],
                            env={**os.environ, "HVM_STATE_DIR": str(base)}, stderr=subprocess.PIPE, text=True)
    for _ in range(3):
        if "listening on" in proc.stderr.readline():
            return proc, port
    raise SystemExit("hvm host serve did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="idle")
    ap.add_argument("--memory", type=int, default=64, help="MiB")
    ap.add_argument("--vcpus", default="1", help="vCPU counts, comma-separated (e.g. 1,2,4,8)")
    ap.add_argument("--arg", type=int, action="append", default=[])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--channels", type=int, default=None,
                    help="data channels to ask for (default: hvm migrate's; 0: pages on the control connection)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to run before each move")
    ap.add_argument("--check", action="store_true",
                    help="ledger or smp: verify a self-check after each move")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    counts = [int(n) for n in opts.vcpus.split(",")]
    by_count = []
    with tempfile.TemporaryDirectory(prefix="hvm-bench-reloc-") as tmp:
        root = Path(tmp)
        tls.keygen(root / "pki", ["127.0.0.1"])
        tls_dir = str(root / "pki" / "127.0.0.1")
        bases = [root / "a", root / "b"]
        servers = [serve(base, tls_dir) for base in bases]
        try:
            for vcpus in counts:
                if not opts.json and len(counts) > 1:
                    print(f"== {vcpus} vCPU{'s' if vcpus != 1 else ''}", flush=True)
                results = moves(opts, vcpus, bases, servers, tls_dir)
                by_count.append((vcpus, results, medians(results)))
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(10)
    if opts.json:
        vcpus, results, med = by_count[0]
        print(json.dumps({"workload": opts.workload, "memory_mib": opts.memory, "vcpus": vcpus,
                          "runs": results, "median": med,
                          "by_vcpus": [{"vcpus": n, "runs": r, "median": m} for n, r, m in by_count]}))
        return 0
    for vcpus, results, med in by_count:
        if len(counts) > 1:
            print(f"-- {vcpus} vCPU{'s' if vcpus != 1 else ''}")
        print(f"median of {len(results)}: total {med['seconds'] * 1e3:.1f} ms, downtime "
              f"{med['downtime'] * 1e3:.2f} ms (final {med['downtime_final'] * 1e3:.2f} + restore "
              f"{med['downtime_restore'] * 1e3:.2f} + resume {med['downtime_resume'] * 1e3:.2f}), "
              f"{med['bytes'] / 1e6:.2f} MB on the wire for {med['touched'] / 1e6:.2f} MB touched "
              f"({med['bytes'] / med['touched']:.3f}x); final round {med['final_pages']:.0f} pages; "
              f"downtime max {max(r['downtime'] for r in results) * 1e3:.2f} ms"
              + (f"; every self-check ok ({len(results)} moves)" if opts.check else ""))
        print("median parts (ms): " + " ".join(f"{k} {v * 1e3:.2f}" for k, v in med["parts"].items()))
    if len(counts) > 1:
        base_down = by_count[0][2]["downtime"]
        print(f"\n{opts.workload} {opts.memory} MiB, median of {opts.runs} moves each, in one run:")
        print(f"{'vCPUs':>5} {'downtime ms':>12} {'x vs ' + str(counts[0]):>8} {'pause skew ms':>14} "
              f"{'skew max ms':>12} {'stop ms':>8} {'capture ms':>11} {'resume ms':>10}")
        for vcpus, results, med in by_count:
            parts = med["parts"]
            print(f"{vcpus:>5} {med['downtime'] * 1e3:>12.2f} {med['downtime'] / base_down:>8.2f} "
                  f"{med['pause_skew'] * 1e3:>14.3f} {max(r['pause_skew'] for r in results) * 1e3:>12.3f} "
                  f"{parts['stop'] * 1e3:>8.2f} {parts['capture'] * 1e3:>11.2f} {parts['resume'] * 1e3:>10.2f}")
    return 0


def moves(opts, vcpus: int, bases: list[Path], servers: list, tls_dir: str) -> list[dict]:
    """``opts.runs`` moves of a new domain of ``vcpus`` vCPUs between the two daemons; each
    move's statistics (the domain is destroyed at the end)."""
    name = f"bench{vcpus}"
    args = opts.arg + [0] * (8 - len(opts.arg))
    control.create_domain(DomainConfig(name, opts.workload, opts.memory << 20, args=args, vcpus=vcpus),
                          bases[0])
    results, failed = [], []
    npages = gen = 0
    if opts.check and opts.workload == "ledger":
        import re
        deadline = time.monotonic() + 30
        while not (m := re.search(r"^ledger start (?:cpu=0 )?seed=\d+ pages=(\d+)", console_text(name, bases[0]), re.M)):
            if time.monotonic() > deadline:
                raise SystemExit("the ledger did not start")
            time.sleep(0.05)
        npages = int(m.group(1))
    if opts.check and opts.workload == "smp":
        gen = smp_check(name, bases[0], 0)
    here = 0
    try:
        for run in range(opts.runs):
            there = 1 - here
            time.sleep(opts.settle)
            touched = touched_bytes(name, bases[here])
            more = {} if opts.channels is None else {"channels": opts.channels}
            try:
                reply = migrate_domain(name, f"127.0.0.1:{servers[there][1]}",
                                       live=not opts.offline, tls_dir=tls_dir, base=bases[here], **more)
            except control.ControlError as exc:
                if "keeps running here" not in str(exc):
                    raise
                failed.append(str(exc))         # the guest is still here: say so, go on
                print(f"run {run}: FAILED, the guest stays where it was: {exc}", flush=True)
                continue
            control.wait_gone(name, bases[here])
            here = there
            s = reply["stats"]
            s["touched"] = touched
            last = s["rounds_detail"][-1] if s.get("rounds_detail") else {"pages": 0, "bytes": 0}
            s["final_pages"], s["final_bytes"] = last["pages"], last["bytes"]
            s.setdefault("pause_skew", 0.0)
            if opts.check and opts.workload == "ledger":
                gen = ledger_check(name, bases[here], opts.arg[0] if opts.arg else 0, npages, gen)
                s["checked_gen"] = gen
            elif opts.check and opts.workload == "smp":
                gen = smp_check(name, bases[here], gen)
                s["checked_round"] = gen
            results.append(s)
            parts = s.get("downtime_parts", {})
            if not opts.json:
                print(f"run {run}: total {s['seconds'] * 1e3:.1f} ms, downtime {s['downtime'] * 1e3:.2f} ms "
                      f"(final {s['downtime_final'] * 1e3:.2f} [{last['pages']} pages, "
                      f"{last['bytes'] / 1e3:.0f} kB] + restore {s['downtime_restore'] * 1e3:.2f}"
                      f" + resume {s['downtime_resume'] * 1e3:.2f}), setup {s['setup'] * 1e3:.1f} ms, "
                      f"{s['bytes'] / 1e6:.2f} MB for {touched / 1e6:.2f} MB touched "
                      f"({s['bytes'] / touched:.3f}x), {s['rounds']} rounds"
                      + (f", pause skew {s['pause_skew'] * 1e3:.3f} ms" if vcpus > 1 else "")
                      + (f", self-check ok ({gen})" if opts.check else ""), flush=True)
                print("       parts (ms): " + " ".join(f"{k} {parts[k] * 1e3:.2f}" for k in PARTS
                                                    if k in parts), flush=True)
    finally:
        for base in bases:
            for info in control.list_domains(base):
                with control.DomainClient(info["name"], base) as c:
                    c.call("destroy")
            for info in control.list_domains(base):
                control.wait_gone(info["name"], base)
    if failed:
        print(f"{len(failed)} of {opts.runs} moves failed (the guest kept running where it was)", flush=True)
    return results


def medians(results: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in results) for k in KEYS}
    for key in ("bytes", "touched", "final_pages", "final_bytes"):
        med[key] = statistics.median(r[key] for r in results)
    med["parts"] = {k: statistics.median(r["downtime_parts"].get(k, 0.0) for r in results) for k in PARTS}
    return med


if __name__ == "__main__":
    sys.exit(main())
