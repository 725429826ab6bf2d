"""The domain process: owns one domain, serves its control socket.

Started as ``python -m migrate.host.domaind DIR SPEC`` in one of three modes, by
:func:`migrate.host.control.create_domain` (create), :func:`migrate.host.control.restore_domain`
(restore) or the relocation daemon, :mod:`migrate.host.destination` (receive); SPEC and the
lines the process says on its ready pipe are declared in :mod:`migrate.host.launch`. The disk
image lock its launcher took (:mod:`migrate.locks`) is held for as long as the process lives
(WRITER; in receive mode INCOMING, WRITER from GO on). It boots (or restores) the domain,
writes its configuration to DIR/config.json (what ``hvm list`` shows of it should the process
be killed), says OK or ERROR on the ready pipe, then serves requests until it is told to
destroy the domain or is signalled. A process that ends removes its directory; one that is
killed leaves it, with its console log and process log, and the domain is listed as crashed.

In receive mode (specs/relocation.md, section 4) it restores from the stream pipe, says AT
after each chunk of the stream applied (and ROUND as the data channels end page rounds), and
OK (with the stream's length and the times END was read and the state applied) as soon as END
has been read and the state applied, before the stream's own end is seen, which the daemon
checks against the bytes it relayed; or ERROR. Then the process serves its control socket
(``hvm list`` shows the domain paused; ``unpause`` is refused) and waits for the relocation's
GO on the go pipe, answers RUNNING, or with ``go paused`` (the guest was paused at the source,
or ``hvm migrate --paused``) leaves it paused and answers PAUSED; or REFUSED when the pair
could not be resumed or its disk image could not be taken over (the guest never ran; the
process destroys it and exits), or ERROR for a failure after OK (the stream went on after
END). The go pipe closing without GO, or no GO within ``resume_timeout`` seconds, means the
relocation was given up: the paused copy is destroyed at once and the process exits. GO is
on the downtime path, so the control socket is made before the stream comes (under a
temporary name until the domain exists), config.json is written as soon as the domain is
made (at the stream's DOMAIN_CONFIG, long before the pause), and
GO is awaited as soon as the stream has been read to its end: if it comes within
EARLY_GO_WAIT (it normally follows OK by about a millisecond) it is taken there and then,
before the data plane is released and the process settles into serving.

The ``save`` operation runs in a thread of its own (the vCPU ioctls of the
state capture must come from this process) and answers on its connection
with progress messages ``{"progress": {...}}`` before the final reply; the
control loop keeps serving other clients meanwhile.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import logging.handlers
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path


from ..console import Console
from ..dataplane import DataplaneError, Receiver, TlsContext
from ..config import DomainStatus
from ..domain import Domain, DomainConfig, DomainError
from ..engine import (
    Convergence, RestoreError, SaveCancelled, SaveError, restore, save_to_file, save_to_stream,
)
from ..engine.channels import ChannelIntake
from ..engine.files import FileChunks
from ..engine.state import policies_from_bodies
from ..kvm import KvmError
from ..locks import DiskBusy, DiskLock
from ..stream import FORMAT_VERSION, StreamError, Vm
from ..text import SHOWN, one_line
from .. import trace
from . import launch, learned, protocol, statedir
from .launch import Create, Go, LaunchError, Receive, Restore, Say, say
from .channel import FRAME_TIMEOUT, ready, stream_cap

log = logging.getLogger("hvm.domaind")
GO_LOCK_WAIT = 0.5          # seconds GO may wait for the disk image lock the source lets go of
EARLY_GO_WAIT = 0.05        # seconds a received domain waits for GO before its clean-up (_receive)
ANSWER_LINGER = 5.0         # seconds data channel 0 stays open after the ANSWER to GO (_answer_go)
DESTROY_JOB_WAIT = 60.0     # seconds hvm destroy waits for a cancelled save or relocation to end


class ConsoleLog:
    """The console's bytes in console.log, as they come; the file keeps at most
    statedir.LOG_MAX of them, then it becomes console.log.1 (the one before goes) and a new
    one begins. Offsets count every byte written since the process began (``written``), so
    a reader following them (``hvm console --follow``) goes on across a move; what moved
    to console.log.1 before it read it, it misses (it is told where it went on)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "ab", buffering=0)
        self.size = self.file.tell()    # bytes in the file: counted here, not asked (a write per exit)
        self.base = 0           # bytes written before the file's first
        self.lock = threading.Lock()
        self.failed = False     # the last write failed (said once)

    @property
    def written(self) -> int:
        with self.lock:
            return self.base + self.size

    def write(self, data: bytes) -> None:
        """Never raises: the guest's console must not fail its vCPU (a full disk, or the file
        deleted by an operator, which the move to .1 then finds gone, costs log, no more)."""
        with self.lock:
            try:
                if self.size + len(data) > statedir.LOG_MAX and self.size:
                    self.base += self.size
                    try:
                        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    except FileNotFoundError:
                        pass            # deleted meanwhile: nothing to keep
                    self.file.close()
                    self.file = open(self.path, "ab", buffering=0)
                    self.size = self.file.tell()
                self.size += self.file.write(data) or 0
            except OSError as exc:
                if not self.failed:
                    log.error("console.log: %s; console output is not logged until it can be", exc)
                self.failed = True
            else:
                self.failed = False

    def read(self, offset: int, size: int) -> tuple[int, bytes]:
        """(the offset read from: ``offset``, or the file's first if that went before it,
        up to ``size`` bytes from there)."""
        with self.lock:
            start = max(offset, self.base)
            with open(self.path, "rb") as f:
                f.seek(start - self.base)
                return start, f.read(size)

    def close(self) -> None:
        self.file.close()


