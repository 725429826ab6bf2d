#!/usr/bin/env python3
"""Write the golden version-2 stream fixture (specs/stream-format.md, section "Example").

Usage: python tools/make_golden_stream.py [OUTPUT]
(default: tests/stream/fixtures/golden-v2.hvmstream). The bytes depend only on the code
and on libzstd's output at level 3; tests/stream/test_golden.py requires that re-encoding
the fixture's records reproduces it byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrate.stream.sample import sample_stream  # noqa: E402

DEFAULT = ROOT / "tests" / "stream" / "fixtures" / "golden-v2.hvmstream"


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else DEFAULT
    data = sample_stream()
    target.write_bytes(data)
    print(f"wrote {len(data)} bytes to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
