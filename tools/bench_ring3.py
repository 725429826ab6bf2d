"""Ring-3 speed: the ledger loop in a KVM guest vs the same C loop on the host.

The loop (ledger_bench in migrate/guest/src/ledger_pattern.h) is compiled
into the guest image and into the host extension with the same gcc flags.
The guest times itself with the TSC; the host with perf_counter_ns.  Both
must print the same sum (they did the same work).  Prints the ratio: near
1.0 means ring 3 runs at native speed.

    .venv/bin/python tools/bench_ring3.py [--pages 1024] [--rounds 100] [--repeat 3]
"""
import argparse
import re
import statistics
import time

from migrate.domain import Domain, DomainConfig
from migrate.guest._check import ffi, lib


def guest_run(pages: int, rounds: int) -> tuple[float, int, int]:
    dom = Domain.boot(DomainConfig("bench", "bench", 64 << 20, args=[pages, rounds], timer_hz=0))
    try:
        tsc_khz = dom.vcpu.get_tsc_khz()
        dom.resume()
        m = dom.console.wait_for(r"bench pages=\d+ rounds=\d+ cycles=(\d+) sum=([0-9a-f]+)", 120)
        return int(m.group(1)) / (tsc_khz * 1000), int(m.group(2), 16), tsc_khz
    finally:
        dom.destroy()


def host_run(pages: int, rounds: int) -> tuple[float, int]:
    buf = ffi.new("uint64_t[]", pages * 512)
    lib.ledger_bench(buf, pages, 1)                 # first touch off the clock
    t0 = time.perf_counter_ns()
    total = lib.ledger_bench(buf, pages, rounds)
    return (time.perf_counter_ns() - t0) / 1e9, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    nbytes = args.pages * 4096 * args.rounds * 2    # written once, read once per round
    ratios = []
    for i in range(args.repeat):
        g, gsum, khz = guest_run(args.pages, args.rounds)
        h, hsum = host_run(args.pages, args.rounds)
        if gsum != hsum:
            raise SystemExit(f"sums differ: guest {gsum:#x} host {hsum:#x}: not the same work")
        ratios.append(g / h)
        print(f"run {i + 1}: guest ring 3 {g * 1e3:8.1f} ms ({nbytes / g / 1e9:5.2f} GB/s)   "
              f"host {h * 1e3:8.1f} ms ({nbytes / h / 1e9:5.2f} GB/s)   guest/host {g / h:5.3f}")
    print(f"loop: ledger fill+verify, {args.pages} pages x {args.rounds} rounds; TSC {khz} kHz")
    print(f"median guest/host time ratio: {statistics.median(ratios):.3f} "
          f"(1.0 = native speed; above 1 = slower in the guest)")


if __name__ == "__main__":
    main()