class DomainServer:
    """The control socket of one domain. ``hidden``: bound under a temporary name until
    :meth:`publish` (a received domain's socket is made before its stream arrives and
    shown once its state is applied); ``domain`` may be set later, before serving."""

    def __init__(self, directory: Path, domain: Domain | None, console_log, hidden: bool = False):
        self.dir = directory
        self.domain = domain
        self.console_log = console_log
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.hidden = directory / statedir.HIDDEN_SOCKET if hidden else None
        self.listener.bind(str(self.hidden or directory / statedir.SOCKET))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.running = True
        self.save_thread: threading.Thread | None = None
        self.save_cancel = threading.Event()
        self.saving = False             # from a save's start until just before its reply
        self.go: tuple[int, int, str] | None = None     # awaiting GO: go pipe, ready pipe, log line
        self.go_deadline: float | None = None
        self.handoff = None             # awaiting GO on data channel 0 too (a dataplane.Handoff)
        self.answered = None            # (channel 0 after its ANSWER, when it is closed)
        self.disk_lock: DiskLock | None = None     # the disk image's lock, held for the process's life
        self.destroying = ""        # what destroys it ('hvm destroy', a signal): a job in progress ends with it
        self.moved_to: str | None = None            # HOST:PORT a relocation moved the guest to
        self.note = ""                              # what an operator must know (outcome unknown)
        self.failed = False                         # a bug ended it: keep the directory and logs

    def publish(self) -> None:
        if self.hidden is not None:
            os.rename(self.hidden, self.dir / statedir.SOCKET)
            self.hidden = None

    # -- a received domain awaiting GO (receive mode, module docstring) --------
    def await_go(self, go_fd: int, ready_fd: int, timeout: float, note: str, handoff=None) -> None:
        """Await GO on the go pipe, and on data channel 0 (``handoff``, READY said) when the
        relocation has it: whichever comes first is taken (specs/relocation.md, "The
        handoff on channel 0")."""
        self.go = (go_fd, ready_fd, note)
        self.go_deadline = time.monotonic() + timeout
        os.set_blocking(go_fd, False)
        self.sel.register(go_fd, selectors.EVENT_READ, "go")
        if handoff is not None:
            self.handoff = handoff
            self.sel.register(handoff.fileno(), selectors.EVENT_READ, "handoff")

    def take_go(self, wait: float) -> None:
        """Handle GO at once if it comes within ``wait`` seconds (else serve() will)."""
        if self.go is None:
            return
        fds = {self.go[0]: select.POLLIN}
        if self.handoff is not None:
            fds[self.handoff.fileno()] = select.POLLIN
        got = ready(fds, wait)
        if self.handoff is not None and self.handoff.fileno() in got:
            self._on_handoff()
        if self.go is not None and self.go[0] in got:
            self._on_go()

    def _on_go(self) -> None:
        if self.go is None:     # a destroy in the same select() batch ended the wait first
            return
        try:
            word = os.read(self.go[0], 16)
        except BlockingIOError:
            return
        trace.mark("R GO read")
        self._take(Go.decode(word))

    def _on_handoff(self) -> None:
        """Data channel 0 readable: GO, once it has come whole. The daemon is told TAKEN
        before anything is resumed, so that it never takes a copy that may have run for one
        that did not. A channel 0 that fails is dropped: GO comes down the go pipe."""
        if self.go is None or self.handoff is None:
            return
        try:
            paused = self.handoff.go()
        except DataplaneError as exc:
            log.warning("%s: GO is awaited from the daemon", exc)
            self._drop_handoff()
            return
        if paused is None:
            return
        trace.mark("R GO read")
        try:
            os.write(self.go[1], say(Say.TAKEN, time.monotonic()))
        except OSError as exc:  # its daemon cannot hear it: a copy it might kill unheard runs not
            log.warning("GO came on data channel 0, but the daemon cannot be told (%s): refused", exc.strerror)
            self._refuse_go()
            self.running = False
            return
        self._take(Go(paused), keep_pipe=True)

    def _take(self, go: Go | None, keep_pipe: bool = False) -> None:
        """GO (None: the daemon gave the relocation up, closing the go pipe): resume, or keep
        paused, and answer on the ready pipe and on data channel 0 if it carries the
        handoff, whichever way GO came (the source asks channel 0 when its control
        connection fails it)."""
        if go is None:
            log.warning("the relocation was given up before GO: destroying the domain")
            self._refuse_go()
            self.running = False
            return
        _, ready_fd, note = self.go
        handoff = self._end_go_wait(keep_pipe)
        try:
            if self.disk_lock is not None:      # the source let go of it just before GO
                self.disk_lock.take_writer(wait=GO_LOCK_WAIT)
                self.disk_lock.release_incoming()
            if go.paused:       # the daemon is told first, channel 0 then (Incoming.withdraw)
                self._say(ready_fd, say(Say.PAUSED))
                self._answer_go(handoff, "paused")
                log.info("%s; left paused, as it was at the source", note)
                return
            self.domain.resume()
            trace.mark("R resumed")
        except (DomainError, KvmError, DiskBusy) as exc:
            log.error("resume after GO failed: %s", exc)
            self._say(ready_fd, say(Say.REFUSED, text=str(exc)))
            self._answer_go(handoff, "refused")
            self.running = False
            return
        self._say(ready_fd, say(Say.RUNNING, self.domain.entered() or time.monotonic()))
        trace.mark("R RUNNING said")
        self._answer_go(handoff, "running")
        log.info("%s; running", note)

    def _end_go_wait(self, keep_pipe: bool = False):
        """No more waiting for GO: the go pipe closed (kept open after GO on channel 0,
        where the daemon's own GO may still be written); returns channel 0 if it carries
        the handoff, for the answer (:meth:`_answer_go`)."""
        go_fd = self.go[0]
        self.sel.unregister(go_fd)
        if not keep_pipe:               # kept, it stays open for the process's life
            os.close(go_fd)
        self.go, self.go_deadline = None, None
        return self._release_handoff()

    def _refuse_go(self, text: str = "") -> None:
        """No GO will be taken: refused on data channel 0 (if it carries the handoff), and
        to the daemon (REFUSED saying ``text``; without one, the ready pipe only closed)."""
        ready_fd = self.go[1]
        handoff = self._end_go_wait()
        if text:
            self._say(ready_fd, say(Say.REFUSED, text=text))
        else:
            os.close(ready_fd)
        self._answer_go(handoff, "refused")

    def _answer_go(self, handoff, answer: str) -> None:
        """What became of GO, on data channel 0 (a dataplane.Handoff; None: none): then its
        writing half ended, and the channel kept ANSWER_LINGER seconds (:meth:`serve`
        closes it), so that a GO still coming cannot make its close reset the connection
        before the source has read the answer."""
        if handoff is None:
            return
        try:
            handoff.answer(answer)
        except DataplaneError as exc:
            log.warning("%s", exc)
            handoff.close()
            return
        handoff.finish()
        if self.answered is not None:
            self.answered[0].close()
        self.answered = (handoff, time.monotonic() + ANSWER_LINGER)

    def _release_handoff(self):
        """Channel 0 no longer awaited (None if it was not)."""
        handoff, self.handoff = self.handoff, None
        if handoff is not None:
            self.sel.unregister(handoff.fileno())
        return handoff

    def _drop_handoff(self) -> None:
        if (handoff := self._release_handoff()) is not None:
            handoff.close()

    @staticmethod
    def _say(fd: int, line: bytes) -> None:
        try:
            os.write(fd, line)
        except OSError:
            pass                # the daemon is gone
        os.close(fd)

    # -- requests ------------------------------------------------------------
    def op_info(self, req: dict) -> dict:
        dom, cfg = self.domain, self.domain.config
        return {"name": cfg.name, "workload": cfg.workload, "memory": cfg.memory,
                "memory_ranges": _memory_ranges(dom),
                "hugepages": cfg.hugepages, "vcpus": cfg.vcpus, "status": dom.status,
                "crash_reason": dom.crash_reason,
                "pid": os.getpid(), "uptime": round(time.time() - self.started, 3),
                "console_bytes": self.console_log.written, "args": list(cfg.args),
                "timer_hz": cfg.timer_hz, "stub": cfg.stub, "disk": cfg.disk, "net": cfg.net,
                "ioreqs": dom.stub.requests if dom.stub else 0,
                "cpu": dom.cpu.model, "cpu_vendor": dom.cpu.vendor, "tsc_khz": dom.cpu.tsc_khz,
                "cpu_notes": list(dom.cpu_notes), "nic": _nic_info(dom),
                "awaiting_go": self.go is not None,
                "job": self.save_thread.name if self.saving else None,     # save | migrate
                "note": self.note, "moved_to": self.moved_to}

    def op_pause(self, req: dict) -> dict:
        self._no_save_running("pause")
        self._not_stopped("pause")      # a pause of a guest that will not run again did nothing
        self.domain.pause()
        return {"status": self.domain.status}

    def op_unpause(self, req: dict) -> dict:
        self._no_save_running("unpause")
        self._no_go_awaited("unpause")
        self._not_stopped("unpause")
        if self.disk_lock is not None and not self.disk_lock.writer:    # a relocation let it go
            try:
                self.disk_lock.take_writer()
            except DiskBusy as exc:
                raise ValueError(f"cannot unpause: {exc}") from None
        self.domain.resume()
        self.note = ""
        return {"status": self.domain.status}

    def op_destroy(self, req: dict) -> dict:
        """Destroy the domain. A save or relocation in progress is cancelled first and
        awaited: a relocation past its GO cannot be, and then the guest has moved."""
        self.destroying = "'hvm destroy'"
        self.save_cancel.set()          # a save in progress stops and cleans up
        self.running = False
        if self.go is not None:         # received here, awaiting GO: it never ran, and the source is to know
            self._refuse_go("destroyed here before GO")     # a GO still to come meets a closed pipe
        if self.save_thread is not None and self.save_thread is not threading.current_thread():
            self.save_thread.join(DESTROY_JOB_WAIT)
        if self.moved_to:
            return {"status": DomainStatus.MOVED, "moved_to": self.moved_to}
        return {"status": DomainStatus.DESTROYED}

    def guest(self) -> str:
        """Where the guest is, as a job's answer says it: "running here", "paused here", ...
        ("being destroyed here" once hvm destroy came, or a signal ends the process)."""
        return "being destroyed here" if self.destroying else f"{self.domain.status} here"

    def _not_stopped(self, what: str) -> None:
        """ValueError if the guest will not run again here (saved and destroyed, moved, ended)."""
        status = self.domain.status
        if status.stopped:
            raise ValueError(f"cannot {what}: {self.domain.config.name} "
                             + (f"moved to {self.moved_to}" if self.moved_to else f"is {status} here"))

    def _no_go_awaited(self, what: str) -> None:
        if self.go is not None:
            raise ValueError(f"cannot {what}: this domain is being relocated here and awaits "
                             f"the source's GO")

    def _no_save_running(self, what: str) -> None:
        if self.saving:
            job = "relocation" if self.save_thread is not None and self.save_thread.name == "migrate" else "save"
            name = self.domain.config.name
            # the guest as it is now: what the job makes of it is the job's to say
            now = (f"{name} has moved to {self.moved_to}" if self.moved_to else
                   f"{name} is {self.domain.status} here meanwhile")
            raise ValueError(f"cannot {what}: a {job} is in progress; {now}")

    def op_console(self, req: dict) -> dict:
        offset = req.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError("offset must be a non-negative integer")
        offset, data = self.console_log.read(offset, protocol.CONSOLE_CHUNK)
        return {"data": data, "next": offset + len(data), "status": self.domain.status}

    def op_input(self, req: dict) -> dict:
        data = req.get("data")
        if not isinstance(data, bytes) or len(data) > protocol.INPUT_CHUNK:
            raise ValueError(f"input must be at most {protocol.INPUT_CHUNK} bytes")
        self._no_save_running("send input")     # it would not be in the stream: the copy never reads it
        self._not_stopped("send input")
        self.domain.send_input(data)
        return {"queued": len(data)}

    OPS = {"info": op_info, "pause": op_pause, "unpause": op_unpause,
           "destroy": op_destroy, "console": op_console, "input": op_input}

    def handle(self, req: dict) -> dict:
        op = self.OPS.get(req.get("op"))
        if op is None:
            return {"ok": False, "error": f"unknown operation {req.get('op')!r}"}
        try:
            return {"ok": True, **op(self, req)}
        except (DomainError, KvmError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}

    # -- the loop ------------------------------------------------------------
    def serve(self) -> None:
        while self.running:
            if self.answered is not None and time.monotonic() > self.answered[1]:
                self.answered[0].close()
                self.answered = None
            if self.go_deadline is not None and time.monotonic() > self.go_deadline:
                log.warning("no GO in time after a relocation: destroying the domain")
                self._refuse_go("no GO in time: destroyed here before GO")
                break
            for key, _ in self.sel.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                elif key.data == "go":
                    self._on_go()
                elif key.data == "handoff":
                    self._on_handoff()
                else:
                    self._serve_client(key.fileobj, key.data)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        conn.settimeout(5)
        self.sel.register(conn, selectors.EVENT_READ, protocol.unpacker())

    def _serve_client(self, conn: socket.socket, unpack) -> None:
        fds: list[int] = []         # only a save to standard output sends one (SaveJob)
        try:
            req = protocol.receive(conn, unpack, fds)
            if req.get("op") in ("save", "migrate"):
                start = self.start_save if req["op"] == "save" else self.start_migrate
                reply = start(conn, req, fds)
                if reply is None:       # the save thread owns the connection now
                    self.sel.unregister(conn)
                    return
                protocol.send(conn, reply)
                return
            protocol.send(conn, self.handle(req))
        except (protocol.ProtocolError, OSError) as exc:
            if not isinstance(exc, protocol.ProtocolError) or str(exc) != "connection closed":
                log.warning("control connection dropped: %s", exc)
            self.sel.unregister(conn)
            conn.close()
        finally:
            for fd in fds:          # a job that took one removed it from the list
                os.close(fd)

    # -- save ------------------------------------------------------------------
    def start_save(self, conn: socket.socket, req: dict, fds: list[int]) -> dict | None:
        return self._start_job(conn, req, "save", lambda r: SaveJob.from_request(r, fds), self._run_save)

    def start_migrate(self, conn: socket.socket, req: dict, fds: list[int]) -> dict | None:
        from .source import MigrateJob
        return self._start_job(conn, req, "migrate", MigrateJob.from_request, self._run_migrate)

    def _start_job(self, conn, req: dict, what: str, parse, run) -> dict | None:
        """Check a save or migrate request and start its thread (None), or an error
        reply. One such job at a time: they share the cancel event and the thread."""
        try:
            self._no_save_running(what)
            self._no_go_awaited(what)
            if not self.domain.status.live:
                raise ValueError(f"domain is {self.domain.status}: nothing to {what}")
            job = parse(req)            # last: a job may own a descriptor from here on
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        self.save_cancel.clear()
        self.saving = True
        self.save_thread = threading.Thread(target=self._job, args=(run, conn, job), name=what, daemon=True)
        self.save_thread.start()
        return None

    def _job(self, run, conn: socket.socket, job) -> None:
        """A job's thread: a bug in it is logged with its traceback, and the domain process
        then ends (its domain in an unknown state is not left for more requests)."""
        try:
            run(conn, job)
        except BaseException:
            log.exception("%s job failed unexpectedly: the domain process ends",
                          threading.current_thread().name)
            self.failed = True          # its directory stays: listed crashed, logs kept
            self.saving = False
            self.running = False
            conn.close()

    def _run_save(self, conn: socket.socket, job: "SaveJob") -> None:
        dom = self.domain
        was_running = dom.status is DomainStatus.RUNNING
        watch = ClientWatch(conn, self.save_cancel)
        # A checkpoint's guest runs again as soon as its stream is written, before the
        # file is synced to disk: the pause lasts no longer than the save needs it.
        resume = dom.resume if job.checkpoint and was_running else None
        options = dict(compress=job.level, live=job.live, stats_cb=watch.progress,
                       cancel=self.save_cancel, convergence=job.convergence, on_written=resume)
        watch.poll()
        try:
            try:
                if job.fd is not None:
                    stats = save_to_stream(dom, job.fd, **options)
                else:
                    stats = save_to_file(dom, job.path, **options)
            finally:
                watch.stop()        # before the reply: a next save must not meet this one's watch
        except Exception as exc:      # anything: the domain goes on as before
            log.warning("save to %s failed: %s", job.target, exc)
            if was_running and dom.status is DomainStatus.PAUSED:
                dom.resume()
            self.saving = False
            watch.reply({"ok": False, "error": f"save failed: {exc}; {self.where('save')}",
                         "kind": "failed", "guest": self.guest()})
        else:
            if not job.checkpoint:
                dom.destroy()
                self.running = False
            log.info("saved to %s (%d bytes, %s)", job.target, stats.stream_bytes,
                     "kept" if job.checkpoint else "destroyed")
            self.saving = False
            watch.reply({"ok": True, "path": job.target, "status": dom.status,
                         "stats": stats.as_dict(), "input_left": dom.input_held})
        finally:
            if job.fd is not None:
                os.close(job.fd)
            conn.close()

    def where(self, job: str) -> str:
        """The end of a failed job's message: where the guest is now."""
        name, status = self.domain.config.name, self.domain.status
        if self.destroying:
            return f"{name} was destroyed here by {self.destroying} during the {job}"
        return {"running": f"{name} keeps running here", "paused": f"{name} stays paused here"}.get(
            status, f"{name} is {status} here")

    # -- migrate (specs/relocation.md; the work is in migrate.host.source) -------
    def _run_migrate(self, conn: socket.socket, job) -> None:
        from .source import OutcomeUnknown, RelocationError
        watch = ClientWatch(conn, self.save_cancel)
        job.disk_lock = self.disk_lock
        job.learned = self.dir.parent / learned.FILE
        try:
            stats = job.run(self.domain, watch.progress, self.save_cancel, before_go=watch.check)
        except OutcomeUnknown as exc:       # after GO: kept paused, the message says what to do
            log.warning("migrate to %s:%d: %s", job.host, job.port, exc)
            self.note = str(exc)            # hvm info says it too, should the client be gone
            self.saving = False
            here = "being destroyed here" if self.destroying else "paused here"
            watch.reply({"ok": False, "error": str(exc), "status": self.domain.status, "kind": "unknown",
                         "guest": f"{here}, perhaps running on {job.host}"})
        except RelocationError as exc:      # running as before, or paused as before
            log.warning("migrate to %s:%d failed: %s", job.host, job.port, exc)
            self.saving = False
            watch.reply({"ok": False, "error": f"{exc}; {self.where('relocation')}",
                         "status": self.domain.status, "kind": "failed", "guest": self.guest()})
        else:
            self.moved_to = f"{job.host}:{job.port}"
            try:        # for an hvm destroy that comes once the control socket is gone
                (self.dir / statedir.MOVED).write_text(self.moved_to)
            except OSError as exc:
                log.warning("could not note the move in %s: %s", self.dir, exc.strerror)
            self.domain.destroy()
            self.running = False
            log.info("relocated to %s:%d (%d bytes, downtime %.1f ms)", job.host, job.port,
                     stats["bytes"], stats["downtime"] * 1000)
            self.saving = False
            watch.reply({"ok": True, "status": DomainStatus.DESTROYED, "stats": stats,
                         "input_left": self.domain.input_held})
        finally:
            conn.close()

    def close(self) -> None:
        """Stop serving, then end the job and the domain. The control socket goes first: a
        process on its way out is not listed (a live one whose socket is there but does not
        answer is listed unresponsive: control.unanswered_info)."""
        ENDING.setdefault("closing", "")        # a signal from here on interrupts no clean-up
        (self.hidden or self.dir / statedir.SOCKET).unlink(missing_ok=True)     # before the listener
        self.sel.close()                # closes: a client in between would be refused, not told "ending"
        self.listener.close()
        if self.save_thread is not None:
            # the domain goes with the process: a job that ends now must not say it stays
            self.destroying = self.destroying or ENDING.get("by") or "its domain process ending"
            self.save_cancel.set()
            self.save_thread.join(30)
        if self.domain is not None:
            self.domain.destroy()


