"""Fault injection: relocations and saves of a ledger guest with a disk, each trial with
one fault at a random point (chosen by the seed, which is printed), and the host checked
after every trial.

    .venv/bin/python tools/chaos.py --trials 200 [--seed N] [--memory 32] [--json]

Two `hvm host serve` daemons on loopback (TLS, each its own state directory, the disk
image mapped on both) move one ledger guest back and forth with `hvm migrate` (a real
CLI process), through a TCP relay that can cut the link; saves go to a small tmpfs
(`--checkpoint`, or a stop-and-copy save followed by `hvm restore`). Faults, one per
trial, in a seeded rotation: none; kill -9 of the source domain process, the source
CLI, the destination daemon (restarted afterwards) or the receiving domain process; the
link cut; the save's disk filled (all but a random part of the stream's size taken).
A fault lands at a random time into the operation, or (relocations) a random few
milliseconds after the destination's copy appeared (the handoff: RESTORED, GO, RUNNING).

After each trial, from the host (what an operator sees):
- exactly one copy of the guest runs; or, after exit status 3 ("outcome unknown"), one
  copy is paused here, the message said so, and doing what it says (destroy here if it
  runs there, else unpause here) leaves exactly one running; a guest may be lost only
  when its own last domain process was the one killed, and then it is listed as crashed
  there with its console and process logs kept;
- the exit status matches where the guest is (0: moved or saved; 1: where it was);
- the ledger's self-check goes on: a new `ledger ok` line whose sum is ledger_sum's,
  journal ok, nothing CORRUPT;
- the disk image's writer lock is held by the running copy's process, and by nothing
  else; no relocation is being received into it;
- no stray domain processes or state directories, no `.partial` files.
Exit status 1 if any trial broke a rule (each violation is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.guest import check  # noqa: E402
from migrate.host import control, learned, tls  # noqa: E402
from migrate.locks import INCOMING, WRITER, holders  # noqa: E402

NAME = "chaos"
RESUME_TIMEOUT = 4.0          # the daemons' receiving domains give up on GO after this
MIGRATE_FAULTS = ["none", "kill-source-domain", "kill-source-cli", "kill-daemon",
                  "kill-receiving-domain", "cut-link"]
SAVE_FAULTS = ["none", "kill-domain", "kill-cli", "fill-disk"]
HVM = [sys.executable, "-m", "migrate.cli"]


class Violation(Exception):
    pass


class Relay:
    """A TCP relay to a daemon that can cut every connection through it at once."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.was_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                a.close()
                continue
            with self.lock:
                self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """One direction; an end with an error (a peer killed) breaks both, as a real
        connection to a dead peer would (a reset), instead of leaving the other side
        sending into a relay that no longer reads."""
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            socks, self.socks = self.socks, []
            self.was_cut = self.was_cut or bool(socks)
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")   # RST
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Host:
    """One side: a state directory and its `hvm host serve` (restartable)."""

    def __init__(self, label: str, root: Path, tls_dir: str, disk: Path):
        self.label, self.base, self.tls_dir, self.disk = label, root / label, tls_dir, disk
        self.proc: subprocess.Popen | None = None
        self.logged = 0                 # bytes of its log before its last start
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.start()

    def env(self) -> dict:
        return {**os.environ, "HVM_STATE_DIR": str(self.base), "HVM_TLS_DIR": self.tls_dir}

    def start(self) -> None:
        code = (f"import sys, migrate.host.destination as r; r.RESUME_TIMEOUT = {RESUME_TIMEOUT}; "
                "from migrate.cli import hvm; hvm(sys.argv[1:])")
        log = open(self.base.parent / f"daemon-{self.label}.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "host", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--disk-map", f"{self.disk}={self.disk}"],
            env=self.env(), stdout=subprocess.DEVNULL, stderr=log, text=True)
        log.close()
        deadline = time.monotonic() + 30
        while "listening on" not in (self.base.parent / f"daemon-{self.label}.log").read_text()[self.logged:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"chaos: hvm host serve ({self.label}) did not start")
            time.sleep(0.05)
        self.logged = (self.base.parent / f"daemon-{self.label}.log").stat().st_size

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def hvm(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(HVM + list(args), env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def domains(self) -> dict:
        return {d["name"]: d for d in control.list_domains(self.base)}

    def pid(self, name: str = NAME) -> int | None:
        try:
            return int((self.base / name / "pid").read_text())
        except (OSError, ValueError):
            return None

    def console(self) -> str:
        with control.DomainClient(NAME, self.base) as c:
            return c.console_text()


class Chaos:
    def __init__(self, root: Path, seed: int, memory: int, save_dir: Path | None):
        self.root, self.memory, self.save_dir = root, memory, save_dir
        self.rng = random.Random(seed)
        tls.keygen(root / "pki", ["127.0.0.1"])
        tls_dir = str(root / "pki" / "127.0.0.1")
        self.disk = root / "disk.img"
        self.disk.write_bytes(bytes(4 << 20))
        self.hosts = [Host("a", root, tls_dir, self.disk), Host("b", root, tls_dir, self.disk)]
        self.here = 0                      # index of the host the guest is on
        self.durations = {"migrate": [], "save": []}
        self.tally: Counter = Counter()        # operations
        self.faults: Counter = Counter()       # faults by kind
        self.struck: Counter = Counter()       # ... that struck before the operation ended
        self.exits: Counter = Counter()        # exit statuses of the operations
        self.lost = 0
        self.unknown = 0
        self.stream_size = memory << 20         # a save's file size, once one is seen
        self.violations: list[str] = []
        self.new_guest()

    # -- the guest -----------------------------------------------------------------------
    def new_guest(self) -> None:
        self.seed = self.rng.randrange(1, 1 << 30)
        host = self.hosts[self.here]
        out = host.hvm("create", "-w", "ledger", "-m", f"{self.memory}M", "-n", NAME, "--arg", str(self.seed),
                       "--disk", str(self.disk))
        if out.returncode:
            raise Violation(f"create failed: {out.stderr.strip()}")
        m = self.wait_console(host, rf"^ledger start seed={self.seed} pages=(\d+) ")
        self.npages = int(m.group(1))
        self.gen = 0
        self.ledger_goes_on(host)

    def wait_console(self, host: Host, pattern: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            try:
                text = host.console()
            except control.ControlError:
                text = ""
            if "CORRUPT" in text or "JOURNAL BAD" in text:
                raise Violation(f"ledger on {host.label}: {text.strip().splitlines()[-1]}")
            m = re.search(pattern, text, re.MULTILINE)
            if m:
                return m
            time.sleep(0.05)
        raise Violation(f"no {pattern!r} on {host.label} within {timeout:g}s: {text[-300:]!r}")

    def ledger_goes_on(self, host: Host) -> None:
        """A new self-check line on ``host``, its sum ledger_sum's, journal ok."""
        deadline = time.monotonic() + 30
        while True:
            m = self.wait_console(host, r"^ledger ok gen=(\d+) sum=([0-9a-f]{16}) .*journal=(\w+)$",
                                  max(1.0, deadline - time.monotonic()))
            lines = re.findall(r"^ledger ok gen=(\d+) sum=([0-9a-f]{16}) .*journal=(\w+)$", host.console(),
                               re.MULTILINE)
            for gen, total, journal in lines:
                if int(total, 16) != check.ledger_sum(self.seed, int(gen), self.npages):
                    raise Violation(f"ledger sum wrong at gen {gen} on {host.label}")
                if journal != "ok":
                    raise Violation(f"ledger journal={journal} at gen {gen} on {host.label}")
            if m and int(lines[-1][0]) > self.gen:
                self.gen = int(lines[-1][0])
                return
            if time.monotonic() > deadline:
                raise Violation(f"the ledger on {host.label} made no progress past gen {self.gen}")
            time.sleep(0.1)

    # -- one trial ---------------------------------------------------------------------------
    def trial(self, fault: str, op: str) -> str:
        """One operation (``migrate``; ``save``: --checkpoint; ``save-stop``: stop-and-copy,
        then restore) with one fault; its line for the log. Violation if a rule broke."""
        src, dst = self.hosts[self.here], self.hosts[1 - self.here]
        handoff = op == "migrate" and fault != "none" and self.rng.random() < 0.5
        kind = "migrate" if op == "migrate" else "save"
        typical = statistics.median(self.durations[kind]) if self.durations[kind] else 1.0
        delay = self.rng.uniform(0.0, 0.03) if handoff else self.rng.uniform(0.0, 1.1 * typical)
        where = f"handoff+{delay * 1000:.0f}ms" if handoff else f"{delay * 1000:.0f}ms"
        relay = Relay(dst.port) if op == "migrate" else None
        filler = target = None
        if op == "migrate":
            # the ledger rewrites all its memory all the time: give it a target it can meet
            # on a loaded machine (convergence is not what this tool tries)
            args = ["migrate", NAME, f"127.0.0.1:{relay.port}", "--downtime-ms", "1s", "--json"]
        else:
            target = self.save_dir / f"{NAME}.hvm"
            args = ["save", NAME, str(target), "--json"] + (["--checkpoint"] if op == "save" else [])
            if fault == "fill-disk":
                filler = self.fill(self.save_dir)
        t0 = time.monotonic()
        cli = subprocess.Popen(HVM + args, env=src.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        victim = self.inject(fault, handoff, delay, t0, cli, src, dst, relay)
        out, err = cli.communicate(timeout=180)
        elapsed, code = time.monotonic() - t0, cli.returncode
        if filler is not None:
            filler.unlink()
        if fault == "kill-daemon" and not dst.alive():
            dst.proc.wait()
            dst.start()
        if fault == "none" and code == 0:
            self.durations[kind].append(elapsed)
            if target is not None and target.exists():
                self.stream_size = target.stat().st_size
        self.tally[op] += 1
        self.faults[fault] += 1
        if fault in ("none", "fill-disk") or victim is not None or (fault == "cut-link" and relay.was_cut):
            self.struck[fault] += 1
        self.exits[code] += 1
        try:
            note = self.judge(op, fault, victim, code, out + err, src, dst, target)
        finally:
            if relay is not None:           # once nothing is in flight (its CLI may be gone)
                relay.close()
        if target is not None:
            target.unlink(missing_ok=True)
        self.check_host()
        return f"{op} on {src.label}{' to ' + dst.label if op == 'migrate' else ''}, {fault} at {where}: " \
               f"exit {code}{note} ({elapsed:.1f} s, {time.monotonic() - t0:.1f} s with the checks)"

    def fill(self, directory: Path) -> Path:
        """Take all of the tmpfs but a random part of a stream's size."""
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        leave = self.rng.randrange(0, max(1, self.stream_size))
        filler = directory / "filler"
        with open(filler, "wb") as f:
            try:
                f.truncate(0)
                os.posix_fallocate(f.fileno(), 0, max(0, free - leave))
            except OSError:
                pass
        return filler

    def inject(self, fault, handoff, delay, t0, cli, src, dst, relay) -> int | None:
        """Wait for the fault's moment and strike; the pid killed (None: nothing killed)."""
        if fault in ("none", "fill-disk"):
            return None
        if handoff:                 # the destination's copy has appeared: RESTORED is near
            deadline = t0 + 60
            while not (dst.base / NAME / "control.sock").exists():
                if cli.poll() is not None or time.monotonic() > deadline:
                    return None
                time.sleep(0.001)
            time.sleep(delay)
        else:
            while time.monotonic() < t0 + delay:
                if cli.poll() is not None:
                    return None
                time.sleep(0.002)
        if fault == "cut-link":
            relay.cut()
            return None
        pid = {"kill-source-domain": src.pid, "kill-domain": src.pid,
               "kill-receiving-domain": dst.pid}.get(fault, lambda: None)()
        if fault in ("kill-source-cli", "kill-cli"):
            pid = cli.pid
        elif fault == "kill-daemon":
            pid = dst.proc.pid
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return pid

    # -- what the host shows afterwards --------------------------------------------------------
    def settle(self, timeout: float = RESUME_TIMEOUT + 20) -> dict:
        """Each host's domains (by host label) once nothing is in flight: no copy awaiting
        GO, no domain process still starting or on its way out."""
        deadline = time.monotonic() + timeout
        while True:
            doms = {h.label: h.domains() for h in self.hosts}
            busy = [h.label for h in self.hosts if (h.base / NAME).exists() and NAME not in doms[h.label]]
            busy += [label for label, d in doms.items() if d.get(NAME, {}).get("awaiting_go")
                     or d.get(NAME, {}).get("job")                          # a save, a relocation
                     or d.get(NAME, {}).get("status") in ("destroyed",      # on its way out
                                                          "unresponsive")]  # (or hung: not settled)
            if not busy:
                return doms
            if time.monotonic() > deadline:
                raise Violation(f"not settled after {timeout:g}s ({busy}): {doms}")
            time.sleep(0.1)

    def judge(self, op, fault, victim, code, text, src, dst, target) -> str:
        """Check what the host shows against the rules (module docstring), doing what an
        operator would where the outcome asks for it; a note for the log."""
        note = ""
        doms = self.settle()
        if code == 3:                   # outcome unknown: do what the message says
            here = doms[src.label].get(NAME, {}).get("status")
            there = doms[dst.label].get(NAME, {})
            if op != "migrate" or "outcome unknown" not in text or "hvm destroy" not in text or \
                    (here == "paused" and "hvm unpause" not in text):
                raise Violation(f"exit 3 without 'outcome unknown' and what to do: {text.strip()}")
            if here not in ("paused", "crashed"):
                raise Violation(f"exit 3 but the copy here is {doms[src.label].get(NAME)}")
            self.unknown += 1
            if there.get("status") == "running":
                self.expect_ok(src.hvm("destroy", NAME), "destroy (or clear) here")
                note = f"; outcome unknown: running there, {here} here, destroyed here"
            elif here == "paused":
                if there.get("status") == "crashed":
                    self.clear_crashed(dst.label, there, victim)
                self.expect_ok(src.hvm("unpause", NAME), "unpause here")
                note = "; outcome unknown: not running there, unpaused here"
            else:
                note = "; outcome unknown: not running there, crashed here"
            doms = self.settle()
        if op == "save-stop" and target.exists() and \
                not any(d.get(NAME, {}).get("status") == "running" for d in doms.values()):
            # the save completed (exit 0; or its CLI, or its domain process on its way out,
            # was killed just after): restore from it
            if code not in (0, -9) and not (code == 1 and "was written before it did" in text):
                raise Violation(f"exit {code}, yet the guest is gone and its file is there: {text.strip()}")
            for label, d in doms.items():
                if NAME in d:
                    self.clear_crashed(label, d[NAME], victim)
            self.expect_ok(src.hvm("stream", "verify", str(target)), "verify the saved file")
            self.expect_ok(src.hvm("restore", str(target)), "restore from the saved file")
            note += "; restored from the file"
            doms = self.settle()
        elif op == "save-stop" and code == 0:
            raise Violation("a stop-and-copy save said done, but left no file or a running guest")
        copies = [(label, d[NAME]) for label, d in doms.items() if NAME in d]
        running = [(label, info) for label, info in copies if info["status"] == "running"]
        crashed = [(label, info) for label, info in copies if info["status"] == "crashed"]
        if len(running) + len(crashed) != len(copies):
            raise Violation(f"a copy is left {[(label, info['status']) for label, info in copies]}")
        if len(running) > 1:
            raise Violation("two copies run")
        for label, info in crashed:
            self.clear_crashed(label, info, victim)
        if not running:             # lost: only with its last domain process, the one killed
            if not crashed:
                raise Violation(f"no copy runs, and nothing crashed: {doms}")
            self.lost += 1
            self.here = 0
            self.settle()
            self.new_guest()
            return note + "; guest lost with its killed process (listed crashed, logs kept), recreated"
        label = running[0][0]
        self.here = [h.label for h in self.hosts].index(label)
        moved = label != src.label
        if code == 0 and op == "migrate" and not moved:
            raise Violation("exit 0 but the guest did not move")
        if code == 1 and moved:
            raise Violation(f"exit 1 but the guest moved: {text.strip()}")
        if op != "migrate" and moved:
            raise Violation("a save moved the guest")
        if code == 1 and fault == "none":
            raise Violation(f"failed without a fault: {text.strip()}")
        if code not in (0, 1, 3, -9) or "Traceback" in text:
            raise Violation(f"exit status {code}: {text.strip()}")
        self.ledger_goes_on(self.hosts[self.here])
        return note

    def clear_crashed(self, label: str, info: dict, victim: int | None) -> None:
        """Only a killed process may leave a crashed copy, with its logs; then clear it."""
        if info["status"] != "crashed" or info["pid"] != victim:
            raise Violation(f"a {info['status']} copy on {label} (pid {info['pid']}; killed: {victim})")
        if not any(p.endswith("console.log") for p in info.get("logs") or []):
            raise Violation(f"the crashed copy on {label} kept no console log")
        self.expect_ok(self.host(label).hvm("destroy", NAME), "clear the crashed copy")

    def host(self, label: str) -> Host:
        return self.hosts[[h.label for h in self.hosts].index(label)]

    def check_host(self, grace: float = 3.0) -> None:
        """Processes, state directories, partial files and the disk lock agree with the
        domain lists (a process whose directory is gone may take ``grace`` seconds to end)."""
        deadline = time.monotonic() + grace
        while True:
            try:
                return self._check_host()
            except Violation:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _check_host(self) -> None:
        live, dirs = {}, set()
        for h in self.hosts:
            for name, info in h.domains().items():
                if info["status"] != "crashed":
                    live[info["pid"]] = f"{h.label}/{name}"
            dirs |= {f"{h.label}/{p.name}" for p in h.base.iterdir()
                     if p.name != learned.FILE} if h.base.exists() else set()     # a host's, not a domain's
        procs = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"migrate.host.domaind" in argv and any(str(self.root).encode() in a for a in argv):
                procs[int(pid)] = argv
        if set(procs) - set(live):
            raise Violation(f"stray domain processes: {sorted(set(procs) - set(live))}")
        if dirs - set(live.values()):
            raise Violation(f"stray state directories: {sorted(dirs - set(live.values()))}")
        if self.save_dir is not None and list(self.save_dir.glob("*.partial")):
            raise Violation(f"partial files left: {list(self.save_dir.glob('*.partial'))}")
        writers = holders(self.disk, WRITER)
        expected = [f"domain {NAME} (pid {pid})" for pid in live]
        if writers != expected:
            raise Violation(f"disk writer lock held by {writers}, expected {expected}")
        if holders(self.disk, INCOMING):
            raise Violation(f"a relocation still holds the disk: {holders(self.disk, INCOMING)}")

    @staticmethod
    def expect_ok(out: subprocess.CompletedProcess, what: str) -> None:
        if out.returncode:
            raise Violation(f"{what} failed: {out.stderr.strip()}")

    def close(self) -> None:
        for h in self.hosts:
            for name in list(h.domains()):
                h.hvm("destroy", name, timeout=60)
            h.stop()


def mount_tmpfs(path: Path, size_mib: int) -> bool:
    path.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    return out.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--memory", type=int, default=32, help="guest MiB")
    ap.add_argument("--json", action="store_true", help="the summary as JSON on the last line")
    ap.add_argument("--faults", default=None, help="only these faults (comma-separated), e.g. "
                    "cut-link,kill-daemon")
    ap.add_argument("--keep", action="store_true", help="keep the state directories and logs of a run "
                    "with violations (printed), for a post-mortem")
    opts = ap.parse_args()
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"chaos: seed {seed} (tools/chaos.py --seed {seed} --trials {opts.trials} repeats this run)",
          flush=True)
    root = Path(tempfile.mkdtemp(prefix="hvm-chaos-"))
    save_dir = root / "saves"
    mounted = mount_tmpfs(save_dir, 3 * opts.memory + 16)
    if not mounted:
        print("chaos: cannot mount a tmpfs here: fill-disk faults are left out", flush=True)
    faults = [(f, "migrate") for f in MIGRATE_FAULTS] + \
             [(f, op) for f in SAVE_FAULTS for op in ("save", "save-stop") if mounted or f != "fill-disk"]
    if opts.faults:
        faults = [(f, op) for f, op in faults if f in opts.faults.split(",")]
    chaos = None
    t0 = time.monotonic()
    # killed with SIGTERM: clean up as on any other exit (the daemons, the tmpfs, the files)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        chaos = Chaos(root, seed, opts.memory, save_dir)
        order = list(range(len(faults)))
        for i in range(opts.trials):
            if i % len(order) == 0:
                chaos.rng.shuffle(order)
            fault, op = faults[order[i % len(order)]]
            try:
                print(f"trial {i}: {chaos.trial(fault, op)}; ok", flush=True)
            except (Violation, subprocess.TimeoutExpired, control.ControlError) as exc:
                chaos.violations.append(f"trial {i} ({op}, {fault}): {exc}")
                print(f"trial {i}: {op}, {fault}: VIOLATION: {exc}", flush=True)
                if opts.keep:           # the domains' logs as they are now, and the daemons'
                    (root / "postmortem").mkdir(exist_ok=True)
                    for h in chaos.hosts:
                        shutil.copy(root / f"daemon-{h.label}.log", root / "postmortem")
                        shutil.copytree(h.base, root / "postmortem" / f"trial{i}" / h.label,
                                        ignore=shutil.ignore_patterns("*.sock", "*.sock.new"),
                                        dirs_exist_ok=True)
                try:            # start over with a fresh guest so the run goes on
                    recover(chaos)
                except Exception as again:      # noqa: BLE001 - report, then stop
                    print(f"chaos: cannot recover: {again}", flush=True)
                    break
    finally:
        if chaos is not None:
            chaos.close()
        if mounted:
            subprocess.run(["umount", str(save_dir)], capture_output=True)
        if opts.keep and (chaos is None or chaos.violations):
            print(f"chaos: kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if chaos is None:
        return 1
    summary = {"seed": seed, "trials": sum(chaos.tally.values()), "operations": dict(chaos.tally),
               "faults": dict(chaos.faults), "faults_struck": dict(chaos.struck),
               "exit_statuses": {str(k): v for k, v in chaos.exits.items()},
               "outcome_unknown_resolved": chaos.unknown, "guests_lost_with_their_process": chaos.lost,
               "violations": len(chaos.violations), "seconds": round(time.monotonic() - t0, 1)}
    print("chaos: " + "; ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    for v in chaos.violations:
        print(f"chaos: VIOLATION {v}", flush=True)
    if opts.json:
        print(json.dumps(summary))
    return 1 if chaos.violations else 0


def recover(chaos: Chaos) -> None:
    for h in chaos.hosts:
        if not h.alive():
            h.start()
        for name in list(h.domains()):
            h.hvm("destroy", name, timeout=60)
    chaos.settle()
    chaos.here = 0
    chaos.new_guest()


if __name__ == "__main__":
    sys.exit(main())
