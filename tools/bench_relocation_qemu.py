"""QEMU's live migration beside ours, on this machine, in one run: the cases of
tools/bench_relocation.py (a 1 GiB guest: idle, the dirtier flat out over 63 or 511 MiB, or
paced at 20 MB/s over 63 MiB), the same guest image booted by QEMU (machine microvm, KVM, the
PVH shim of tools/bench_net_qemu.py) and moved over TCP on loopback to a second QEMU, TLS 1.3
by default, a 30 ms downtime limit, bandwidth unlimited. Blocks of QEMU's moves and ours take
turns. A one-off comparison, not a dependency of the project: it needs qemu-system-x86_64
(Debian's qemu-system-x86) and says so if it is missing.

    .venv/bin/python tools/bench_relocation_qemu.py --case idle --runs 5 --blocks 2
    .venv/bin/python tools/bench_relocation_qemu.py --case flat63 --insecure --qemu-only

The pause is measured the same way for both: from the guest stopping at the source to it
running at the destination. For QEMU that is the destination's RESUME event minus the
source's STOP event (QMP event timestamps; both processes read one host clock). QEMU's own
``downtime`` (query-migrate) counts the source's side only, from the stop to its last byte
sent, without the destination's loading and resume; it is printed too, beside ours the
``downtime`` of ``hvm migrate --json``, which runs to the destination's resume.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_net_qemu import boot_info, build_elf, qemu_command, qemu_missing, tsc_khz  # noqa: E402
from bench_relocation import CASES, CONTENT  # noqa: E402

MIB = 1 << 20


class Qmp:
    """One QMP connection: commands, and the events seen meanwhile (with their timestamps)."""

    def __init__(self, path: Path, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise SystemExit(f"no QMP socket at {path}")
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self.events: list[dict] = []
        self._read()                                # the greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise SystemExit("QEMU closed its QMP socket")
        return json.loads(line)

    def cmd(self, name: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise SystemExit(f"QMP {name}: {msg['error'].get('desc')}")
            elif "return" in msg:
                return msg["return"]

    def wait_event(self, name: str, timeout: float, **data) -> None:
        """Block until an event ``name`` whose data has ``data`` arrives."""
        deadline = time.monotonic() + timeout
        while not any(m["event"] == name and all(m.get("data", {}).get(k) == v for k, v in data.items())
                      for m in self.events):
            if time.monotonic() > deadline:
                raise SystemExit(f"no {name} {data} event within {timeout:g} s")
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)

    def event_time(self, name: str, timeout: float = 5.0) -> float:
        """Seconds (host clock) of the first ``name`` event, waiting for it if need be."""
        self.wait_event(name, timeout)
        msg = next(m for m in self.events if m["event"] == name)
        return msg["timestamp"]["seconds"] + msg["timestamp"]["microseconds"] / 1e6

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def qemu_dirs(work: Path) -> Path:
    """A QEMU x509 credentials directory (its file names) made from a fresh CA of ours."""
    from migrate.host import tls
    host, = tls.keygen(work / "pki", ["127.0.0.1"])
    out = work / "qemu-pki"
    out.mkdir()
    shutil.copy(host / tls.CA_CERT, out / "ca-cert.pem")
    for role in ("server", "client"):
        shutil.copy(host / tls.CERT, out / f"{role}-cert.pem")
        shutil.copy(host / tls.KEY, out / f"{role}-key.pem")
    return out


def qemu(elf: Path, memory_mib: int, console: Path, qmp: Path, tls_dir: Path | None, endpoint: str,
         incoming: bool, hold: bool = False) -> subprocess.Popen:
    cmd = qemu_command(elf, memory_mib, console) + ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if tls_dir is not None:
        cmd += ["-object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint={endpoint},verify-peer=on"]
    if incoming:
        cmd += ["-incoming", "defer"] + (["-S"] if hold else [])
    with open(console.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_move(work: Path, elf: Path, opts, tls_dir: Path | None, run: int, started: str) -> dict:
    """Boot the guest on a QEMU, let it run, move it to a second QEMU; the move's figures."""
    src_console, dst_console = work / f"src{run}.txt", work / f"dst{run}.txt"
    src_qmp, dst_qmp = work / f"src{run}.qmp", work / f"dst{run}.qmp"
    procs = [qemu(elf, opts.memory, src_console, src_qmp, tls_dir, "client", False),
             qemu(elf, opts.memory, dst_console, dst_qmp, tls_dir, "server", True, opts.handoff == "confirm")]
    src = dst = None
    try:
        deadline = time.monotonic() + 120
        while not re.search(started, src_console.read_text(errors="replace") if src_console.exists() else "",
                            re.MULTILINE):
            for p, console in zip(procs, (src_console, dst_console)):
                if p.poll() is not None:
                    raise SystemExit(f"QEMU exited: {console.with_suffix('.err').read_text().strip()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the guest did not start on QEMU within 120 s ({started!r} not seen)")
            time.sleep(0.05)
        src, dst = Qmp(src_qmp), Qmp(dst_qmp)
        port = free_port()
        if tls_dir is not None:
            dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        if opts.handoff == "confirm":
            dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        params = {"downtime-limit": opts.downtime_ms, "max-bandwidth": 1 << 40}
        if tls_dir is not None:
            params.update({"tls-creds": "tls0", "tls-hostname": "127.0.0.1"})
        src.cmd("migrate-set-parameters", **params)
        time.sleep(opts.settle)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if opts.handoff == "confirm":       # as a management layer would: start it once loaded
            dst.wait_event("MIGRATION", 120, status="completed")
            dst.cmd("cont")
        deadline = time.monotonic() + 120
        while True:
            info = src.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise SystemExit("QEMU's migration did not end within 120 s")
            time.sleep(0.01)
        if info["status"] != "completed":
            raise SystemExit(f"QEMU's migration {info['status']}: {info.get('error-desc', '')}")
        stop = src.event_time("STOP")
        resume = dst.event_time("RESUME")       # it follows completion at the destination
        status = dst.cmd("query-status")
        if status.get("status") != "running":
            raise SystemExit(f"the guest is {status.get('status')} at QEMU's destination")
        ram = info.get("ram", {})
        return {"pause": resume - stop, "downtime": info.get("downtime", 0) / 1e3,
                "seconds": info.get("total-time", 0) / 1e3, "bytes": ram.get("transferred", 0),
                "rounds": ram.get("dirty-sync-count", 0)}
    finally:
        for q in (src, dst):
            if q is not None:
                q.close()
        for p in procs:
            p.kill()
            p.wait()


