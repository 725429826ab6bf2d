"""Relocation on loopback: one domain moved back and forth between two host daemons
(in-process, each with its own state directory, TLS 1.3 with a fresh CA), printing total
time, downtime and its parts, bytes and rounds per relocation, then medians.

    .venv/bin/python tools/bench_relocation.py --workload idle --memory 64 --runs 5
    .venv/bin/python tools/bench_relocation.py --workload ledger --memory 256 --runs 5 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.domain import DomainConfig  # noqa: E402
from migrate.host import control, relocd, tls  # noqa: E402
from migrate.host.relocate import migrate_domain  # noqa: E402

KEYS = ("seconds", "setup", "downtime", "downtime_final", "downtime_restore", "downtime_resume")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="idle")
    ap.add_argument("--memory", type=int, default=64, help="MiB")
    ap.add_argument("--arg", type=int, action="append", default=[])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to run before each move")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hvm-bench-reloc-") as tmp:
        root = Path(tmp)
        tls.keygen(root / "pki", ["127.0.0.1"])
        tls_dir = str(root / "pki" / "127.0.0.1")
        bases = [root / "a", root / "b"]
        servers = []
        for base in bases:
            server = relocd.RelocationServer(relocd.ServeConfig("127.0.0.1", 0, tls_dir, {}, base))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        args = opts.arg + [0] * (8 - len(opts.arg))
        control.create_domain(DomainConfig("bench", opts.workload, opts.memory << 20, args=args),
                              bases[0])
        results = []
        try:
            for run in range(opts.runs):
                here, there = run % 2, 1 - run % 2
                time.sleep(opts.settle)
                reply = migrate_domain("bench", f"127.0.0.1:{servers[there].address[1]}",
                                       live=not opts.offline, tls_dir=tls_dir, base=bases[here])
                control.wait_gone("bench", bases[here])
                s = reply["stats"]
                results.append(s)
                if not opts.json:
                    print(f"run {run}: total {s['seconds'] * 1e3:.1f} ms, downtime {s['downtime'] * 1e3:.2f} ms "
                          f"(final {s['downtime_final'] * 1e3:.2f} + restore {s['downtime_restore'] * 1e3:.2f}"
                          f" + resume {s['downtime_resume'] * 1e3:.2f}), setup {s['setup'] * 1e3:.1f} ms, "
                          f"{s['bytes'] / 1e6:.2f} MB, {s['rounds']} rounds")
        finally:
            for base in bases:
                for info in control.list_domains(base):
                    with control.DomainClient(info["name"], base) as c:
                        c.call("destroy")
            for server in servers:
                server.stop()
    med = {k: statistics.median(r[k] for r in results) for k in KEYS}
    med["bytes"] = statistics.median(r["bytes"] for r in results)
    if opts.json:
        print(json.dumps({"workload": opts.workload, "memory_mib": opts.memory, "runs": results,
                          "median": med}))
    else:
        print(f"median of {len(results)}: total {med['seconds'] * 1e3:.1f} ms, downtime "
              f"{med['downtime'] * 1e3:.2f} ms (final {med['downtime_final'] * 1e3:.2f} + restore "
              f"{med['downtime_restore'] * 1e3:.2f} + resume {med['downtime_resume'] * 1e3:.2f}), "
              f"{med['bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
