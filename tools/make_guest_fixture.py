"""Record a real guest's stream as a test fixture: a 16 MiB guest with its stub, saved
with zstd at level 19 once its console shows it is under way. The files are checked in
(tests/fixtures/) so later builds prove they still restore a stream this version wrote,
on whichever host they run; regenerate only on a format change, and name the file after
the format version, the CPU model and the vendor of the host that wrote it.

    .venv/bin/python tools/make_guest_fixture.py tests/fixtures/idle-v2-baseline-amd.hvm
    .venv/bin/python tools/make_guest_fixture.py tests/fixtures/ledger-v2-baseline-amd.hvm \\
        --workload ledger --arg 7 --arg 16
"""
import argparse

from migrate.domain import Domain, DomainConfig
from migrate.engine import save_to_file

READY = {"idle": r"^idle ticks=100$", "ledger": r"ledger ok gen=3 "}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--workload", choices=sorted(READY), default="idle")
    parser.add_argument("--arg", type=int, action="append", default=[])
    parser.add_argument("--cpu", default="baseline")
    opts = parser.parse_args()
    dom = Domain.boot(DomainConfig("golden", opts.workload, 16 << 20, cpu=opts.cpu,
                                   args=opts.arg + [0] * (8 - len(opts.arg))))
    try:
        dom.resume()
        dom.console.wait_for(READY[opts.workload], 20)
        stats = save_to_file(dom, opts.path, compress=19)
        print(f"wrote {opts.path}: {stats.stream_bytes} bytes, {stats.pages_sent} pages of data")
    finally:
        dom.destroy()


if __name__ == "__main__":
    main()