def _memory_ranges(dom: Domain) -> list:
    """[address, bytes] per RAM range, for info; none once its memory is gone (destroyed,
    by a job's thread, perhaps just now)."""
    try:
        return [] if dom.status is DomainStatus.DESTROYED else \
            [[r.first_pfn << 12, len(r.view)] for r in dom.memory_ranges()]
    except ValueError:                  # released under us
        return []


def _nic_info(dom: Domain) -> dict | None:
    """The NIC's TAP device and counters, for info."""
    net = dom.stub.net if dom.stub is not None else None
    if net is None:
        return None
    return {"ifname": net.ifname, **net.stats, "guest_exits": dom.vcpu.exits}


class SaveJob:
    """A save request: ``path`` (absolute), or ``to_fd`` true with one file descriptor
    passed with the request (``hvm save NAME -``: the client's standard output); ``mode``
    ``stop`` (default: destroy after a successful save), ``checkpoint`` (keep running),
    ``live`` (pre-copy, then stop) or ``live-checkpoint``; ``compress`` None or a zstd
    level; for the live modes, the other convergence keys of a migrate request
    (protocol.CONVERGENCE_KEYS). ``fd``: this job's own copy of the passed descriptor."""

    MODES = {"stop": (False, False), "checkpoint": (False, True), "live": (True, False),
             "live-checkpoint": (True, True)}

    def __init__(self, path: Path | None, live: bool, checkpoint: bool, level: int | None,
                 convergence: Convergence | None = None, fd: int | None = None):
        self.path, self.live, self.checkpoint, self.level = path, live, checkpoint, level
        self.convergence = convergence
        self.fd = fd
        self.target = str(path) if path is not None else "standard output"

    @classmethod
    def from_request(cls, req: dict, fds=()) -> "SaveJob":
        path, mode, to_fd = req.get("path"), req.get("mode", "stop"), req.get("to_fd", False)
        if to_fd is not True and (not isinstance(path, str) or not os.path.isabs(path)):
            raise ValueError("save needs an absolute path")
        if to_fd is True and len(fds) != 1:
            raise ValueError("a save to a descriptor needs one passed with the request")
        if mode not in cls.MODES:
            raise ValueError(f"save mode {mode!r} is not one of {', '.join(cls.MODES)}")
        live, checkpoint = cls.MODES[mode]
        asked = [k for k in protocol.CONVERGENCE_KEYS if k != "compress" and req.get(k) is not None]
        if asked and not live:
            raise ValueError(f"save: {', '.join(asked)} apply to a live save only")
        convergence, level = protocol.convergence_from_request(req, "save")
        if to_fd is True:       # last: from here on the job owns a descriptor
            return cls(None, live, checkpoint, level, convergence, fd=os.dup(fds[0]))
        return cls(Path(path), live, checkpoint, level, convergence)