def ours(case: str, opts) -> list[dict]:
    """The same case moved by hvm-migrate (tools/bench_relocation.py --json)."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_relocation.py"), "--case", case, "--runs", str(opts.runs),
           "--content", opts.content, "--memory", str(opts.memory), "--downtime-ms", str(opts.downtime_ms),
           "--settle", str(opts.settle), "--json"] + (["--insecure"] if opts.insecure else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_relocation.py failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    report = json.loads(out.stdout[out.stdout.index("{"):])
    return [{"pause": m["downtime"], "downtime": m["downtime"], "seconds": m["seconds"], "bytes": m["bytes"],
             "rounds": m["rounds"]} for m in report["cases"][0]["moves"]]


def summary(label: str, moves: list[dict]) -> str:
    pauses = sorted(m["pause"] * 1e3 for m in moves)
    return (f"{label}: pause median {statistics.median(pauses):.2f} ms (min {pauses[0]:.2f}, max {pauses[-1]:.2f}) "
            f"over {len(moves)}; own downtime figure median {statistics.median(m['downtime'] for m in moves) * 1e3:.2f} ms; "
            f"total {statistics.median(m['seconds'] for m in moves):.2f} s; "
            f"sent {statistics.median(m['bytes'] for m in moves) / MIB:.0f} MiB "
            f"({statistics.median([m['bytes'] / m['seconds'] for m in moves if m['seconds']] or [0]) / 1e9:.2f} "
            f"GB/s over the move); "
            f"rounds {statistics.median(m['rounds'] for m in moves):.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=[c for c in CASES if c != "stream"],
                    help="repeatable; default: idle, flat63, paced63, flat511")
    ap.add_argument("--runs", type=int, default=5, help="moves per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of each side, taking turns")
    ap.add_argument("--memory", type=int, default=1024, help="MiB")
    ap.add_argument("--content", choices=sorted(CONTENT), default="mixed", help="the dirtier's pages")
    ap.add_argument("--downtime-ms", type=int, default=30)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds the guest runs before each move")
    ap.add_argument("--insecure", action="store_true", help="plain TCP instead of TLS, both sides")
    ap.add_argument("--qemu-only", action="store_true", help="do not run ours")
    ap.add_argument("--handoff", choices=("none", "confirm"), default="none",
                    help="QEMU's destination starts by itself once loaded (none, QEMU's default), or "
                         "paused (-S) and is started with 'cont' on its MIGRATION completed event (confirm)")
    opts = ap.parse_args()
    if qemu_missing():
        return 1
    khz = tsc_khz()
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True).stdout.split("\n")[0]
    print(f"{version}, handoff {opts.handoff}; {opts.memory} MiB guest, {'plain TCP' if opts.insecure else 'TLS 1.3'}, "
          f"downtime limit {opts.downtime_ms} ms, {opts.runs} moves per block, {opts.blocks} blocks a side", flush=True)
    with tempfile.TemporaryDirectory(prefix="hvm-qemu-reloc-") as tmp:
        work = Path(tmp)
        tls_dir = None if opts.insecure else qemu_dirs(work)
        for case in opts.case or ["idle", "flat63", "paced63", "flat511"]:
            workload, args, what = CASES[case]
            if workload == "dirtier":
                args = args + [CONTENT[opts.content]]
            elf = build_elf(work, boot_info(workload, opts.memory * MIB, khz, args), f"{case}-pvh.elf")
            started = rf"^{workload} start"          # idle and dirtier say so when they start
            print(f"== {case}: {what}", flush=True)
            sides: dict[str, list[dict]] = {"QEMU": [], "hvm-migrate": []}
            for block in range(opts.blocks):
                moves = [qemu_move(work, elf, opts, tls_dir, block * opts.runs + i, started)
                         for i in range(opts.runs)]
                sides["QEMU"] += moves
                print("   QEMU block:", " ".join(f"{m['pause'] * 1e3:.2f}" for m in moves), "ms", flush=True)
                if not opts.qemu_only:
                    moves = ours(case, opts)
                    sides["hvm-migrate"] += moves
                    print("   hvm-migrate block:", " ".join(f"{m['pause'] * 1e3:.2f}" for m in moves), "ms",
                          flush=True)
            for label, moves in sides.items():
                if moves:
                    print("  " + summary(label, moves), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
