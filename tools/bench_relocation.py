"""Relocation on loopback beside this machine's limits: one domain moved back and forth between
two host daemons (two `hvm host serve` processes, each with its own state directory, TLS 1.3
with a fresh CA unless --insecure), printing per move the pause (downtime) beside the
switch-over estimate, where the pause went (specs/relocation.md, section 7), the bytes sent
beside the guest memory touched, the bulk round's stream rate, then medians.

    .venv/bin/python tools/bench_relocation.py                          # the four issue-11 cases
    .venv/bin/python tools/bench_relocation.py --case flat511 --insecure --compress none
    .venv/bin/python tools/bench_relocation.py --case stream --runs 3   # incompressible pages
    .venv/bin/python tools/bench_relocation.py --workload ledger --memory 256 --check --runs 20
    .venv/bin/python tools/bench_relocation.py --workload ledger --arg 1 --arg 64 --disk 4 --check
    .venv/bin/python tools/bench_relocation.py --workload smp --vcpus 4 --memory 64 --check

Cases (a 1 GiB guest, a 30 ms downtime target): ``idle``; ``flat63`` and ``flat511``: the
dirtier as fast as it can over 63 / 511 MiB (one word into every page in turn); ``paced63``:
the dirtier at 20 MB/s over 63 MiB; ``stream``: 1 GiB of random pages dirtied at 4 KB/s, so
the first round measures the stream. The dirtier paces itself by spinning on the TSC (ring 3
of the test guest cannot halt), so at any rate its vCPU holds one core throughout, as a busy
guest's would: on a two-core host the move has the other core (compare tools/bench_dataplane.py,
the data plane alone). The dirtier's content is ``--content`` (mixed by
default, about 2.3x with zstd-1). ``--workload`` runs one custom case instead.

The limits are measured in the same run on a sample of the source guest's own memory
(tools/machine_limits.py): memcpy, TCP loopback, one core's AES-256-GCM, zstd-1.
Bytes are compared with the guest memory actually touched: the allocated size of the
source domain process's memfds (guest RAM and the stub's), taken just before each move.
``--check`` (ledger, smp): after each move, waits for a new self-check line on the
destination and verifies it (the ledger's sum against ledger_sum; smp: no BAD or STALL).
A move that fails with the guest still running on its source is reported and counted,
and the runs go on.
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
from migrate.host.source import DOWNTIME_PARTS, migrate_domain  # noqa: E402
from migrate.guest import check  # noqa: E402

import machine_limits  # noqa: E402  (tools/)

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
    """Wait for a self-check line past ``after_gen`` on this host; verify every sum there."""
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


def host_cpus() -> list[set[int]]:
    """This machine's CPUs in two halves, one per host (--pin)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    return [set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])]