class ClientWatch:
    """The save's connection: progress out, and a client that went away (closed, or
    Ctrl-C) cancels the save: seen at each progress report, and, once :meth:`poll` has
    started it, looked for every CLIENT_POLL seconds until :meth:`stop` (a paced round's
    data plane call can last a minute, with no report in between)."""

    def __init__(self, conn: socket.socket, cancel: threading.Event):
        self.conn, self.cancel = conn, cancel
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def poll(self) -> None:
        def watch():
            while not self.stopped.wait(CLIENT_POLL) and not self.cancel.is_set():
                if self.gone():
                    self.cancel.set()       # the save stops at once, and says so (SaveCancelled)
                    return
        self.thread = threading.Thread(target=watch, name="client-watch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """No cancel comes from the watch after this returns."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def gone(self) -> bool:
        try:
            readable = ready({self.conn: select.POLLIN}, 0)
            return bool(readable) and self.conn.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):       # ValueError: closed here already
            return True

    def check(self) -> None:
        """SaveCancelled if the job is cancelled, or its client went away (Ctrl-C)."""
        if self.cancel.is_set() or self.gone():
            self.cancel.set()
            raise SaveCancelled("cancelled")

    def progress(self, stats) -> None:
        if self.gone():
            self.cancel.set()
            raise SaveCancelled("the client went away")
        try:
            protocol.send(self.conn, {"progress": stats.as_dict()})
        except OSError:
            self.cancel.set()
            raise SaveCancelled("the client went away") from None

    def reply(self, message: dict) -> None:
        try:
            protocol.send(self.conn, message)
        except OSError as exc:
            log.warning("save reply not delivered: %s", exc)


