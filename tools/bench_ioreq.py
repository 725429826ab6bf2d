"""I/O round trip: a guest port read served by the device-model stub (guest
exit -> ioreq -> stub VM -> doorbell -> back), beside the bare KVM exit cost
on this machine (completed in the host's C run loop) and a read answered by
the host's Python without the stub.  Times from the guest's TSC.

    .venv/bin/python tools/bench_ioreq.py [--n 2000] [--repeat 3]
"""
import argparse
import statistics

from migrate.domain import Domain, DomainConfig


def run(n: int) -> tuple[float, float, float]:
    dom = Domain.boot(DomainConfig("iobench", "iobench", 16 << 20, args=[n], timer_hz=0))
    try:
        khz = dom.vcpu.get_tsc_khz()
        dom.resume()
        m = dom.console.wait_for(r"iobench n=\d+ null=(\d+) host=(\d+) stub=(\d+)", 120)
        return tuple(int(m.group(i)) / khz * 1000 for i in (1, 2, 3))   # microseconds
    finally:
        dom.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    results = [run(args.n) for _ in range(args.repeat)]
    for i, (null, host, stub) in enumerate(results, 1):
        print(f"run {i}: bare KVM exit {null:7.1f} us   host Python {host:7.1f} us   "
              f"stub ioreq {stub:7.1f} us")
    null, host, stub = (statistics.median(r[k] for r in results) for k in range(3))
    print(f"median of {args.repeat} x {args.n} reads: bare exit {null:.1f} us, host Python {host:.1f} us, "
          f"stub round trip {stub:.1f} us = {stub / null:.1f}x the bare exit")


if __name__ == "__main__":
    main()
