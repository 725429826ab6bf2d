"""The destination side of relocation: ``hvm host serve`` (specs/relocation.md).

One thread per incoming connection: TLS handshake (client certificate from the CA
required), HELLO checks, then a new domain process in its ``--receive`` mode (the same
program and state directory as ``hvm create``; it restores with the ordinary stream
reader and reports a paused pair), DATA relayed into it through a pipe, then the handoff:
RESTORED, wait for GO, unpause, RUNNING.

Why a relay into a domain process rather than a restore in the daemon: a domain's VMs,
memfds and vCPU thread belong to the process that built them and cannot be handed to
another process, and restored domains must be exactly like created ones (their own
process, control socket, console log, listed by ``hvm list``) and outlive the daemon.
TLS ends in the daemon, so the domain process reads plain stream bytes from a pipe.
The cost is one extra copy of the stream through the pipe.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack

from ..domain import MAX_MEMORY, MIB, MIN_MEMORY
from . import control, statedir, tls
from .relocation import (
    GO_TIMEOUT, HANDSHAKE_TIMEOUT, PROTO, RESUME_TIMEOUT, STREAM_VERSIONS, SYNC_TIMEOUT,
    WELCOME_TIMEOUT,
    Channel, ChannelError, stream_cap,
)

log = logging.getLogger("hvm.relocd")
F_SETPIPE_SZ = 1031


class Refused(Exception):
    """A relocation this host will not take; the text goes to the source as ERROR."""


@dataclasses.dataclass
class ServeConfig:
    host: str
    port: int
    tls_dir: str | None             # None: --insecure
    disk_map: dict[str, str] = dataclasses.field(default_factory=dict)
    base: Path | None = None        # state directory (default $HVM_STATE_DIR)
    max_memory: int | None = None   # guest memory this host's domains may hold in all (--max-memory)


class Incoming:
    """A receiving domain process and the pipe that feeds it."""

    def __init__(self, name: str, hello: dict, disk_to: str | None, base: Path | None):
        self.name, self.base = name, base
        try:
            self.dir = control._claim_directory(name, base)
        except control.ControlError as exc:
            raise Refused(str(exc)) from None
        opts = {"name": name, "memory": hello["memory"], "stub": hello["stub"],
                "disk_from": hello["disk"], "disk_to": disk_to, "resume_timeout": RESUME_TIMEOUT}
        stream_r, self.stream_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            fcntl.fcntl(self.stream_w, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass                    # a smaller pipe only costs speed
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "migrate.host.domaind", str(self.dir), "--receive",
                 str(stream_r), msgpack.packb(opts, use_bin_type=True).hex(), str(ready_w)],
                pass_fds=(stream_r, ready_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(self.dir / "stderr.log", "wb"), start_new_session=True)
        finally:
            os.close(stream_r)
            os.close(ready_w)
        self.ready = os.fdopen(ready_r)
        proc.wait(10)               # the launcher half of the double fork
        self.bytes = 0
        self.cap = stream_cap(hello["memory"])
        self.applied = 0            # stream bytes the domain process has applied
        self.final: str | None = None        # its "ok" or "error: ..." line
        self.changed = threading.Condition()
        threading.Thread(target=self._watch, daemon=True, name=f"ready-{name}").start()

    def _watch(self) -> None:
        """Read the domain process's ``at BYTES`` lines, then its final answer."""
        for line in self.ready:
            line = line.strip()
            with self.changed:
                if line.startswith("at ") and line[3:].isdigit():
                    self.applied = int(line[3:])
                else:
                    self.final = line
                self.changed.notify_all()
            if self.final is not None:
                break
        with self.changed:
            if self.final is None:
                tail = _tail(self.dir / "stderr.log")
                self.final = "error: domain process exited" + (f": {tail}" if tail else "")
            self.changed.notify_all()

    def wait(self, done, timeout: float, what: str):
        with self.changed:
            if not self.changed.wait_for(lambda: done() or self.final is not None, timeout):
                raise Refused(f"no {what} from the receiving domain process within {timeout:g}s")

    def sync(self) -> int:
        """Wait until the domain process has applied every byte fed so far (SYNC)."""
        self.wait(lambda: self.applied >= self.bytes, SYNC_TIMEOUT, "progress")
        if self.final is not None and self.final != "ok":
            raise Refused(f"restore failed: {self.final.removeprefix('error: ')}")
        return self.applied

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self.cap:
            raise Refused(f"stream exceeds {self.cap} bytes for a domain of this size")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.stream_w, view):]
        except OSError:
            raise Refused(f"restore failed: {self.answer()}") from None

    def answer(self) -> str:
        """The domain process's ``ok`` or error text (it stops reading on an error)."""
        self.close_stream()
        self.wait(lambda: False, control.CREATE_TIMEOUT, "answer")
        return self.final.removeprefix("error: ")

    def finish(self) -> None:
        """The stream is complete: wait for the restored, paused pair."""
        answer = self.answer()
        if answer != "ok":
            raise Refused(f"restore failed: {answer}")
        (self.dir / "stderr.log").unlink(missing_ok=True)

    def close_stream(self) -> None:
        if self.stream_w >= 0:
            os.close(self.stream_w)
            self.stream_w = -1

    def resume(self) -> None:
        with control.DomainClient(self.name, self.base) as client:
            client.call("unpause")

    def discard(self) -> None:
        self.close_stream()
        self.ready.close()
        control._kill_pidfile(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


class RelocationServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.ctx = tls.server_context(config.tls_dir) if config.tls_dir else None
        self.listener = socket.create_server((config.host, config.port), reuse_port=False)
        self.address = self.listener.getsockname()[:2]
        self.stopping = threading.Event()
        self.names_lock = threading.Lock()
        self.receiving: dict[str, int] = {}      # name -> guest memory, being received

    def serve_forever(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            threading.Thread(target=self.handle, args=(conn, peer), daemon=True,
                             name=f"reloc-{peer[0]}:{peer[1]}").start()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()

    # -- one relocation -------------------------------------------------------
    def handle(self, raw: socket.socket, peer) -> None:
        who = f"{peer[0]}:{peer[1]}"
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ctx is not None:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            try:
                sock = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("refused %s: TLS handshake failed: %s", who, exc)
                raw.close()
                return
        else:
            sock = raw
        ch = Channel(sock)
        try:
            self.relocation(ch, who)
        except ChannelError as exc:
            log.warning("relocation from %s failed: %s", who, exc)
        finally:
            ch.close()

    def relocation(self, ch: Channel, who: str) -> None:
        hello = ch.expect("HELLO", WELCOME_TIMEOUT)
        try:
            disk_to = self.check_hello(hello)
        except Refused as exc:
            log.warning("refused %s: %s", who, exc)
            ch.send_error(str(exc))
            return
        name = hello["name"]
        with self.names_lock:
            try:
                if name in self.receiving:
                    raise Refused(f"domain {name!r} is already being received")
                self.check_room(name, hello["memory"])
            except Refused as exc:
                log.warning("refused %s: %s", who, exc)
                ch.send_error(str(exc))
                return
            self.receiving[name] = hello["memory"]
        incoming = None
        try:
            incoming = Incoming(name, hello, disk_to, self.config.base)
            t0 = time.monotonic()
            ch.send("WELCOME", proto=PROTO, stream_version=STREAM_VERSIONS[-1])
            self.receive_stream(ch, incoming)
            incoming.finish()
            ch.send("RESTORED", seconds=time.monotonic() - t0)
            ch.expect("GO", GO_TIMEOUT)
        except (Refused, ChannelError, OSError) as exc:
            log.warning("relocation of %s from %s failed: %s", name, who, exc)
            if incoming is not None:
                incoming.discard()
            ch.send_error(str(exc))
            return
        finally:
            with self.names_lock:
                self.receiving.pop(name, None)
        try:
            incoming.resume()       # GO received: from here on the pair is ours
        except control.ControlError as exc:
            log.error("GO for %s from %s, but it did not resume: %s", name, who, exc)
            ch.send_error(f"resume failed after GO: {exc}")
            incoming.discard()
            return
        incoming.ready.close()
        log.info("relocated %s from %s: running", name, who)
        ch.send("RUNNING")

    def check_hello(self, hello: dict) -> str | None:
        """The destination disk for the domain, or Refused (specs/relocation.md, "HELLO checks")."""
        if hello["proto"] != PROTO:
            raise Refused(f"protocol version {hello['proto']} is not {PROTO}")
        if not set(hello["stream_versions"]) & set(STREAM_VERSIONS):
            raise Refused(f"no common stream version (this host reads {STREAM_VERSIONS})")
        try:
            statedir.check_name(hello["name"])
        except ValueError as exc:
            raise Refused(str(exc)) from None
        memory = hello["memory"]
        if not MIN_MEMORY <= memory <= MAX_MEMORY or memory % (2 * MIB):
            raise Refused(f"memory size {memory} out of range")
        disk = hello["disk"]
        if disk is None:
            return None
        if not hello["stub"]:
            raise Refused("a disk needs the device-model stub")
        mapped = self.config.disk_map.get(disk)
        if mapped is None:
            raise Refused(f"domain {hello['name']} has a disk ({disk}) and this host maps none: "
                          f"start hvm host serve with --disk-map {disk}=DST")
        return mapped

    def check_room(self, name: str, memory: int) -> None:
        """With ``max_memory``: refuse a domain that would take the guest memory of this
        host's domains (running, paused, being received) over it. Called under names_lock."""
        limit = self.config.max_memory
        if limit is None:
            return
        held = sum(self.receiving.values()) + sum(
            info["memory"] for info in control.list_domains(self.config.base)
            if info["name"] not in self.receiving)
        if held + memory > limit:
            raise Refused(f"no room for domain {name}: it needs {memory >> 20} MiB and this host "
                          f"has {max(limit - held, 0) >> 20} MiB of its {limit >> 20} MiB left "
                          f"(hvm host serve --max-memory)")

    def receive_stream(self, ch: Channel, incoming: Incoming) -> None:
        while True:
            kind, message = ch.receive()
            if kind == "data":
                incoming.feed(message)
            elif message["t"] == "SYNC":
                if message["bytes"] != incoming.bytes:
                    raise ChannelError(f"SYNC at {message['bytes']} bytes, received {incoming.bytes}")
                ch.send("SYNCED", bytes=incoming.sync())
            elif message["t"] == "STREAM_END":
                return
            else:
                raise ChannelError(f"expected DATA or STREAM_END, got {message['t']}")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def parse_disk_map(items) -> dict[str, str]:
    """['SRC=DST', ...] -> {SRC: DST}; DST must be an existing file here."""
    out = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise ValueError(f"--disk-map {item!r}: use SRC=DST")
        if not os.path.isfile(dst):
            raise ValueError(f"--disk-map {item!r}: {dst} is not a file on this host")
        out[src] = os.path.abspath(dst)
    return out


__all__ = ["Incoming", "Refused", "RelocationServer", "ServeConfig", "parse_disk_map"]