CLIENT_POLL = 0.2               # seconds between two looks for a save's client gone
RESTORE_PROGRESS_EVERY = 1.0    # seconds between two AT lines of a restore from a file or pipe


def _build(job: Create | Restore | Receive, console: Console, server: DomainServer | None,
           ready_fd: int) -> tuple[Domain, bool, str]:
    """The domain this process runs, whether to leave it paused, and a line to log once
    it is started. ``server``: receive mode's control socket."""
    if isinstance(job, Restore):
        def make(cfg: DomainConfig, **cpu) -> Domain:
            mapped = {"disk": job.disk} if job.disk else {}
            if job.net and cfg.net:
                mapped["net"] = dict(cfg.net, name=job.net)
            return Domain(dataclasses.replace(cfg, **mapped), console, **cpu)

        said = [time.monotonic()]

        def progress(stats) -> None:        # the launcher waits for a line at least once a minute
            if time.monotonic() - said[0] >= RESTORE_PROGRESS_EVERY:
                os.write(ready_fd, say(Say.AT, stats.stream_bytes))
                said[0] = time.monotonic()

        domain, stats = restore(_stream_chunks(job.stream_fd, job.head_fd), name=job.name or None,
                                make_domain=make, fresh_stub=job.fresh_stub, progress=progress)
        return domain, job.paused, (f"restored: {stats.pages_total} pages, {stats.stream_bytes} bytes "
                                    f"in {stats.seconds:.3f}s")
    if isinstance(job, Receive):        # its line is logged at GO (_receive)
        return _receive(job, console, ready_fd, server)[0], True, ""
    return Domain.boot(DomainConfig(**job.config), console), False, ""


