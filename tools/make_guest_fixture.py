"""Record a real guest's stream as a test fixture: a 16 MiB `idle` guest with
its stub, saved with zstd after its first 100 timer ticks.  The file is
checked in (tests/fixtures/idle-v1.hvm) so later builds prove they still
restore a stream this version wrote; regenerate only on a format change.

    .venv/bin/python tools/make_guest_fixture.py tests/fixtures/idle-v1.hvm
"""
import sys

from migrate.domain import Domain, DomainConfig
from migrate.engine import save_to_file


def main(path: str) -> None:
    dom = Domain.boot(DomainConfig("golden", "idle", 16 << 20))
    try:
        dom.resume()
        dom.console.wait_for(r"^idle ticks=100$", 10)
        stats = save_to_file(dom, path, compress=19)
        print(f"wrote {path}: {stats.stream_bytes} bytes, {stats.pages_sent} pages of data")
    finally:
        dom.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
