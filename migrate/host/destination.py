"""The destination side of relocation: ``hvm host serve`` (specs/relocation.md).

One thread per incoming connection: TLS handshake (client certificate from the CA
required), HELLO checks, then a new domain process in its ``--receive`` mode (the same
program and state directory as ``hvm create``; it restores with the ordinary stream
reader and reports a paused pair), DATA relayed into it through a pipe, then the handoff:
RESTORED, wait for GO, ``go`` on the domain process's go pipe, RUNNING.

Why a relay into a domain process rather than a restore in the daemon: a domain's VMs,
memfds and vCPU thread belong to the process that built them and cannot be handed to
another process, and restored domains must be exactly like created ones (their own
process, control socket, console log, listed by ``hvm list``) and outlive the daemon.
TLS ends in the daemon, so the domain process reads plain stream bytes from a pipe.
The cost is one extra copy of the stream through the pipe.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import math
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from ..cpu import compatibility, this_host
from ..config import MAX_VCPUS, NetError, check_ifname, memory_ok, memory_problem
from ..config import parse_disk_map, parse_net_map  # noqa: F401  (re-exported)
from ..kvm.vm import HUGE_HINT, HUGE_PAGE, huge_pages_free
from ..engine.state import RestoreError, policies_from_bodies
from ..locks import DiskBusy, DiskLock
from ..text import Sparse, one_line
from ..stream import StreamError, Vm
from .. import trace
from . import control, statedir, tls
from .launch import Go, Launch, Line, Receive, Say, parse
from .channel import (
    CHANNEL_MAGIC, CHANNEL_PREAMBLE, FRAME_TIMEOUT, GO_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_GRANTED_CHANNELS,
    PROTO, RESUME_TIMEOUT, STREAM_VERSIONS, SYNC_TIMEOUT, WELCOME_TIMEOUT,
    Channel, ChannelError, PeerError, ready, stream_cap,
)

log = logging.getLogger("hvm.relocd")
F_SETPIPE_SZ = 1031
FEED_TIMEOUT = 60.0         # seconds the receiving domain process may take no stream
# A new connection has HANDSHAKE_TIMEOUT seconds from its accept for its first bytes and
# then its TLS handshake or, for a data channel, its whole preamble (section 1, "Data
# channels"); after that, each wait is one for a whole frame (channel.Channel.receive).
MAX_PENDING = 64            # connections at once not yet past HELLO (or their preamble); more are closed at once
MAX_RECEIVING = 8           # relocations received at once (HELLO to GO); more are refused at HELLO
HANDOFF_WAIT = 0.02         # seconds RESTORED waits for GO to come on data channel 0 instead
WITHDRAW_WAIT = 5.0         # seconds a copy given up before GO has to say whether it took GO on channel 0
ACCEPT_BACKOFF = 0.1        # seconds to wait after accept() failed for want of descriptors or memory
ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
SAY_EVERY = 10.0            # seconds between two log lines about the same overload
REFUSAL_LINGER = 1.0        # seconds an ERROR at or before HELLO reads on: the source sends nothing more


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


def _peek(sock: socket.socket, n: int, deadline: float) -> bytes:
    """The first ``n`` bytes the peer sends (fewer if it closes first), left unread; by
    ``deadline`` (time.monotonic()), else socket.timeout."""
    head = b""
    while len(head) < n:
        sock.settimeout(_left(deadline))
        head = sock.recv(n, socket.MSG_PEEK)
        if not head or len(head) >= n:
            break
        if time.monotonic() > deadline:
            raise OSError("the peer sent too little within the handshake timeout")
        time.sleep(0.005)
    return head


def _read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, all by ``deadline``: a peer trickling bytes cannot stretch it."""
    data = b""
    while len(data) < n:
        sock.settimeout(_left(deadline))
        part = sock.recv(n - len(data))
        if not part:
            raise OSError("the channel closed inside its preamble")
        data += part
    return data


def _short(value) -> str:
    return one_line(repr(value), 40)


def _internal(exc: BaseException) -> str:
    """One line for an error nobody foresaw (it goes to the log and to the peer)."""
    return f"internal error of the destination: {type(exc).__name__}: {' '.join(str(exc).split())}"


class Refused(Exception):
    """A relocation this host will not take; the text goes to the source as ERROR."""


class NotResumed(Refused):
    """After GO: the receiving domain process could not resume the pair, which never ran."""


@dataclasses.dataclass
class ServeConfig:
    host: str
    port: int
    tls_dir: str | None             # None: --insecure
    disk_map: dict[str, str] = dataclasses.field(default_factory=dict)
    base: Path | None = None        # state directory (default $HVM_STATE_DIR)
    max_memory: int | None = None   # guest memory this host's domains may hold in all (--max-memory)
    net_map: dict[str, str] = dataclasses.field(default_factory=dict)     # --net-map: source bridge/tap -> here
    hugepages: bool = False         # --hugepages: incoming guests' RAM of 2 MiB huge pages