def _check_disk_is_locked_one(domain: Domain, disk_lock: DiskLock | None) -> None:
    """The disk image the domain opened (by its path) must be the file its launcher checked
    and locked (the lock's descriptor): a file put in its place meanwhile is refused, the
    domain destroyed before it ran (DomainError)."""
    backend = domain.stub.backend if domain.stub is not None else None
    if disk_lock is None or backend is None:
        return
    locked, opened = os.fstat(disk_lock.fd), os.fstat(backend.fd)
    if (locked.st_dev, locked.st_ino) != (opened.st_dev, opened.st_ino):
        domain.destroy()
        raise DomainError(f"the disk image at {one_line(backend.path, SHOWN)} is not the file that was checked "
                          "and locked: it was replaced meanwhile")


def _stream_chunks(fd: int, head_fd: int) -> FileChunks:
    """The stream a restore reads once: the bytes in the memfd ``head_fd`` (-1: none; what
    the launcher read from a pipe to learn the domain's name), then the rest from ``fd``
    (both closed once read)."""
    return FileChunks(([head_fd] if head_fd >= 0 else []) + [fd])


def _receive(job: Receive, console: Console, ready_fd: int, server: DomainServer):
    """Restore an incoming relocation (``job``: launch.Receive; specs/relocation.md, "The
    stream"): the stream must match HELLO (``memory``, ``stub``, ``disk_from``, ``net_from``,
    ``vcpus``), the domain is named ``name``, its disk is the destination's ``disk_to`` and
    its NIC hangs on the destination's ``net_to``. After each chunk it applies, an AT line
    on the ready pipe tells the daemon how far it is (SYNC); once the state is applied, the
    control socket ``server`` is shown (the paused domain is listed from RESTORED on) and OK
    is said (module docstring). The vCPU thread is
    started, parked, as soon as the domain is made, so that GO
    (:meth:`DomainServer.await_go`) only has to wake it."""
    def make(cfg: DomainConfig, **cpu) -> Domain:
        net_from = {"link": cfg.net["link"], "name": cfg.net["name"]} if cfg.net else None
        if ((cfg.memory, bool(cfg.stub), cfg.disk, net_from, cfg.vcpus)
                != (job.memory, job.stub, job.disk_from, job.net_from, job.vcpus)):
            raise RestoreError("stream does not match HELLO (memory, stub, disk, NIC or vCPUs differ)")
        if job.cpu is not None:
            hello = policies_from_bodies(job.cpu)
            if (hello.get(Vm.GUEST), hello.get(Vm.STUB)) != (cpu["cpu"], cpu["stub_cpu"]):
                raise RestoreError("stream does not match HELLO (the CPU records differ)")
        net = dict(cfg.net, name=job.net_to) if cfg.net else None
        domain = Domain(dataclasses.replace(cfg, disk=job.disk_to, net=net, hugepages=job.hugepages),
                        console, **cpu)
        domain.park_vcpu()
        # now, not at the handoff: this write took 0.3-0.4 ms, and GO waited on it (traced)
        _write_config(server.dir, domain.config)
        return domain

    def progress(stats) -> None:
        if not stats.applied_at:
            os.write(ready_fd, say(Say.AT, stats.stream_bytes))

    intake, rounds = _channel_intake(job, ready_fd)
    handoff = None          # data channel 0 once READY went on it (applied), for GO to come on (complete)

    def applied(domain, stats) -> None:
        if rounds is not None:
            rounds.stop()               # its lines come before ok, none after
        nonlocal handoff
        if job.handoff:     # first: GO is taken only after ok (complete), whichever comes first
            handoff = _ready(intake)
            trace.mark("R READY said")
        server.domain = domain
        server.publish()                # listed from RESTORED on (specs/relocation.md)
        os.write(ready_fd, say(Say.OK, stats.stream_bytes, stats.end_at, stats.applied_at))
        trace.mark("R OK said")

    def complete(domain, stats) -> None:
        # GO comes about a millisecond after OK: await it now that nothing can fail the
        # restore, and take it at once if it comes soon, before the clean-up (the data
        # plane's release) rather than after it
        server.await_go(job.go_fd, os.dup(ready_fd), job.resume_timeout,
                        f"received {job.name}: {stats.pages_total} pages, {stats.stream_bytes} bytes "
                        f"in {stats.seconds:.3f}s", handoff)
        server.take_go(EARLY_GO_WAIT)


    try:
        return restore(FileChunks([job.stream_fd]), name=job.name, make_domain=make, progress=progress,
                       on_applied=applied, on_complete=complete, channels=intake,
                       warm=job.live)      # offline, the source is paused already
    finally:
        if rounds is not None:
            rounds.stop()