def serve(base: Path, tls_dir: str | None, hugepages: bool = False,
          cpus: set[int] | None = None, disk: Path | None = None) -> tuple[subprocess.Popen, int]:
    """An `hvm host serve` on a free loopback port, state in ``base`` (plain TCP without
    ``tls_dir``; ``hugepages``: incoming guests on huge pages; ``cpus``: the daemon and
    every domain process it starts run on these CPUs only; ``disk``: a guest's disk image,
    which both hosts share, mapped to itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    security = (["--tls-dir", tls_dir] if tls_dir else ["--insecure"]) + (["--hugepages"] if hugepages else [])
    security += ["--disk-map", f"{disk}={disk}"] if disk else []
    proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", "host", "serve", "--listen",
                             f"127.0.0.1:{port}", *security],
                            env={**os.environ, "HVM_STATE_DIR": str(base)}, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    for _ in range(4):
        if "listening on" in proc.stderr.readline():
            return proc, port
    raise SystemExit("hvm host serve did not start")


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


MIB = 1 << 20
CONTENT = {"mixed": 0, "zero": 1, "text": 2, "random": 3}
# name: (workload, args before the content, what it is)
CASES = {
    "idle": ("idle", [], "idle guest"),
    "flat63": ("dirtier", [63 * MIB, 0], "flat-out over 63 MiB"),
    "paced63": ("dirtier", [63 * MIB, 20_000_000], "20 MB/s over 63 MiB"),
    "flat511": ("dirtier", [511 * MIB, 0], "flat-out over 511 MiB"),
    "stream": ("dirtier", [0, 4096], "1 GiB of random pages, 4 KB/s"),
}
PARTS = DOWNTIME_PARTS


def memory_sample(name: str, base: Path, limit: int = 256 * MIB) -> bytes:
    """Up to ``limit`` bytes of the largest memfd (guest RAM) of the domain's process, its
    all-zero MiB skipped: what the limits are measured on."""
    pid = int((base / name / "pid").read_text())
    best = None
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:"):
                size = os.stat(path).st_size
                if best is None or size > best[1]:
                    best = (path, size)
        except OSError:
            continue
    out = bytearray()
    with open(best[0], "rb", buffering=0) as f:
        zero = bytes(MIB)
        while len(out) < limit and (chunk := f.read(MIB)):
            if chunk != zero[:len(chunk)]:
                out += chunk
    return bytes(out)


def limits(sample: bytes) -> dict:
    out = {"memcpy": machine_limits.memcpy(sample), "memcpy into fresh memory": machine_limits.memcpy_fresh(sample),
           "TCP loopback": machine_limits.tcp_loopback(sample), "AES-256-GCM, one core": machine_limits.aes_gcm()}
    out["zstd-1"], out["zstd-1 ratio"] = machine_limits.zstd(sample)
    return out


def one_move(opts, here: int, bases, servers, tls_dir, check) -> dict:
    """Move the domain from bases[here] to the other daemon; its statistics. ControlError
    when the move failed (the message says where the guest is)."""
    there = 1 - here
    touched = touched_bytes("bench", bases[here])
    reply = migrate_domain("bench", f"127.0.0.1:{servers[there][1]}", live=not opts.offline,
                           tls_dir=None if opts.insecure else tls_dir, insecure=opts.insecure,
                           base=bases[here], channels=opts.channels, downtime_ms=opts.downtime_ms,
                           compress=None if opts.compress == "none" else opts.compress)
    control.wait_gone("bench", bases[here])
    s = reply["stats"]
    s["touched"] = touched
    s.setdefault("pause_skew", 0.0)
    rounds = s.get("rounds_detail") or [{"pages": 0, "bytes": 0, "seconds": 0.0}]
    first = rounds[0]
    s["final_pages"], s["final_bytes"] = rounds[-1]["pages"], rounds[-1]["bytes"]
    s["first_stream_rate"] = first["bytes"] / first["seconds"] if first["seconds"] else 0.0
    s["first_ram_rate"] = (first["pages"] * 4096 / first["seconds"]) if first["seconds"] else 0.0
    s["ratio"] = s["downtime"] / s["downtime_estimate"] if s.get("downtime_estimate") else None
    if check is not None:
        s["checked"] = check(bases[there])
    return s


def show_move(run: int, s: dict, check: bool) -> None:
    parts = s.get("downtime_parts", {})
    est = s.get("downtime_estimate") or 0.0
    print(f"run {run}: pause {s['downtime'] * 1e3:.2f} ms (estimate {est * 1e3:.2f} ms, "
          f"fixed part {s.get('downtime_fixed', 0.0) * 1e3:.2f}"
          + (f", {s['ratio']:.2f}x" if s["ratio"] else "") + f", {s['reason']}), total {s['seconds']:.2f} s, "
          f"{s['rounds']} rounds, final {s['final_pages']} pages; {s['bytes'] / 1e6:.1f} MB sent for "
          f"{s['touched'] / 1e6:.1f} MB touched ({s['bytes'] / s['touched']:.2f}x); round 0 "
          f"{s['first_stream_rate'] / 1e9:.2f} GB/s stream, {s['first_ram_rate'] / 1e9:.2f} GB/s RAM"
          + (f", pause skew {s['pause_skew'] * 1e3:.3f} ms" if s.get("vcpus", 1) > 1 else "")
          + (f"; self-check ok ({s['checked']})" if check else ""), flush=True)
    print("       parts (ms): " + " ".join(f"{k} {parts[k] * 1e3:.2f}" for k in PARTS if k in parts), flush=True)


def summary(label: str, results: list[dict], lim: dict, target: float) -> dict:
    def med(key):
        return statistics.median(r[key] for r in results)
    ratios = [r["ratio"] for r in results if r["ratio"]]
    missed = [r for r in results if r["downtime"] > target]
    out = {"case": label, "runs": len(results), "pause_ms": med("downtime") * 1e3,
           "pause_max_ms": max(r["downtime"] for r in results) * 1e3,
           "estimate_ms": statistics.median(r.get("downtime_estimate") or 0.0 for r in results) * 1e3,
           "ratio_max": max(ratios) if ratios else None, "reasons": sorted({r["reason"] for r in results}),
           "over_target": len(missed), "total_s": med("seconds"), "bytes_per_touched": med("bytes") / med("touched"),
           "stream_gbps": med("first_stream_rate") / 1e9, "ram_gbps": med("first_ram_rate") / 1e9,
           "parts_ms": {k: statistics.median(r["downtime_parts"].get(k, 0.0) for r in results) * 1e3 for k in PARTS}}
    print(f"{label}: median of {len(results)}: pause {out['pause_ms']:.2f} ms (max {out['pause_max_ms']:.2f}, "
          f"estimate {out['estimate_ms']:.2f}, measured/estimate max "
          + (f"{out['ratio_max']:.2f}x" if ratios else "n/a")
          + f", {out['over_target']} of {len(results)} over the {target * 1e3:.0f} ms target; "
          f"{'/'.join(out['reasons'])}); total {out['total_s']:.2f} s; sent {out['bytes_per_touched']:.2f}x touched; "
          f"round 0 {out['stream_gbps']:.2f} GB/s stream = {med('first_stream_rate') / lim['memcpy']:.2f}x memcpy, "
          f"{med('first_stream_rate') / lim['TCP loopback']:.2f}x TCP loopback", flush=True)
    print("   median parts (ms): " + " ".join(f"{k} {v:.2f}" for k, v in out["parts_ms"].items()), flush=True)
    return out


def blank_disk(root: Path, mib: int) -> Path | None:
    """The guest's disk image (``mib`` MiB of zeros; None without one), shared by both hosts."""
    if not mib:
        return None
    disk = root / "disk.img"
    disk.write_bytes(bytes(mib << 20))
    return disk


