"""Soak of real guest shapes (issue 14): guests with several vCPUs, and RAM above the 32-bit
MMIO hole, saved and restored N times and moved N times, every self-check ok.

    .venv/bin/python tools/soak_smp.py                      # smp 4, smp 8, ledger 8 GiB: 20 + 20 each
    .venv/bin/python tools/soak_smp.py --cycles 5 --moves 5 --only smp4

Scenarios: ``smp4`` and ``smp8`` (the smp workload: tokens passed around a ring of vCPUs
with locked instructions and IPIs, each round checked by the guest: no token lost, skipped
or repeated, the sums of what was sent and received equal, every vCPU's token interrupts
matching the IPIs sent to it); ``ledger8g`` (an 8 GiB guest whose RAM above 4 GiB holds a
ledger per vCPU, each checking its own pages every pass).

Save/restore cycles run in this process: a live save to a file, the domain destroyed, a
restore, then the host checks the restored memory before the guest runs again: it must be
byte for byte what the source held when it stopped (the smp memory, or every ledger's
header and pages), and every ledger must pass the host's check of its pages; then the guest
must make progress (two more smp rounds; a new ledger pass on every vCPU, with the sums
printed equal to the host's computation) with no BAD, STALL or CORRUPT line.

Moves run between two `hvm host serve` daemons on loopback (TLS, data channels), back and
forth; after each, the same progress checks on the destination's console, and at the end a
checkpoint of the moved guest is restored here and its ledgers checked by the host.

Prints per scenario: cycles and moves done, the downtime and pause skew of each kind
(median and max), stream bytes, and every check passed; exits 1 at the first failure.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.domain import Domain, DomainConfig  # noqa: E402
from migrate.engine import file_chunks, restore, save_to_file  # noqa: E402
from migrate.guest import boot as gboot  # noqa: E402
from migrate.guest import check  # noqa: E402
from migrate.host import control, tls  # noqa: E402
from migrate.host.source import migrate_domain  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_relocation import console_text, serve  # noqa: E402

GIB = 1 << 30
BAD = re.compile(r"^(smp (BAD|STALL)|ledger (CORRUPT|JOURNAL BAD)|PANIC)", re.MULTILINE)


@dataclass
class Scenario:
    name: str
    workload: str
    memory: int
    vcpus: int
    args: list[int] = field(default_factory=list)


SCENARIOS = {
    "smp4": Scenario("smp4", "smp", 64 << 20, 4),
    "smp8": Scenario("smp8", "smp", 64 << 20, 8),
    "ledger8g": Scenario("ledger8g", "ledger", 8 * GIB, 2, [41, 4096]),     # 16 MiB of pages per vCPU
}


class Failed(Exception):
    pass


# -- what the guest prints ------------------------------------------------------------------

def progress_marks(text: str, sc: Scenario) -> dict:
    """Where the guest is, from its console text: the last smp round, or each vCPU's last
    ledger generation (with every printed sum checked against the host's)."""
    bad = BAD.search(text)
    if bad:
        raise Failed(f"{sc.name}: {text[bad.start():bad.start() + 300]}")
    if sc.workload == "smp":
        rounds = [int(r) for r in re.findall(r"^smp ok round=(\d+) ", text, re.MULTILINE)]
        return {"round": rounds[-1] if rounds else 0}
    out = {}
    pages = {int(k or 0): int(n) for k, n in
             re.findall(r"^ledger start (?:cpu=(\d+) )?seed=\d+ pages=(\d+) ", text, re.MULTILINE)}
    for cpu, gen, total in re.findall(r"^ledger ok (?:cpu=(\d+) )?gen=(\d+) sum=([0-9a-f]{16}) ",
                                      text, re.MULTILINE):
        cpu, gen = int(cpu or 0), int(gen)
        out[cpu] = max(out.get(cpu, -1), gen)
        if cpu in pages and (cpu, gen, total) not in _SUMS_CHECKED:
            if int(total, 16) != check.ledger_sum(sc.args[0] + cpu, gen, pages[cpu]):
                raise Failed(f"{sc.name}: vCPU {cpu} printed sum {total} for gen {gen}, not the host's")
            _SUMS_CHECKED.add((cpu, gen, total))
    return out


_SUMS_CHECKED: set = set()         # (vCPU, gen, sum) already computed here


def progressed(before: dict, after: dict, sc: Scenario) -> bool:
    if sc.workload == "smp":
        return after.get("round", 0) >= before.get("round", 0) + 2
    return len(after) == sc.vcpus and all(after[k] > before.get(k, -1) for k in range(sc.vcpus))


def wait_progress(read_text, before: dict, sc: Scenario, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = progress_marks(read_text(), sc)
        if progressed(before, now, sc):
            return now
        if time.monotonic() > deadline:
            raise Failed(f"{sc.name}: no progress in {timeout:g}s from {before} (now {now})")
        time.sleep(0.1)


# -- the host's look at guest memory --------------------------------------------------------

def workload_bytes(dom, sc: Scenario) -> list[bytes]:
    """The memory the guest's self-checks live in: the smp header, tokens and queues, or
    each vCPU's ledger header and pages (what it touched, not its whole slice)."""
    base, _ = gboot.workload_region(gboot.ram_layout(sc.memory))
    if sc.workload == "smp":
        spans = [(base, (2 + sc.vcpus) * 4096)]
    else:
        spans = []
        for address, _ in check.ledger_region_bounds(sc.memory, sc.vcpus):
            head = dom.guest_view(address, 72)
            npages = check.LedgerHeader(*check._LEDGER_HEADER.unpack_from(head)).npages
            head.release()
            spans.append((address, (1 + npages) * 4096))
    out = []
    for address, size in spans:
        view = dom.guest_view(address, size)
        out.append(bytes(view))
        view.release()
    return out


def host_check(dom, sc: Scenario) -> None:
    if sc.workload == "ledger":
        results = check.verify_ledgers(dom)
        if any(bad != -1 for bad, _ in results):
            raise Failed(f"{sc.name}: the host's check of the ledgers: {results}")


# -- save/restore cycles --------------------------------------------------------------------

def cycles(sc: Scenario, n: int, tmp: Path) -> list[dict]:
    dom = Domain.boot(DomainConfig(sc.name, sc.workload, sc.memory, vcpus=sc.vcpus,
                                   args=sc.args + [0] * (8 - len(sc.args))))
    done = []
    try:
        dom.resume()
        marks = wait_progress(lambda: "\n".join(dom.console.lines()), {}, sc)
        for i in range(n):
            path = tmp / f"{sc.name}.hvm"
            stats = save_to_file(dom, path, live=True)
            at_pause = workload_bytes(dom, sc)
            host_check(dom, sc)
            dom.destroy()
            dom, rstats = restore(file_chunks(path))
            if workload_bytes(dom, sc) != at_pause:
                raise Failed(f"{sc.name}: cycle {i}: restored memory differs from the source's at its pause")
            host_check(dom, sc)
            mark = dom.console.next_index
            dom.resume()
            marks = wait_progress(lambda: "\n".join(dom.console.lines(mark)), marks, sc)
            done.append({"downtime": stats.downtime, "pause_skew": stats.pause_skew,
                         "bytes": stats.stream_bytes, "restore": rstats.seconds})
            print(f"  cycle {i + 1}/{n}: ok ({stats.stream_bytes / 1e6:.1f} MB, downtime "
                  f"{stats.downtime * 1e3:.1f} ms, pause skew {stats.pause_skew * 1e3:.3f} ms, "
                  f"restore {rstats.seconds * 1e3:.0f} ms; {marks})", flush=True)
    finally:
        dom.destroy()
    return done


# -- relocations ----------------------------------------------------------------------------

def moves(sc: Scenario, n: int, tmp: Path) -> list[dict]:
    tls.keygen(tmp / "pki", ["127.0.0.1"])
    tls_dir = str(tmp / "pki" / "127.0.0.1")
    bases = [tmp / "a", tmp / "b"]
    servers = [serve(base, tls_dir) for base in bases]
    done = []
    try:
        control.create_domain(DomainConfig(sc.name, sc.workload, sc.memory, vcpus=sc.vcpus,
                                           args=sc.args + [0] * (8 - len(sc.args))), bases[0])
        marks = wait_progress(lambda: console_text(sc.name, bases[0]), {}, sc)
        for i in range(n):
            here, there = i % 2, 1 - i % 2
            reply = migrate_domain(sc.name, f"127.0.0.1:{servers[there][1]}", tls_dir=tls_dir, base=bases[here])
            control.wait_gone(sc.name, bases[here])
            s = reply["stats"]
            marks = wait_progress(lambda: console_text(sc.name, bases[there]), marks, sc)
            done.append({"downtime": s["downtime"], "pause_skew": s["pause_skew"], "bytes": s["bytes"]})
            print(f"  move {i + 1}/{n}: ok ({s['bytes'] / 1e6:.1f} MB, downtime {s['downtime'] * 1e3:.1f} ms, "
                  f"pause skew {s['pause_skew'] * 1e3:.3f} ms; {marks})", flush=True)
        at = bases[n % 2]
        path = tmp / f"{sc.name}-moved.hvm"
        control.save_domain(sc.name, path, mode="checkpoint", base=at)
        dom, _ = restore(file_chunks(path), name=f"{sc.name}-check")
        try:
            host_check(dom, sc)
        finally:
            dom.destroy()
        marks = wait_progress(lambda: console_text(sc.name, at), marks, sc)
    finally:
        for base in bases:
            for info in control.list_domains(base):
                with control.DomainClient(info["name"], base) as c:
                    c.call("destroy")
        for proc, _ in servers:
            proc.terminate()
            proc.wait(10)
    return done


def summary(kind: str, runs: list[dict]) -> str:
    if not runs:
        return f"{kind}: none"
    down = [r["downtime"] * 1e3 for r in runs]
    skew = [r["pause_skew"] * 1e3 for r in runs]
    return (f"{kind}: {len(runs)}, every check ok; downtime median {statistics.median(down):.1f} ms "
            f"(max {max(down):.1f}), pause skew median {statistics.median(skew):.3f} ms (max {max(skew):.3f}), "
            f"{statistics.median(r['bytes'] for r in runs) / 1e6:.1f} MB each")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20, help="save/restore cycles per scenario")
    ap.add_argument("--moves", type=int, default=20, help="relocations per scenario")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="scenario (repeatable)")
    opts = ap.parse_args()
    lines = []
    for name in opts.only or list(SCENARIOS):
        sc = SCENARIOS[name]
        print(f"== {sc.name}: {sc.workload}, {sc.vcpus} vCPUs, {sc.memory >> 20} MiB", flush=True)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"hvm-soak-{name}-") as tmp:
            try:
                saved = cycles(sc, opts.cycles, Path(tmp))
                moved = moves(sc, opts.moves, Path(tmp))
            except Failed as exc:
                print(f"FAIL: {exc}")
                return 1
        lines.append(f"{sc.name} ({sc.workload}, {sc.vcpus} vCPUs, {sc.memory >> 20} MiB, "
                     f"{time.monotonic() - t0:.0f} s): " + summary("save/restore cycles", saved) + "; "
                     + summary("moves", moved))
        print(lines[-1], flush=True)
    print("\n".join(["", "summary:"] + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