def _channel_intake(job: Receive, ready_fd: int):
    """With data channels (specs/relocation.md, "Data channels"): the intake that receives
    them (their sockets come from the daemon on the unix socket ``channel_fd``; TLS with
    the daemon's keys), and the reporter of the rounds they end (``round N`` lines, for
    SYNC). Without: (None, None)."""
    if not job.channels:
        os.close(job.channel_fd)
        return None, None
    tls_ctx = TlsContext(True, job.tls_dir) if job.tls_dir else None
    receiver = Receiver(job.channels, FORMAT_VERSION, job.token, tls_ctx, timeout=FRAME_TIMEOUT,
                        cap=stream_cap(job.memory), handoff=job.handoff)
    intake = ChannelIntake(receiver, socket.socket(fileno=job.channel_fd))
    return intake, _RoundReporter(intake, ready_fd)


def _ready(intake: ChannelIntake):
    """READY on data channel 0 (specs/relocation.md, "The handoff on channel 0"): the
    channel, taken from the intake for GO to come on; None if it failed (logged: GO then
    comes down the go pipe only)."""
    handoff = None
    try:
        handoff = intake.receiver.handoff()
        handoff.ready()
    except DataplaneError as exc:
        log.warning("no handoff on data channel 0: %s", exc)
        if handoff is not None:
            handoff.close()
        return None
    return handoff


CHANNELS_EVERY = 0.5        # seconds between two CHANNELS lines while the channels carry bytes


class _RoundReporter:
    """Says ROUND on the ready pipe each time every data channel has ended another
    page round (N rounds ended), and CHANNELS (the bytes they carried) at most every
    CHANNELS_EVERY seconds while that grows, until stopped; and ERROR as soon as a channel
    fails, since the daemon may otherwise not hear of it before the source's next frame.
    CHANNELS is the round's sign of life: the control connection is quiet while the pages
    go on the channels, and the daemon waits for the source's next frame only so long
    without one (specs/relocation.md, "Data channels")."""

    def __init__(self, intake, ready_fd: int):
        self.intake, self.ready_fd = intake, ready_fd
        self.lock = threading.Lock()        # a line is said whole, and never after stop()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="channel-rounds", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        done, carried, said_at = 0, 0, time.monotonic()
        while not self.stopped:
            try:
                if time.monotonic() - said_at >= CHANNELS_EVERY and (now := self.intake.bytes()) > carried:
                    carried, said_at = now, time.monotonic()
                    self._tell(say(Say.CHANNELS, carried))
                if self.intake.wait_round(done, timeout=0.2):
                    done += 1
                    # the last round (its syncs FINAL) comes in the pause, and no SYNC asks
                    # for it: saying it would wake the daemon then for nothing
                    if not self.intake.ended_final(done - 1):
                        self._tell(say(Say.ROUND, done))
            except RestoreError as exc:
                self._tell(say(Say.ERROR, text=str(exc)), last=True)
                return
            except OSError:
                return

    def _tell(self, line: bytes, last: bool = False) -> None:
        """Say ``line`` whole, unless stopped (``last``: and stop)."""
        with self.lock:
            if not self.stopped:
                self.stopped = last
                os.write(self.ready_fd, line)

    def stop(self) -> None:
        """No line after this returns (it does not wait for the thread: ok is on the
        downtime path)."""
        with self.lock:
            self.stopped = True