class Incoming:
    """A receiving domain process, the pipe that feeds it the stream, the pipe its GO goes
    down and the pipe it answers on (``migrate.host.domaind``, receive mode). The
    relocation's thread reads the answers itself (no thread in between on the downtime
    path), and reads its progress lines while it feeds the stream, so that neither pipe
    fills up with the other waiting."""

    def __init__(self, name: str, hello: dict, disk_to: str | None, base: Path | None,
                 net_to: str | None = None, channels: int = 0, tls_dir: str | None = None,
                 hugepages: bool = False):
        self.name, self.base = name, base
        # GO may come on data channel 0 too (specs/relocation.md, "The handoff on channel 0")
        self.handoff = bool(channels) and hello.get("handoff") is True
        self.dir: Path | None = None
        self.give_fds: socket.socket | None = None
        self.stream_w = self.go_w = self.ready_r = -1
        try:        # the disk image's INCOMING lock, for the receiving process to hold
            lock = DiskLock.for_incoming(disk_to) if disk_to is not None else None
        except DiskBusy as exc:
            raise Refused(str(exc)) from None
        self.channels = channels
        self.channel_id, self.token = os.urandom(16), os.urandom(32)
        self.given: set[int] = set()            # channels handed to the domain process
        self.rounds = 0                         # page rounds it says every channel has ended
        theirs: list = []                       # the domain process's ends, closed here once it has them
        try:        # anything taken is given back if this fails, however it fails
            try:
                self.dir = control.claim_directory(name, base)
            except (control.ControlError, ValueError) as exc:
                raise Refused(str(exc)) from None
            self.give_fds, take_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs.append(take_fds)
            stream_r, self.stream_w = os.pipe()
            theirs.append(stream_r)
            go_r, self.go_w = os.pipe()
            theirs.append(go_r)
            self.ready_r, ready_w = os.pipe()
            theirs.append(ready_w)
            try:
                fcntl.fcntl(self.stream_w, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass                    # a smaller pipe only costs speed
            os.set_blocking(self.stream_w, False)
            job = Receive(stream_fd=stream_r, go_fd=go_r, name=name, memory=hello["memory"], stub=hello["stub"],
                          disk_from=hello["disk"], disk_to=disk_to, net_from=hello.get("net"), net_to=net_to,
                          resume_timeout=RESUME_TIMEOUT, cpu=hello.get("cpu"), channels=channels, token=self.token,
                          tls_dir=tls_dir, channel_fd=take_fds.fileno(), vcpus=hello.get("vcpus", 1),
                          hugepages=hugepages, live=hello["live"], handoff=self.handoff)
            control.launch(self.dir, Launch(job, ready_w, lock.fd if lock is not None else None))
        except BaseException as exc:
            self.discard()              # kills a process that did start, removes its directory
            if isinstance(exc, (OSError, subprocess.SubprocessError)):
                raise Refused(f"cannot start a receiving domain process: {exc}") from None
            raise
        finally:
            for end in theirs:
                if isinstance(end, socket.socket):
                    end.close()
                else:
                    os.close(end)
            if lock is not None:
                lock.close()        # the receiving process holds it now (or nobody does)
        self.bytes = 0
        self.cap = stream_cap(hello["memory"])
        self.applied = 0            # stream bytes the domain process has applied
        self.final: Line | None = None       # its answer to the stream: OK or a failure (launch.Say)
        self.carried_at = 0.0                # when it last said the channels carried more bytes
        self.stream_end_at = 0.0             # when STREAM_END arrived (time.monotonic)
        self.ran_at = 0.0                    # when the guest ran after GO (time.monotonic)
        self._pending = b""                  # what it said, not yet taken as lines
        self._lines: list[Line] = []         # lines after its final answer, not yet taken
        self._eof = False

    # -- what the domain process says -------------------------------------------
    def _read_some(self) -> None:
        chunk = os.read(self.ready_r, 4096)
        if chunk:
            self._pending += chunk
        else:
            self._eof = True

    def _take_lines(self) -> None:
        """Sort out the complete lines read: progress (AT, ROUND) and the final answer
        while there is none, anything later kept in order for :meth:`_line`."""
        while b"\n" in self._pending:
            raw, _, self._pending = self._pending.partition(b"\n")
            line = parse(raw.decode(errors="replace"))
            if self.final is None and line.kind is Say.AT:
                self.applied = line.bytes
            elif self.final is None and line.kind is Say.ROUND:
                self.rounds = line.rounds
            elif self.final is None and line.kind is Say.CHANNELS:
                self.carried_at = time.monotonic()      # the channels carry pages: the source lives
            elif self.final is None:
                self.final = line
            else:
                self._lines.append(line)
        if self._eof and self.final is None:
            self.final = control.exited(self.dir)

    def _wait(self, done, timeout: float, what: str) -> None:
        """Read until ``done()``, the process exits, or ``timeout`` (Refused)."""
        deadline = time.monotonic() + timeout
        self._take_lines()
        while not done() and not self._eof:
            left = deadline - time.monotonic()
            if left <= 0 or not ready({self.ready_r: select.POLLIN}, left):
                raise Refused(f"no {what} from the receiving domain process within {timeout:g}s")
            self._read_some()
            self._take_lines()

    def _line(self, timeout: float, what: str) -> Line:
        """The next line after the final answer; an error line if the process exited."""
        self._wait(lambda: bool(self._lines), timeout, what)
        return self._lines.pop(0) if self._lines else control.exited(self.dir)

    def _failed(self) -> bool:
        return self.final is not None and self.final.kind is not Say.OK

    # -- the stream ----------------------------------------------------------------
    def watch(self, ch: Channel) -> None:
        """Until the source's next frame: read what the domain process says, and raise
        Refused if it failed (with data channels the control connection is quiet for whole
        rounds, while the channels' pages may already have failed the restore). It waits
        FRAME_TIMEOUT, and again from each CHANNELS line (the channels carried more bytes):
        a round of any length goes on while its pages come."""
        deadline = time.monotonic() + FRAME_TIMEOUT
        sock = ch.sock.fileno()
        while not (hasattr(ch.sock, "pending") and ch.sock.pending()):
            deadline = max(deadline, self.carried_at + FRAME_TIMEOUT)
            fds = {sock: select.POLLIN} if self._eof else {sock: select.POLLIN, self.ready_r: select.POLLIN}
            got = ready(fds, deadline - time.monotonic())
            if sock in got or not got:
                return                  # a frame (or the timeout: receive() says so)
            self._read_some()
            self._take_lines()
            if self._failed():
                raise Refused(f"restore failed: {self.final.reason}")

    def give_channel(self, index: int, sock: socket.socket) -> None:
        """Hand a data channel's socket (its preamble read) to the domain process."""
        if not 0 <= index < self.channels or index in self.given:
            raise Refused(f"channel {index} is not one this relocation expects")
        self.given.add(index)
        socket.send_fds(self.give_fds, [index.to_bytes(4, "little")], [sock.fileno()])

    def sync(self, rounds: int = 0) -> int:
        """Wait until the domain process has applied every byte fed so far and, with data
        channels, every channel has ended ``rounds`` page rounds (SYNC)."""
        self._wait(lambda: (self.applied >= self.bytes and self.rounds >= rounds) or self.final is not None,
                   SYNC_TIMEOUT, "progress")
        if self._failed():
            raise Refused(f"restore failed: {self.final.reason}")
        return self.applied

    def feed(self, data: bytes) -> None:
        """Write ``data`` into the stream pipe, reading the process's lines meanwhile;
        Refused if it failed, exited, or took nothing for FEED_TIMEOUT seconds."""
        self.bytes += len(data)
        if self.bytes > self.cap:
            raise Refused(f"stream exceeds {self.cap} bytes for a domain of this size")
        view = memoryview(data)
        while view:
            fds = {self.stream_w: select.POLLOUT}
            if not self._eof:
                fds[self.ready_r] = select.POLLIN
            got = ready(fds, FEED_TIMEOUT)
            readable, writable = self.ready_r in got, self.stream_w in got
            if readable:
                self._read_some()
                self._take_lines()
            if self._failed():
                raise Refused(f"restore failed: {self.final.reason}")
            if writable:
                try:
                    view = view[os.write(self.stream_w, view):]
                except BlockingIOError:
                    pass
                except OSError:             # it stopped reading: it failed, say why
                    raise Refused(f"restore failed: {self.answer().reason}") from None
            elif not readable:
                raise Refused(f"the receiving domain process took no stream for {FEED_TIMEOUT:g}s")

    def answer(self) -> Line:
        """The domain process's answer to the stream: OK, or a failure (it stops reading on
        an error)."""
        self.close_stream()
        self._wait(lambda: self.final is not None, control.CREATE_TIMEOUT, "answer")
        return self.final or control.exited(self.dir)

    def finish(self) -> dict:
        """The stream is complete: wait for the restored, paused pair. Returns where the
        time since STREAM_END went (RESTORED's ``read``, ``apply``, ``answer``, seconds)."""
        answer = self.answer()
        if answer.kind is not Say.OK:
            raise Refused(f"restore failed: {answer.reason}")
        if len(answer.values) != 3:
            raise Refused(f"the receiving domain process answered {answer.format()!r}")
        length, end_at, applied_at = answer.values
        if length != self.bytes:        # it said ok at END: nothing may follow
            raise Refused(f"restore failed: {self.bytes - length} bytes after END")
        if self._lines and self._lines[0].kind is not Say.TAKEN:     # it failed after its ok
            raise Refused(f"restore failed: {self._lines[0].reason}")
        now, start = time.monotonic(), self.stream_end_at
        end_at, applied_at = (min(max(t, start), now) if math.isfinite(t) else start
                              for t in (end_at, applied_at))
        # each step counted from STREAM_END on: the stream may have been read before it came
        return {"read": end_at - start, "apply": max(applied_at, end_at) - end_at,
                "answer": now - max(applied_at, end_at)}

    def close_stream(self) -> None:
        if self.stream_w >= 0:
            os.close(self.stream_w)
            self.stream_w = -1

    def resume(self, paused: bool = False) -> float | None:
        """GO: tell the domain process to resume its pair (``paused``: to keep it paused),
        unless it took GO on data channel 0 already (TAKEN); the seconds from GO to the
        guest running (None when it stays paused), and ``ran_at`` is then when the guest
        ran (time.monotonic()). NotResumed when the guest provably never ran: the process
        said so (REFUSED, or ERROR from before GO) or was gone before it could read GO
        (the write fails, and it took no GO on channel 0); Refused when the outcome is not
        known (it exited without an answer: EXITED, or none came)."""
        go_at = time.monotonic()
        self._take_lines()
        gone = None
        if not self._taken():
            try:
                os.write(self.go_w, Go(paused).encode())
                trace.mark("D GO passed on")
            except OSError as exc:      # no reader left: unless it took GO on channel 0, nobody resumed it
                gone = exc.strerror
        self._close_go()
        if gone is not None:
            self._drain(WITHDRAW_WAIT)
            if not self._taken():
                raise NotResumed(f"the receiving domain process was gone before GO ({gone})")
        taken, line = self._answer(control.CREATE_TIMEOUT)
        trace.mark("D answer to GO read")
        # after TAKEN only its REFUSED says it never ran: an error may come after a resume
        if line.kind is Say.REFUSED or (line.kind is Say.ERROR and taken is None):
            raise NotResumed(line.reason)
        if paused and line.kind is Say.PAUSED:
            return None
        if line.kind is not Say.RUNNING:
            raise Refused(line.reason)
        if taken is not None:           # GO came on channel 0: from when the process took it
            go_at = min(max(taken.taken_at, go_at - control.CREATE_TIMEOUT), go_at)
        took = min(max(0.0, line.resumed_at - go_at), time.monotonic() - go_at)
        self.ran_at = go_at + took
        return took

    def let_the_handoff_go(self) -> None:
        """With the handoff on data channel 0, the source needs no RESTORED to send GO:
        stay out of the way (the pair's two processes have the cores) until the domain
        process has answered a GO taken there (TAKEN, then its answer) or said anything
        else, but HANDOFF_WAIT at most, after which RESTORED goes as ever (a channel 0 that
        failed costs that much)."""
        if self.handoff:
            self._drain(HANDOFF_WAIT, lambda: self._answered() or (bool(self._lines) and not self._taken()))

    def _answered(self) -> bool:
        """It took GO on channel 0 and answered it (TAKEN, then another line)."""
        return self._taken() and len(self._lines) > 1

    def _taken(self) -> bool:
        return bool(self._lines) and self._lines[0].kind is Say.TAKEN

    def _read_now(self) -> None:
        """Take in what the process has said so far, without waiting."""
        while not self._eof and ready({self.ready_r: select.POLLIN}, 0):
            self._read_some()
        self._take_lines()

    def _drain(self, timeout: float, done=lambda: False) -> None:
        """Read what the process says until ``done()``, it closes its end (it is gone) or
        ``timeout``, whichever first."""
        try:
            self._wait(done, timeout, "end")
        except Refused:
            pass

    def _close_go(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1

    def _answer(self, timeout: float) -> tuple[Line | None, Line]:
        """The process's answer to GO: (its TAKEN line, if GO came on channel 0, the answer)."""
        line = self._line(timeout, "answer to GO")
        if line.kind is not Say.TAKEN:
            return None, line
        return line, self._line(timeout, "answer to GO")

    def withdraw(self) -> str:
        """Before GO, the relocation failed here: give the received copy up. With the
        handoff on data channel 0 it may have taken GO there (even before this daemon read
        its OK, and it says TAKEN before it resumes, its answer to its daemon before the one
        on channel 0). Once it said OK, the stream and go pipes are closed (a copy that took
        no GO destroys itself) and what it says until it ends decides; before its OK, or
        with no end or answer within WITHDRAW_WAIT, it is stopped (SIGSTOP), what it said
        read, and it is killed unless it answered a GO (then it goes on). Its directory is
        out of sight meanwhile, as :meth:`discard` has it. Returns
        "discarded" (it never ran: gone, its directory too), "runs" (it took GO and runs,
        or holds the guest paused: it is the live copy, and stays) or "unknown" (it took GO
        and said no more: killed if alive, its directory kept, as :meth:`abandon`)."""
        if not self.handoff:
            self.discard()
            return "discarded"
        shown, self.dir = self.dir, control.hide(self.dir)     # not listed as crashed meanwhile
        self._read_now()
        if self.final is not None and self.final.kind is Say.OK:
            self.close_stream()
            self._close_go()            # a copy that took no GO destroys itself
            self._drain(WITHDRAW_WAIT, self._answered)
        killed = False
        if not self._eof and not self._answered():
            # before its OK, or no word in time: stopped first (SIGSTOP), so that what it
            # said is all it will have done, then read; killed unless it answered a GO
            stopped = control.signal_pidfile(self.dir, signal.SIGSTOP)
            self._read_now()
            if stopped and self._answered():
                control.signal_pidfile(self.dir, signal.SIGCONT)
            else:                       # no process to stop is one that runs no more either
                killed = True
                if control.kill_pidfile(self.dir):
                    self._drain(WITHDRAW_WAIT)
        if not self._taken():
            self.discard()
            return "discarded"
        if self.dir != shown:
            try:
                os.rename(self.dir, shown)
                self.dir = shown
            except OSError as exc:      # out of hvm list's reach, but not of its reaping
                kept = shown.with_name(f"{shown.name}.kept-{os.getpid()}")
                log.error("%s: could not show its directory again (%s): kept as %s", self.name, exc, kept)
                os.rename(self.dir, kept)
                self.dir = kept
        try:
            _, line = self._answer(0.001)
        except Refused:                 # it took GO and has not answered
            line = None
        if line is not None and line.kind in (Say.RUNNING, Say.PAUSED) and not killed:
            self.close()
            return "runs"
        if line is not None and line.kind is Say.REFUSED:
            self.discard()
            return "discarded"
        self.abandon()
        return "unknown"

    def _close(self) -> None:
        """Stop talking to the domain process: close the daemon's ends of its pipes."""
        self.close_stream()
        if self.give_fds is not None:
            self.give_fds.close()
        self._close_go()
        if self.ready_r >= 0:
            os.close(self.ready_r)
            self.ready_r = -1

    def discard(self) -> None:
        """Kill the receiving domain process (whose guest never ran) and remove its state:
        killed before its pipes close here (with the handoff on channel 0, a process that
        could no longer tell this daemon TAKEN could otherwise take a GO there)."""
        if self.dir is not None:
            control.discard(self.dir)
        self._close()

    def abandon(self) -> None:
        """After GO, with no answer: the receiving domain process may have run the guest.
        Kill it if it still lives, and keep its directory, so it is listed as crashed with
        its logs (the source, told the outcome is unknown, is to look here). Killed first,
        as :meth:`discard` has it."""
        control.kill_pidfile(self.dir)
        self._close()

    def close(self) -> None:
        """The relocation is over and the domain runs: stop listening to it. Its standard
        error is a starting process's (statedir.STDERR): removed now, not between its ok
        and RESTORED, which is downtime."""
        (self.dir / statedir.STDERR).unlink(missing_ok=True)
        self.give_fds.close()
        if self.ready_r >= 0:
            os.close(self.ready_r)
            self.ready_r = -1


class _Pending:
    """A connection's place among those not yet past HELLO (or, for a data channel, its
    preamble): at most MAX_PENDING at once. Given back once its relocation is admitted
    (it then counts among the MAX_RECEIVING) or when the connection ends."""

    def __init__(self, server: "RelocationServer"):
        self.server, self.held = server, True

    def release(self) -> None:
        with self.server.pending_lock:
            if self.held:
                self.held = False
                self.server.pending -= 1


class RelocationServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.ctx = tls.server_context(config.tls_dir) if config.tls_dir else None
        self.listener = socket.create_server((config.host, config.port), reuse_port=False)
        self.address = self.listener.getsockname()[:2]
        self.stopping = threading.Event()
        self.names_lock = threading.Lock()
        self.receiving: dict[str, int] = {}      # name -> guest memory, being received
        self.routes: dict[bytes, Incoming] = {}  # channel id -> its relocation (data channels)
        self.pending_lock = threading.Lock()
        self.pending = 0                         # connections not yet past HELLO or preamble
        self._said: dict[str, Sparse] = {}      # overload -> its log lines

    def _say(self, what: str, text: str) -> None:
        """Log an overload (``what``) at most once every SAY_EVERY seconds, with how many
        times it happened meanwhile: a flood must not flood the log as well."""
        due = self._said.setdefault(what, Sparse(SAY_EVERY)).due()
        if due is not None:
            times, since = due
            log.warning("%s%s", text, f" (and {times} more times in the last {since:.0f} s)" if times else "")

    def _admit(self) -> _Pending | None:
        with self.pending_lock:
            if self.pending >= MAX_PENDING:
                return None
            self.pending += 1
            return _Pending(self)

    def serve_forever(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self.stopping.is_set():
                    break
                if exc.errno not in ACCEPT_ERRORS:
                    raise
                # out of descriptors or memory (a flood of connections, say): the ones
                # held end by their deadlines; wait a little rather than spin or exit
                self._say("accept", f"cannot accept a connection: {exc.strerror or exc}; going on")
                if exc.errno != errno.ECONNABORTED:
                    time.sleep(ACCEPT_BACKOFF)
                continue
            slot = self._admit()
            if slot is None:
                self._say("pending", f"closed a connection from {peer[0]}:{peer[1]} at once: {MAX_PENDING} "
                                     f"connections are already on their way to HELLO")
                conn.close()
                continue
            try:
                threading.Thread(target=self.handle, args=(conn, peer, slot), daemon=True,
                                 name=f"reloc-{peer[0]}:{peer[1]}").start()
            except RuntimeError as exc:     # no thread to be had
                slot.release()
                conn.close()
                self._say("thread", f"closed a connection from {peer[0]}:{peer[1]}: {exc}")
                time.sleep(ACCEPT_BACKOFF)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()

    # -- one relocation -------------------------------------------------------
    def handle(self, raw: socket.socket, peer, slot: _Pending) -> None:
        who = f"{peer[0]}:{peer[1]}"
        try:
            self._handle(raw, who, slot)
        except Exception as exc:        # nothing foreseen: say it in one line, keep serving
            log.error("connection from %s: %s", who, _internal(exc))
        finally:
            raw.close()
            slot.release()

    def _handle(self, raw: socket.socket, who: str, slot: _Pending) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT     # first bytes, then TLS or the preamble
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = _peek(raw, len(CHANNEL_MAGIC), deadline)
        except OSError as exc:
            log.warning("refused %s: %s", who, exc)
            return
        if not head:
            return                          # it closed without a word
        if head == CHANNEL_MAGIC:
            self.channel(raw, who, deadline)
            return
        if (self.ctx is not None) != (head[:2] == b"\x16\x03"):     # the two sides disagree on TLS
            if self.ctx is not None:        # a plain client can read a plain ERROR
                log.warning("refused %s: it does not speak TLS (an --insecure source?)", who)
                Channel(raw).send_error("this host requires TLS with client certificates: run hvm "
                                        "migrate with --tls-dir, not --insecure", linger=1.0)
            else:
                log.warning("refused %s: it speaks TLS, and this daemon runs --insecure", who)
            return
        if self.ctx is not None:
            try:
                raw.settimeout(_left(deadline))
                sock = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("refused %s: TLS handshake failed: %s", who, exc)
                return
        else:
            sock = raw
        ch = Channel(sock)
        try:
            self.relocation(ch, who, slot)
        finally:
            ch.close()

    def channel(self, raw: socket.socket, who: str, deadline: float) -> None:
        """A data channel (specs/relocation.md, "Data channels"): its plain preamble names
        the relocation; the socket goes to that relocation's domain process, which starts
        TLS on it and checks, inside TLS, the relocation's token. The whole preamble must
        have come by ``deadline``."""
        try:
            magic, channel_id, index, reserved = CHANNEL_PREAMBLE.unpack(
                _read_exact(raw, CHANNEL_PREAMBLE.size, deadline))
            with self.names_lock:
                incoming = self.routes.get(channel_id)
                if incoming is None or reserved:
                    raise Refused("no relocation under way has this channel id")
                incoming.give_channel(index, raw)
        except (OSError, Refused) as exc:
            log.warning("refused data channel from %s: %s", who, exc)
        finally:
            raw.close()

    def relocation(self, ch: Channel, who: str, slot: _Pending) -> None:
        try:
            hello = ch.expect("HELLO", WELCOME_TIMEOUT)
        except PeerError as exc:
            log.warning("refused %s: it sent ERROR instead of HELLO: %s", who, exc)
            return
        except ChannelError as exc:     # a bad frame, a missing key, DATA first, a timeout
            log.warning("refused %s: %s", who, exc)
            ch.send_error(f"protocol error: {exc}", linger=REFUSAL_LINGER)
            return
        try:
            disk_to, version, channels = self.check_hello(hello)
            net_to = self.check_net(hello)
        except Refused as exc:
            log.warning("refused %s: %s", who, exc)
            ch.send_error(str(exc), linger=REFUSAL_LINGER)
            return
        except Exception as exc:        # a HELLO none of the checks foresaw: refused all the same
            text = f"malformed HELLO: {type(exc).__name__}: {' '.join(str(exc).split())}"
            log.warning("refused %s: %s", who, text)
            ch.send_error(text, linger=REFUSAL_LINGER)
            return
        name = hello["name"]
        with self.names_lock:
            try:
                if len(self.receiving) >= MAX_RECEIVING:
                    raise Refused(f"this host receives at most {MAX_RECEIVING} relocations at once and is "
                                  f"receiving that many now: try again later")
                if name in self.receiving:
                    raise Refused(f"domain {name!r} is already being received")
                self.check_room(name, hello["memory"])
                self.check_huge_pages(name, hello["memory"])
            except Exception as exc:
                text = str(exc) if isinstance(exc, Refused) else _internal(exc)
                log.warning("refused %s: %s", who, text)
                refused = text
            else:
                refused = None
                self.receiving[name] = hello["memory"]
        if refused is not None:
            ch.send_error(refused, linger=REFUSAL_LINGER)      # not under names_lock
            return
        slot.release()                  # it counts among the MAX_RECEIVING now
        incoming = None
        try:
            incoming = Incoming(name, hello, disk_to, self.config.base, net_to, channels, self.config.tls_dir,
                                self.config.hugepages)
            t0 = time.monotonic()
            if channels:
                with self.names_lock:
                    self.routes[incoming.channel_id] = incoming
                ch.send("WELCOME", proto=PROTO, stream_version=version, channels=channels,
                        channel_id=incoming.channel_id, channel_token=incoming.token,
                        **({"handoff": True} if incoming.handoff else {}))
            else:
                ch.send("WELCOME", proto=PROTO, stream_version=version)
            self.receive_stream(ch, incoming)
            timing = incoming.finish()
            trace.mark("D OK read")
            incoming.let_the_handoff_go()
            ch.send("RESTORED", seconds=time.monotonic() - t0, **timing)
            trace.mark("D RESTORED sent")
            go = ch.expect("GO", GO_TIMEOUT)
            trace.mark("D GO read")
        except Exception as exc:        # before GO here; GO may have come on channel 0 (withdraw)
            text = str(exc) if isinstance(exc, (Refused, ChannelError, OSError)) else _internal(exc)
            log.warning("relocation of %s from %s failed: %s", name, who, text)
            outcome = "discarded"
            if incoming is not None:
                try:
                    outcome = incoming.withdraw()
                except Exception as again:      # say so, and still tell the source
                    outcome = "unknown" if incoming.handoff else "discarded"
                    log.error("relocation of %s: giving up its receiving domain process failed: %s",
                              name, _internal(again))
            if outcome == "discarded":      # a GO the source sent on channel 0 meanwhile ran nothing
                ch.send_error(text, **({"not_resumed": True} if incoming is not None and incoming.handoff else {}))
            else:
                took = "took GO on data channel 0 and " + ("runs here" if outcome == "runs" else
                                                             "gave no answer (kept as crashed)")
                log.error("relocation of %s from %s: the copy here %s", name, who, took)
                ch.send_error(f"{text}; but the copy here {took}")
            return
        finally:
            with self.names_lock:
                self.receiving.pop(name, None)
                if incoming is not None:
                    self.routes.pop(incoming.channel_id, None)
        try:
            resume = incoming.resume(go.get("paused") is True)      # GO: from here on the pair is ours
        except NotResumed as exc:       # it never ran: destroy it, then the source may resume
            log.error("GO for %s from %s, but it could not resume: %s", name, who, exc)
            incoming.discard()
            ch.send_error(f"resume failed after GO: {exc}; the copy here never ran and is destroyed",
                          not_resumed=True)
            return
        except Exception as exc:        # it may have run: the outcome is unknown, never "not resumed"
            text = str(exc) if isinstance(exc, Refused) else _internal(exc)
            log.error("GO for %s from %s, but it did not resume: %s", name, who, text)
            ch.send_error(f"resume failed after GO: {text}")
            try:
                incoming.abandon()      # its directory stays: listed crashed, logs kept
            except Exception as again:
                log.error("GO for %s: abandoning its domain process failed: %s", name, _internal(again))
            return
        where = "is here, paused as asked" if resume is None else "runs here"
        try:
            incoming.close()
        except OSError as exc:          # only a leftover file: the guest is ours all the same
            log.warning("relocated %s: could not tidy its directory: %s", name, exc)
        try:
            if resume is None:
                ch.send("RUNNING", paused=True)
            else:
                # ``after``: how long the guest had run here when RUNNING left (it is no downtime)
                ch.send("RUNNING", resume=resume, after=time.monotonic() - incoming.ran_at)
                trace.mark("D RUNNING sent")
        except Exception as exc:        # the guest is ours: only the source was not told
            log.error("relocated %s from %s: it %s, but RUNNING could not be sent (%s): the source "
                      "was not told, and keeps its copy paused (outcome unknown there)", name, who, where,
                      exc if isinstance(exc, ChannelError) else _internal(exc))
            return
        if resume is None:
            log.info("relocated %s from %s: paused, as asked", name, who)
        else:
            log.info("relocated %s from %s: running", name, who)

    def check_hello(self, hello: dict) -> tuple[str | None, int, int]:
        """The destination disk for the domain, the stream version to receive and the data
        channels granted, or Refused (specs/relocation.md, "HELLO checks")."""
        if hello["proto"] != PROTO:
            raise Refused(f"protocol version {hello['proto']} is not {PROTO}")
        versions = hello["stream_versions"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise Refused(f"HELLO stream_versions must be an array of ints, not {_short(versions)}")
        common = set(versions) & set(STREAM_VERSIONS)
        if not common:
            raise Refused(f"no common stream version (this host reads {STREAM_VERSIONS})")
        version = max(common)
        if version >= 2 or "cpu" in hello:
            self.check_cpu(hello)
        try:
            statedir.check_name(hello["name"])
        except ValueError as exc:
            raise Refused(str(exc)) from None
        memory = hello["memory"]
        if not memory_ok(memory):
            raise Refused(memory_problem(memory))
        vcpus = hello.get("vcpus", 1)
        if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= MAX_VCPUS:
            raise Refused(f"vcpus {_short(vcpus)} out of range (1 to {MAX_VCPUS})")
        asked = hello.get("channels", 0)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0:
            raise Refused(f"HELLO channels must be a count of data channels (an int, 0 or more), "
                          f"not {_short(asked)}")
        channels = min(asked, MAX_GRANTED_CHANNELS) if version >= 2 else 0
        if not isinstance(hello.get("handoff", False), bool):
            raise Refused(f"HELLO handoff must be a bool, not {_short(hello['handoff'])}")
        disk = hello["disk"]
        if disk is None:
            return None, version, channels
        if not hello["stub"]:
            raise Refused("a disk needs the device-model stub")
        mapped = self.config.disk_map.get(disk)
        if mapped is None:
            raise Refused(f"domain {hello['name']} has a disk ({disk}) and this host maps none: "
                          f"start hvm host serve with --disk-map {disk}=DST")
        return mapped, version, channels

    @staticmethod
    def check_cpu(hello: dict) -> None:
        """The CPUs the domain was given (HELLO ``cpu``) must run here: the same check as a
        restore's, before any page is sent (specs/cpu-models.md, "Compatibility")."""
        if "cpu" not in hello:
            raise Refused("HELLO lacks the CPU description (cpu) a version-2 stream needs")
        try:
            policies = policies_from_bodies(hello["cpu"])
        except (StreamError, RestoreError) as exc:
            raise Refused(f"HELLO cpu: {exc}") from None
        if Vm.GUEST not in policies or (Vm.STUB in policies) != bool(hello["stub"]):
            raise Refused("HELLO cpu does not describe the guest and (only with a stub) the stub")
        problems = []
        for vm, policy in policies.items():
            what = vm.name.lower()
            found = compatibility(policy, this_host())
            problems += [f"{what}: {p}" for p in found.problems]
        if problems:
            raise Refused(f"this host cannot run domain {hello['name']}'s CPU "
                          f"({policies[Vm.GUEST].model} model): {'; '.join(problems)}")

    def check_net(self, hello: dict) -> str | None:
        """The bridge or TAP device here for the domain's NIC (the same kind as on the
        source), or Refused (specs/relocation.md, "HELLO checks"). An interface name from
        the wire is only a key into --net-map."""
        net = hello.get("net")
        if net is None:
            return None
        if not isinstance(net, dict) or set(net) != {"link", "name"} or net["link"] not in ("tap", "bridge"):
            raise Refused("HELLO net must be nil or a map of link (tap or bridge) and name")
        try:
            check_ifname(net["name"])
        except NetError as exc:
            raise Refused(f"HELLO net: {exc}") from None
        if not hello["stub"]:
            raise Refused("a NIC needs the device-model stub")
        mapped = self.config.net_map.get(net["name"])
        if mapped is None:
            raise Refused(f"domain {hello['name']} has a NIC on {net['link']} {net['name']} and this host "
                          f"maps none: start hvm host serve with --net-map {net['name']}=DST")
        if net["link"] == "bridge" and not os.path.isdir(f"/sys/class/net/{mapped}/bridge"):
            raise Refused(f"--net-map {net['name']}={mapped}: there is no bridge {mapped} on this host")
        return mapped

    def check_huge_pages(self, name: str, memory: int) -> None:
        """With ``hugepages``: refuse a domain whose RAM the free 2 MiB huge pages cannot hold
        now (a guest being received has reserved its pages once its domain is made; one made
        meanwhile by another relocation fails there, saying so)."""
        if not self.config.hugepages:
            return
        free, total = huge_pages_free()
        if memory > free * HUGE_PAGE:
            raise Refused(f"no room for domain {name} in huge pages: it needs {memory >> 20} MiB and "
                          f"this host has {free} of {total} 2 MiB pages free ({HUGE_HINT}; "
                          f"hvm host serve --hugepages)")

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
            incoming.watch(ch)          # the domain process may fail while the source is quiet
            kind, message = ch.receive(FRAME_TIMEOUT)
            if kind == "data":
                incoming.feed(message)
            elif message["t"] == "SYNC":
                if message["bytes"] != incoming.bytes:
                    raise ChannelError(f"SYNC at {message['bytes']} bytes, received {incoming.bytes}")
                rounds = message.get("round", 0)
                if not isinstance(rounds, int) or isinstance(rounds, bool) or not 0 <= rounds < 1 << 32:
                    raise ChannelError("SYNC round must be a round count")
                ch.send("SYNCED", bytes=incoming.sync(rounds))
            elif message["t"] == "STREAM_END":
                incoming.stream_end_at = time.monotonic()
                trace.mark("D STREAM_END read")
                return
            else:
                raise ChannelError(f"expected DATA or STREAM_END, got {message['t']}")


__all__ = ["Incoming", "Refused", "RelocationServer", "ServeConfig", "parse_disk_map", "parse_net_map"]