def run_case(opts, label: str, workload: str, args: list[int], root: Path, tls_dir: str,
             servers, bases) -> tuple[list[dict], list[str], bytes]:
    """``opts.runs`` moves of a new domain; the statistics of those that completed, the
    errors of those that failed with the guest still running where it was, and a sample
    of the guest's memory."""
    args = (args + [0] * 8)[:8]
    disk = blank_disk(root, opts.disk)          # each case starts from an empty disk
    control.create_domain(DomainConfig("bench", workload, opts.memory << 20, args=args, vcpus=opts.vcpus,
                                       hugepages=opts.hugepages, disk=str(disk) if disk else None), bases[0])
    results, failed, here = [], [], 0
    try:
        check = self_check(opts, workload, args, bases[0])
        if workload == "dirtier":           # its working set filled: it starts dirtying
            deadline = time.monotonic() + 120
            while "dirtier start" not in console_text("bench", bases[0]):
                if time.monotonic() > deadline:
                    raise SystemExit("the dirtier did not start")
                time.sleep(0.1)
        time.sleep(opts.settle)
        sample = memory_sample("bench", bases[0])
        for run in range(opts.runs):
            if run:
                time.sleep(opts.settle)
            try:
                s = one_move(opts, here, bases, servers, tls_dir, check)
            except control.ControlError as exc:
                if "keeps running here" not in str(exc):
                    raise
                failed.append(str(exc))         # the guest is still here: say so, go on
                print(f"run {run}: FAILED, the guest stays where it was: {exc}", flush=True)
                continue
            here = 1 - here
            results.append(s)
            if not opts.json:
                show_move(run, s, check is not None)
    finally:
        for base in bases:          # destroy_domain waits until its directory is gone: the
            for info in control.list_domains(base):         # next case reuses the name
                control.destroy_domain(info["name"], base)
    if failed:
        print(f"{len(failed)} of {opts.runs} moves failed (the guest kept running where it was)", flush=True)
    return results, failed, sample