ENDING: dict[str, str] = {}     # "by": what ended the process, once a signal did; "closing": it ends
SERVING: list = []              # the DomainServer whose loop a signal ends, once it serves


def _end_by_signal(signum: int, frame) -> None:
    """SIGTERM or SIGINT: the process ends, and its domain with it (DomainServer.close).
    A serving process's loop is told to end (within its select's 0.5 s), rather than an
    exception raised wherever the main thread is; before it serves, it exits at once.
    Once it is ending (a signal came, or the server closes), another one changes nothing:
    it would cut the clean-up short (the domain listed as crashed instead of gone)."""
    if ENDING:
        return
    ENDING["by"] = f"{signal.Signals(signum).name} to its domain process"
    if SERVING:
        SERVING[0].running = False
        return
    sys.exit(0)


def main(argv: list[str]) -> int:
    try:
        directory, spec = launch.decode(argv)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ready_fd, lock_fd, job = spec.ready_fd, spec.lock_fd, spec.job
    # Double fork: the launcher reaps our parent at once and init adopts us,
    # so a domain never lingers as its launcher's zombie.
    if os.fork():
        os._exit(0)
    (directory / statedir.PIDFILE).write_text(f"{os.getpid()}\n")
    # a guest can make a domain log a lot (refused accesses, its stub's lines): on disk,
    # the log keeps its last LOG_MAX bytes and as many before
    handler = logging.handlers.RotatingFileHandler(directory / statedir.LOGFILE, maxBytes=statedir.LOG_MAX,
                                                   backupCount=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[handler])
    # the downtime path (capture, state, apply, resume) runs on one thread while others
    # (control, channel rounds, vCPU exits) take the GIL now and then: hand it over within
    # 0.5 ms, not CPython's default 5 ms, so a handover never costs milliseconds of downtime
    sys.setswitchinterval(0.0005)
    ready = os.fdopen(ready_fd, "w")
    # a fatal signal's traceback: into a file of its own, which no rotation of domain.log
    # takes away (faulthandler writes to the descriptor it was given, whatever its name is now)
    crash_log = open(directory / statedir.FATAL, "a")
    faulthandler.enable(crash_log)
    sys.excepthook = lambda *info: log.critical("uncaught exception", exc_info=info)
    threading.excepthook = lambda a: log.critical("uncaught exception in thread %s", a.thread,
                                                  exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    signal.signal(signal.SIGTERM, _end_by_signal)
    signal.signal(signal.SIGINT, _end_by_signal)
    console_log = ConsoleLog(directory / statedir.CONSOLE)
    receive = isinstance(job, Receive)
    disk_lock = DiskLock.from_fd(os.readlink(f"/proc/self/fd/{lock_fd}"), lock_fd, receive) \
        if lock_fd is not None else None
    server = None
    try:
        if receive:     # its control socket first: after the stream, GO must not wait for it
            server = DomainServer(directory, None, console_log, hidden=True)
            server.disk_lock = disk_lock        # GO takes it over (DomainServer.take_go)
        domain, paused, note = _build(job, Console(sink=console_log.write), server, ready_fd)
        if not receive:
            _check_disk_is_locked_one(domain, disk_lock)
    except (DomainError, KvmError, OSError, ValueError, StreamError, RestoreError) as exc:
        if server is not None:
            server.close()
        _answer(ready, say(Say.ERROR, text=str(exc)))
        _remove_directory(directory, disk_lock)     # it never ran: nothing to keep
        return 1
    config = domain.config
    try:
        if server is None:
            server = DomainServer(directory, domain, console_log)
        server.domain = domain
        server.disk_lock = disk_lock
        if not receive:         # receive mode wrote it before GO could come (_receive)
            _write_config(directory, config)
    except OSError as exc:
        domain.destroy()
        _answer(ready, say(Say.ERROR, text=str(exc)))
        _remove_directory(directory, disk_lock)
        return 1
    try:
        server.publish()
        if receive:             # it said ok and awaits GO (or took it) already: _receive
            ready.close()
        else:
            if not paused:
                domain.resume()
            ready.write(say(Say.OK).decode())
            ready.close()
            if note:
                log.info("%s", note)
            log.info("domain %s %s (%s, %d MiB)", config.name, domain.status,
                     config.workload, config.memory >> 20)
        SERVING.append(server)
        server.serve()
    finally:
        server.close()
        if server.failed:           # like a killed process: listed crashed, its logs kept
            if disk_lock is not None:
                disk_lock.close()
        else:
            _remove_directory(directory, disk_lock)
    return 0


def _write_config(directory: Path, config: DomainConfig) -> None:
    """DIR/config.json: what ``hvm list`` shows of the domain should the process be killed."""
    (directory / statedir.CONFIG).write_text(json.dumps(dataclasses.asdict(config)))


def _answer(ready, line: bytes) -> None:
    """The last word on the ready pipe; its reader may be gone (a killed daemon)."""
    try:
        ready.write(line.decode())
        ready.close()
    except OSError:
        pass


def _remove_directory(directory: Path, disk_lock: DiskLock | None) -> None:
    """The domain ended (or never began): its disk image lock is let go, then its
    directory goes (so a domain whose directory is gone holds no lock). Only a process
    that is killed leaves its directory, with its logs, for ``hvm list`` to show as crashed."""
    if disk_lock is not None:
        disk_lock.close()
    for leaf in (statedir.SOCKET, statedir.HIDDEN_SOCKET, statedir.PIDFILE, statedir.CONFIG,
                 statedir.STDERR, *statedir.LOGS, statedir.MOVED):     # MOVED last: a late destroy reads it
        (directory / leaf).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