def self_check(opts, workload: str, args: list[int], base: Path):
    """With --check: a function of a host's base that waits for the guest's next
    self-check there and verifies it (ledger, smp); None without."""
    import re
    if not opts.check:
        return None
    if workload == "ledger":
        deadline = time.monotonic() + 30
        while not (m := re.search(r"^ledger start (?:cpu=0 )?seed=\d+ pages=(\d+)",
                                  console_text("bench", base), re.M)):
            if time.monotonic() > deadline:
                raise SystemExit("the ledger did not start")
            time.sleep(0.05)
        npages, last = int(m.group(1)), [0]

        def check(where: Path) -> int:
            last[0] = ledger_check("bench", where, args[0], npages, last[0])
            return last[0]
        return check
    if workload == "smp":
        last = [smp_check("bench", base, 0)]

        def check(where: Path) -> int:
            last[0] = smp_check("bench", where, last[0])
            return last[0]
        return check
    raise SystemExit(f"--check knows ledger and smp, not {workload}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="repeatable; default: idle, flat63, paced63, flat511")
    ap.add_argument("--workload", help="a custom case: this workload with --arg values")
    ap.add_argument("--arg", type=int, action="append", default=[])
    ap.add_argument("--content", choices=sorted(CONTENT), default="mixed", help="the dirtier's pages")
    ap.add_argument("--memory", type=int, default=1024, help="MiB")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--hugepages", action="store_true",
                    help="guest RAM of 2 MiB huge pages on both hosts (the pool is raised as needed)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--insecure", action="store_true", help="plain TCP instead of TLS")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--compress", default="auto", help="auto, none, zstd[:LEVEL]")
    ap.add_argument("--downtime-ms", type=int, default=30)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to run before each move")
    ap.add_argument("--check", action="store_true", help="ledger: verify a self-check after each move")
    ap.add_argument("--disk", type=int, default=0, metavar="MIB",
                    help="give the guest a raw disk of this size (the ledger keeps a journal on it)")
    ap.add_argument("--pin", action="store_true",
                    help="two hosts of half the CPUs each: each host's daemon and domain processes "
                         "on their own CPUs (the source and the destination then do not share a core)")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    if opts.workload:
        cases = [(opts.workload, opts.workload, opts.arg)]
    else:
        names = opts.case or ["idle", "flat63", "paced63", "flat511"]
        cases = []
        for name in names:
            workload, args, _ = CASES[name]
            content = CONTENT["random" if name == "stream" else opts.content]
            cases.append((name, workload, args + [content] if workload == "dirtier" else args))
    report = {"memory_mib": opts.memory, "channels": opts.channels, "compress": opts.compress,
              "tls": not opts.insecure, "downtime_ms": opts.downtime_ms, "cases": []}
    lim = None
    with tempfile.TemporaryDirectory(prefix="hvm-bench-reloc-") as tmp:
        root = Path(tmp)
        tls.keygen(root / "pki", ["127.0.0.1"])
        tls_dir = str(root / "pki" / "127.0.0.1")
        bases = [root / "a", root / "b"]
        pool = machine_limits.HugePagePool(2 * opts.memory // 2 + 8 if opts.hugepages else 0)
        pool.__enter__()
        halves = host_cpus() if opts.pin else [None, None]
        disk = blank_disk(root, opts.disk)      # the daemons map it: it must be there
        servers = [serve(base, None if opts.insecure else tls_dir, opts.hugepages, cpus, disk)
                   for base, cpus in zip(bases, halves)]
        try:
            for label, workload, args in cases:
                if not opts.json:
                    print(f"== {label}: {workload} {args}, {opts.memory} MiB"
                          f"{' of huge pages' if opts.hugepages else ''}, {opts.channels} channels, "
                          f"{'plain TCP' if opts.insecure else 'TLS'}, compress {opts.compress}, "
                          f"target {opts.downtime_ms} ms", flush=True)
                results, failed, sample = run_case(opts, label, workload, args, root, tls_dir, servers, bases)
                if lim is None:          # measured once, on the first case's guest memory
                    lim = limits(sample if len(sample) >= 16 * MIB else os.urandom(64 * MIB))
                    report["limits"] = lim
                    if not opts.json:
                        print("machine, now: " + ", ".join(
                            f"{k} {v:.2f}x" if k.endswith("ratio") else f"{k} {machine_limits.gbps(v)}"
                            for k, v in lim.items()), flush=True)
                if results and not opts.json:
                    out = summary(label, results, lim, opts.downtime_ms / 1000)
                else:
                    out = {"case": label}
                out["moves"], out["failed"] = results, failed
                report["cases"].append(out)
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(10)
            pool.__exit__(None, None, None)
    if opts.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
