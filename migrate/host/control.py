"""Client side of domain processes: create, find, list, and talk to them."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import DEFAULT_COMPRESSION, DEV_KVM, DomainConfig, DomainError, DomainStatus
from ..locks import DiskBusy, DiskLock
from ..text import SHOWN, one_line
from . import protocol, statedir
from .launch import PROGRESS, Create, Launch, Line, Restore, Say, parse
from .launch import argv as launch_argv
from .launch import exited as exited_line

CREATE_TIMEOUT = 60.0
MAX_SOCKET_PATH = 107


# what a ControlError is (its ``kind``; migrate.exits maps kinds to exit statuses)
FAILED = "failed"               # the operation failed; the guest is where it was
UNKNOWN = "unknown"             # a relocation's outcome is not known (the message says what to do)
INTERRUPTED = "interrupted"     # cancelled by the user (Ctrl-C)
LOST = "lost"                   # the domain process gave no answer: it died, or the socket broke
NO_ANSWER = "no-answer"         # the domain process lives but did not answer in time (hung, or stopped)
ENDING = "ending"               # the domain is on its way out (its control socket is gone)
NO_SOCKET = "no-socket"         # no control socket, and its files do not tell starting from ending
NO_DOMAIN = "no-domain"         # no domain of that name here
CRASHED = "crashed"             # the domain's process is gone; its logs are kept


class ControlError(Exception):
    """A clear, one-line reason an operation on a domain failed. ``kind``: one of the
    kinds above; ``guest``: the guest's state as the domain process reported it (for
    example ``"running here"``), None when it did not say."""

    def __init__(self, message: str, kind: str = FAILED, guest: str | None = None):
        super().__init__(message)
        self.kind, self.guest = kind, guest


class DomainClient:
    """A connection to one domain process's control socket."""

    def __init__(self, name: str, base: Path | None = None, timeout: float = 10.0):
        self.name = name
        self.dir = statedir.domain_dir(name, base)
        path = self.dir / statedir.SOCKET
        if not path.exists():
            if self.dir.exists():
                _check_dead(self.dir)
                if _ending(self.dir):
                    raise self._ending_error()
                raise ControlError(f"domain {name!r} has no control socket: it is starting, or on its way out",
                                   NO_SOCKET)
            root = self.dir.parent
            raise ControlError(f"no domain named {name!r}" + ("" if root.exists() else
                               f" (the state directory {root} does not exist)"), NO_DOMAIN)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:      # refused, gone, or a full queue of connections (EAGAIN): a hung process
            self.sock.close()
            _check_dead(self.dir)
            if not path.exists() and _ending(self.dir):     # it unlinked its socket meanwhile
                raise self._ending_error() from None
            raise ControlError(f"domain {name!r} does not answer on its control socket "
                               f"({exc.strerror or exc})") from None
        self._unpack = protocol.unpacker()

    def _ending_error(self) -> "ControlError":
        return ControlError(f"domain {self.name!r} is on its way out (its control socket is gone)", ENDING)

    def call(self, op: str, **args) -> dict:
        return self.call_with_progress(op, None, self.timeout, **args)

    def check_answers(self, timeout: float | None = None) -> dict:
        """The domain's info, asked before an operation that may wait long for its first
        answer (a save) or that a process which does not answer would only queue (pause):
        a domain process that does not answer within ``timeout`` (ANSWER_TIMEOUT) is a
        ControlError of kind NO_ANSWER saying that nothing was done to it (UNKNOWN, once a
        request was sent and not answered: it may still happen)."""
        return self.call_with_progress("info", None, timeout or ANSWER_TIMEOUT)     # info: ASKS_ONLY

    def _no_answer(self, timeout: float | None, op: str | None) -> ControlError:
        """The error of a domain process that did not answer within ``timeout`` seconds:
        whether its process is stopped (its guest does not run) or hung, and what became
        of the request (``op``; None: only asked whether it answers, nothing was done)."""
        pid = _pid(self.dir)
        stat = _stat(pid) if pid is not None else None
        proc = f"its process, pid {pid}," if pid is not None else "its process"
        if stat is not None and stat[0] in (b"T", b"t"):
            why = f"{proc} is stopped: its guest does not run ('kill -CONT {pid}' lets it go on)"
        else:
            why = f"{proc} is hung or overloaded: its guest's state is unknown"
        after = "nothing was done to it" if op is None else \
            f"the {op} was asked and may still happen if its process goes on"
        return ControlError(f"domain {self.name!r} does not answer (no answer within {timeout:g} s): "
                            f"{why}; {after}; 'hvm list' shows it unresponsive",
                            NO_ANSWER if op is None else UNKNOWN, "unresponsive here")

    def call_with_progress(self, op: str, progress=None, timeout: float | None = None,
                           fds: tuple[int, ...] = (), **args) -> dict:
        """Like :meth:`call` for operations that send ``{"progress": ...}`` messages
        before their reply; each is handed to ``progress(dict)``. ``timeout`` bounds the
        wait for each message (None: wait as long as it takes). ``fds`` go with the
        request (SCM_RIGHTS). Ctrl-C (KeyboardInterrupt) cancels the operation: the
        connection is half-closed, which the domain process takes as a cancel, and its
        final answer is awaited; a failure then is a ControlError of kind INTERRUPTED
        saying the guest's state, a success is returned with ``interrupted`` true."""
        self.sock.settimeout(timeout)
        interrupted = False
        try:
            protocol.send(self.sock, {"op": op, **args}, fds)
            while True:
                try:
                    reply = self._next_reply(progress if not interrupted else None)
                    break
                except KeyboardInterrupt:
                    if interrupted:
                        raise ControlError(f"interrupted twice: {op} of {self.name!r} abandoned; its "
                                           f"state is unknown: see 'hvm list'", INTERRUPTED) from None
                    interrupted = True
                    self.sock.shutdown(socket.SHUT_WR)
                    self.sock.settimeout(CANCEL_TIMEOUT)
        except TimeoutError:            # socket.timeout: the process lives and does not answer
            raise self._no_answer(self.sock.gettimeout(), None if op in ASKS_ONLY else op) from None
        except (protocol.ProtocolError, OSError) as exc:
            raise ControlError(f"domain {self.name!r}: {op} failed: {exc}", LOST) from None
        if not reply.get("ok"):
            guest = reply.get("guest") if isinstance(reply.get("guest"), str) else None
            kind = reply.get("kind") if reply.get("kind") in (FAILED, UNKNOWN) else FAILED
            if interrupted and kind != UNKNOWN:
                raise ControlError(f"interrupted: {op} cancelled; {self.name} is "
                                   f"{guest or 'in an unknown state'}", INTERRUPTED, guest)
            # a cancel that came too late (a migrate past GO) changes nothing of what is unknown
            too_late = "interrupted too late to cancel: " if interrupted else ""
            raise ControlError(f"{too_late}domain {self.name!r}: {reply.get('error', 'unknown error')}", kind, guest)
        reply.pop("ok")
        if interrupted:
            reply["interrupted"] = True
        return reply

    def _next_reply(self, progress) -> dict:
        while True:
            reply = protocol.receive(self.sock, self._unpack)
            if "progress" in reply and "ok" not in reply:
                if progress is not None:
                    progress(reply["progress"])
                continue
            return reply

    def console_text(self) -> str:
        """The domain's whole console output so far."""
        out, offset = bytearray(), 0
        while True:
            reply = self.call("console", offset=offset)
            if not reply["data"]:
                return out.decode(errors="replace")
            out += reply["data"]
            offset = reply["next"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


CANCEL_TIMEOUT = 60.0       # seconds to wait for a cancelled job's last answer
ASKS_ONLY = {"info", "console"}     # requests that change nothing: unanswered, nothing was done
ANSWER_TIMEOUT = 5.0        # seconds a domain process has to answer before a save or a pause (it answers in ms)


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (the state letter first:
    R, S, D, T for stopped, Z, ...; the start time at index 19); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return fields or None


def _ending(directory: Path) -> bool:
    """Whether the domain of ``directory``, which has no control socket and whose process
    is not dead, is on its way out rather than starting: a started domain's configuration
    is written once its socket is bound (a received one's while its hidden socket waits
    to be published), so with no socket it had one and removed it (DomainServer.close);
    with no configuration, no pid and no starter's log its files are being removed."""
    if (directory / statedir.HIDDEN_SOCKET).exists() or (directory / statedir.SOCKET).exists():
        return False                # a received domain, not published yet (or just published)
    if (directory / statedir.CONFIG).exists():
        return True
    # its files go socket, pid, configuration, starter's log, logs (domaind._remove_directory):
    # logs left alone are an end; an empty directory is as likely one just claimed, starting
    return _pid(directory) is None and not (directory / statedir.STDERR).exists() and \
        any((directory / leaf).exists() for leaf in statedir.LOGS)


def process_alive(directory: Path) -> bool | None:
    """Whether the domain process of ``directory`` lives: None when it has written no
    pid yet (still starting), True while a process of that pid runs that domain
    directory (a reused pid does not count) or is on its way out (its memory gone, its
    files, and so its locks, not yet), False once it is gone or a zombie with no thread
    left."""
    pid = _pid(directory)
    return None if pid is None else _runs(pid, directory)


def _pid(directory: Path) -> int | None:
    """The pid the domain process of ``directory`` wrote, or None (none yet)."""
    try:
        return int((directory / statedir.PIDFILE).read_text())
    except (OSError, ValueError):
        return None


def _runs(pid: int, directory: Path | None = None, exiting: bool = True) -> bool:
    """Whether process ``pid`` runs (the domain of ``directory``, if given); ``exiting``:
    whether one on its way out counts (it does for the locks its files hold)."""
    stat = _stat(pid)
    if stat is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if stat[0] in (b"Z", b"X"):
        # a zombie leader whose other threads still exit holds the process's files (and
        # so its image locks) until the last of them is gone
        if not exiting:
            return False
        try:
            return len(os.listdir(f"/proc/{pid}/task")) > 1
        except OSError:
            return False
    if argv in ([b""], []):
        return exiting              # exiting: no memory left to read its arguments from
    return directory is None or os.fsencode(str(directory)) in argv


def dead_info(directory: Path) -> dict | None:
    """What ``hvm list`` shows of a domain whose process is gone (killed, or crashed
    without cleaning up): status ``crashed``, its configuration as it saved it, and where
    its logs are. None if its process lives, or it is still starting. A directory left
    without a pid for longer than a start may take (its starter was killed) is removed."""
    pid = _pid(directory)
    if pid is not None and _runs(pid, directory):
        return None
    if pid is None:
        try:
            young = time.time() - directory.stat().st_mtime < CREATE_TIMEOUT
        except OSError:
            return None
        if not young:
            shutil.rmtree(directory, ignore_errors=True)
        return None
    logs = [leaf for leaf in statedir.LOGS if _kept(directory / leaf)]
    return {**_saved_info(directory, DomainStatus.CRASHED, pid),
            "crash_reason": f"its domain process (pid {pid}) is gone (killed, or it died)",
            "logs": [str(directory / leaf) for leaf in logs]}


def _kept(path: Path) -> bool:
    """A log worth listing for a post-mortem: one that is there (fatal.log: if written)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return bool(size) or path.name != statedir.FATAL


def _saved_info(directory: Path, status: str, pid: int) -> dict:
    """``hvm list``'s fields for a domain that cannot say them itself, from the
    configuration its process saved (what is missing or malformed is shown as unknown)."""
    try:
        config = json.loads((directory / statedir.CONFIG).read_text())
        config = config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        config = {}
    return {"name": directory.name, "workload": str(config.get("workload", "?")),
            "memory": config.get("memory", 0) if isinstance(config.get("memory"), int) else 0,
            "vcpus": 1, "status": status, "pid": pid, "uptime": 0.0, "disk": config.get("disk")}


UNRESPONSIVE = "unresponsive"      # hvm list: a domain whose process lives but did not answer


def unanswered_info(directory: Path, exc: ControlError) -> dict | None:
    """What ``hvm list`` shows of a domain whose process runs and has its control socket
    but did not answer (hung, or stopped): status ``unresponsive``, what it saved, and why
    (``note``). None otherwise: its process is gone or on its way out (killed: listed
    crashed once gone), or it has no control socket (still starting, being received,
    which is listed from RESTORED on: specs/relocation.md, or ending), as before."""
    pid = _pid(directory)
    if pid is None or not (directory / statedir.SOCKET).exists() or not _runs(pid, directory, exiting=False):
        return None                 # (killed, on its way out: listed crashed once it is gone)
    return {**_saved_info(directory, UNRESPONSIVE, pid), "uptime": _process_age(pid), "note": str(exc)}


def _process_age(pid: int) -> float:
    """Seconds since process ``pid`` started (0.0 if that cannot be read): the uptime of a
    domain that cannot say its own."""
    stat = _stat(pid)
    if stat is None:
        return 0.0
    try:
        started = int(stat[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def _check_dead(directory: Path) -> None:
    """ControlError (CRASHED) if the domain of ``directory`` is dead; returns otherwise."""
    info = dead_info(directory)
    if info is not None:
        raise ControlError(f"domain {directory.name!r} crashed: {info['crash_reason']}; its logs are "
                           f"kept in {directory} ('hvm destroy {directory.name}' clears it)", CRASHED,
                           "crashed here")


def clear_crashed(name: str, base: Path | None = None) -> bool:
    """Remove a crashed domain's directory (and its logs); False if it is not crashed."""
    directory = statedir.domain_dir(name, base)
    if dead_info(directory) is None:
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def destroy_domain(name: str, base: Path | None = None) -> str:
    """Destroy a domain and wait until it is gone; a crashed one is cleared (its logs
    go with it). Returns ``"destroyed"``, ``"cleared"``, ``"already"`` (it was on its way
    out already, being destroyed by another ``hvm destroy`` or ending, and is gone now) or
    ``"crashed"`` (its process ended on its way out without removing its directory: it is
    gone, listed crashed with its logs). A domain whose process has not ended within
    DESTROY_WAIT of being destroyed is a ControlError of kind UNKNOWN."""
    directory, pid = statedir.domain_dir(name, base), None
    try:
        with DomainClient(name, base, timeout=DESTROY_TIMEOUT) as client:
            pid = _pid(directory)
            reply = client.call("destroy")
    except ControlError as exc:
        if exc.kind in (NO_SOCKET, ENDING, LOST) and (moved := _moved_to(directory)):
            raise _moved(name, moved) from None     # on its way out after a relocation: it runs there
        if exc.kind == CRASHED and clear_crashed(name, base):
            return "cleared"
        if exc.kind == NO_SOCKET and _gone_soon(directory):     # its last files were going
            return "already"
        if exc.kind == NO_SOCKET and (directory / statedir.SOCKET).exists():
            return destroy_domain(name, base)       # it was starting, and now answers
        if exc.kind not in (ENDING, LOST):      # LOST: it closed the connection on its way out
            raise
        pid = pid or _pid(directory)
        ended = _wait_ended(directory, pid, DESTROY_WAIT)
        if ended is None:
            raise _not_ended(name, pid, "was already on its way out") from None
        return "already" if ended == "gone" else ended
    ended = _wait_ended(directory, pid, DESTROY_WAIT)
    if reply.get("status") == DomainStatus.MOVED:      # a relocation past its GO: the guest runs there
        raise _moved(name, reply.get("moved_to"))
    if ended is None:
        raise _not_ended(name, pid, "was destroyed")
    return "destroyed" if ended == "gone" else ended


def _moved(name: str, moved_to) -> ControlError:
    return ControlError(f"{name} was not destroyed: it had just moved to {moved_to} (its relocation was past "
                        f"the handoff) and runs there", guest=f"running on {moved_to}")


def _moved_to(directory: Path) -> str | None:
    """HOST:PORT its guest moved to, if the domain of ``directory`` is a process on its way
    out after a relocation (statedir.MOVED), else None."""
    try:
        return (directory / statedir.MOVED).read_text()[:300] or None
    except (OSError, UnicodeDecodeError):
        return None


def _gone_soon(directory: Path, wait: float = 1.0) -> bool:
    """Whether a domain directory with no control socket and nothing else that tells
    (an empty one: just claimed, or its last file removed) is gone within ``wait`` s."""
    deadline = time.monotonic() + wait
    while directory.exists() and not (directory / statedir.SOCKET).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not directory.exists()


def _wait_ended(directory: Path, pid: int | None, timeout: float) -> str | None:
    """Wait until the domain of ``directory`` (its process ``pid``, if known) has ended:
    ``"gone"`` once its directory is (or holds another process's domain: a new one of that
    name), ``"crashed"`` if its process ended and left its directory, None if neither
    happened within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        inode = directory.stat().st_ino
    except OSError:
        return "gone"
    while True:
        try:
            if directory.stat().st_ino != inode:
                return "gone"           # removed, and the name taken again since
        except OSError:
            return "gone"
        now = _pid(directory)
        if now is not None and pid is not None and now != pid:
            return "gone"
        if now is not None and not _runs(now, directory):
            return "crashed"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _not_ended(name: str, pid: int | None, what: str) -> ControlError:
    return ControlError(f"{name} {what}, but its domain process{f' (pid {pid})' if pid else ''} has not ended "
                        f"within {DESTROY_WAIT:g} s: its state is unknown; see 'hvm list' ('hvm destroy {name}' "
                        f"again once it is listed)", UNKNOWN)


DESTROY_TIMEOUT = 75.0      # a destroy waits for a save or relocation in progress to be cancelled
DESTROY_WAIT = 30.0         # seconds a destroyed domain's process has to end (free its memory, remove its files)


LIST_TIMEOUT = 2.0          # seconds hvm list waits for each domain's answer (it answers in ms)


def list_domains(base: Path | None = None) -> list[dict]:
    """Info of every domain: live ones, crashed ones (their process is gone; see
    dead_info) until ``hvm destroy`` clears them, and ones whose process lives but did not
    answer (unanswered_info: unresponsive)."""
    root = base or statedir.state_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") and ".discarded-" in entry.name:
            try:
                stale = time.time() - entry.stat().st_mtime > CREATE_TIMEOUT
            except OSError:         # removed meanwhile, by its discarder or another list
                continue
            if stale:
                shutil.rmtree(entry, ignore_errors=True)      # its discarder died before it was done
        if not entry.is_dir() or not statedir.NAME_RE.match(entry.name):
            continue
        try:
            with DomainClient(entry.name, root, timeout=LIST_TIMEOUT) as client:
                found.append(client.call("info"))
        except ControlError as exc:
            info = dead_info(entry) if exc.kind == CRASHED else None
            if info is None and exc.kind != NO_DOMAIN:
                info = unanswered_info(entry, exc)
            if info is not None:
                found.append(info)
    return found


def _require_kvm() -> None:
    if not os.path.exists(DEV_KVM):
        raise ControlError(f"{DEV_KVM} does not exist: this host cannot run KVM guests")


def create_domain(config: DomainConfig, base: Path | None = None) -> dict:
    """Start a domain process for ``config``; return its info once running. A disk
    image is locked first (migrate.locks): one in use is refused, naming its holder."""
    config.validate()
    statedir.check_name(config.name)
    _require_kvm()
    lock = _lock_disk(config.disk)
    directory = None
    try:
        directory = claim_directory(config.name, base)
        return _spawn(config, directory, lock)
    except KeyboardInterrupt:       # before the domain process said it runs: nothing of it is kept
        raise _cancelled(directory, "create", f"{config.name} was not started") from None
    finally:
        if lock is not None:
            lock.close()            # the domain process holds its own descriptor of it


def _cancelled(directory: Path | None, what: str, result: str) -> ControlError:
    """A create or restore that Ctrl-C cancelled before its domain process said it runs:
    what it claimed (``directory``, if it got that far) is discarded, process and all."""
    if directory is not None:
        discard(directory)
    return ControlError(f"interrupted: {what} cancelled; nothing was left here ({result})", INTERRUPTED,
                        "none here")


def _lock_disk(disk: str | None) -> DiskLock | None:
    if disk is None:
        return None
    try:
        return DiskLock.for_domain(disk)
    except DiskBusy as exc:
        raise ControlError(str(exc)) from None


def save_domain(name: str, path: str | os.PathLike | None, *, mode: str = "stop",
                compress: int | str | None = DEFAULT_COMPRESSION, progress=None, base: Path | None = None,
                fd: int | None = None, **convergence) -> dict:
    """Save a domain to ``path`` from inside its process (see domaind's SaveJob for
    ``mode``), or with ``path`` None into the file descriptor ``fd`` (passed to the
    domain process: ``hvm save NAME -``); ``progress(dict)`` gets the save's statistics
    as it goes. Returns the final reply (``path``, ``status``, ``stats``). A target that
    is not a regular file (a device, FIFO, symlink, directory) is refused before anything
    starts. If the domain process gives no answer (it died) the partial file is removed
    here. ``convergence``: for the live modes, protocol.CONVERGENCE_KEYS (None values left out)."""
    from ..engine import SaveError, check_target, drop_stale_partial
    extra = protocol.convergence_request(convergence, "save")
    if path is None:
        where = {"to_fd": True}
    else:
        path = Path(path).absolute()
        try:
            check_target(path)
        except SaveError as exc:
            raise ControlError(str(exc)) from None
        where = {"path": str(path)}
    before = _identity(path)
    with DomainClient(name, base) as client:
        client.check_answers()      # a stopped or hung process: refused now, not waited for forever
        try:
            return client.call_with_progress("save", progress, fds=(fd,) if path is None else (),
                                             mode=mode, compress=compress, **where, **extra)
        except ControlError as exc:
            if exc.kind != LOST:
                raise
            where_now, guest = _after_lost(client.dir, name)       # its process gone, if it goes
            if path is None:
                what = "the stream on standard output is incomplete"
            else:
                drop_stale_partial(path)    # nobody left to clean up but us (a save still writing keeps it)
                written = _identity(path) not in (None, before)
                what = (f"{path} was written before it did: 'hvm stream verify {path}' checks it, "
                        f"'hvm restore {path}' brings the guest back" if written else "no file was written")
            what_broke = (f"the domain process of {name} ended" if guest is not None else
                          f"the connection to the domain process of {name} broke")
            raise ControlError(f"{what_broke} during the save ({exc}): {what}; {where_now}", LOST, guest) from None


LOST_WAIT = 5.0             # seconds a domain process that broke its connection has to be gone


def _after_lost(directory: Path, name: str) -> tuple[str, str | None]:
    """Where the guest of a domain process that broke its connection is, once that process
    is gone (a killed one takes a moment to free its memory): the end of the message and
    the guest's state (None: its process still runs, and it did not say)."""
    pid = _pid(directory)
    deadline = time.monotonic() + LOST_WAIT
    while pid is not None and _runs(pid, directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    if dead_info(directory) is not None:
        return (f"{name} is lost here: its process is gone and it is listed crashed, its logs kept "
                f"(see 'hvm info {name}'; 'hvm destroy {name}' clears it)", "crashed here")
    if not directory.exists():
        return f"{name} is gone here", "none here"
    return f"its process still runs: see 'hvm info {name}' for its state", None


def _identity(path: Path | None) -> tuple | None:
    """What tells one file at ``path`` from the next (None: nothing there)."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns) if st else None


HEAD_LIMIT = 16 << 20       # stream bytes a restore from a pipe may read to find DOMAIN_CONFIG
MAX_PROBLEMS = 8            # problems a refused restore names (hvm stream check lists all)
MAX_REASON = 1000           # characters kept of a reason that may quote a stream


def restore_domain(path: str | os.PathLike, name: str | None = None, paused: bool = False,
                   base: Path | None = None, fresh_stub: bool = False,
                   disk_map: dict[str, str] | None = None, net_map: dict[str, str] | None = None) -> dict:
    """Start a domain process restored from the stream ``path`` ("-": standard input;
    a pipe or FIFO works too, and is read once); its info once it runs (or is paused,
    with ``paused``). ``disk_map``: {saved disk path: disk here}; ``net_map``: {saved
    bridge or TAP device: the one here}. What this host cannot
    restore (its CPU, a disk it may not open, more RAM than it has: ``engine.compat``) is
    refused before anything is started, and the disk is locked (migrate.locks): the file
    locked must be the file checked. The stream is opened here and handed
    to the domain process; the bytes read here to check it (up to its first
    MEMORY_LAYOUT) go with it in a memfd when the stream cannot be read again. Errors
    come back as one line; on any error no process and no state are left."""
    _require_kvm()
    label = "standard input" if str(path) == "-" else str(Path(path).absolute())
    try:
        fd = os.dup(0) if str(path) == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ControlError(f"cannot restore from {label}: {exc.strerror}") from None
    head_fd, lock, directory = -1, None, None
    try:
        saved = _restorable(path, fd, label, disk_map or {}, net_map or {})
        if not _seekable(fd):       # the head read to check it goes along
            head_fd = os.memfd_create("hvm-stream-head", os.MFD_CLOEXEC)
            os.write(head_fd, saved.pop("head"))
            os.lseek(head_fd, 0, os.SEEK_SET)
        disk_file = saved.pop("disk_file", None)
        name = name or saved.get("name")
        if not isinstance(name, str):
            raise ControlError(f"cannot restore from {label}: DOMAIN_CONFIG has no name")
        try:
            statedir.check_name(name)
        except ValueError:
            raise ControlError(f"cannot restore from {label}: invalid domain name '{one_line(name, 100)}': use "
                               "1-64 letters, digits, '_', '.', '-' starting with a letter or digit "
                               "(or give --name)") from None
        disk = saved.get("disk_here") or ""
        lock = _lock_disk(disk or None)
        if lock is not None:
            st = os.fstat(lock.fd)      # the file checked is the file opened (nothing swapped it since)
            if (st.st_dev, st.st_ino) != disk_file:
                raise ControlError(f"cannot restore from {label}: the disk at {one_line(disk, SHOWN)} changed while it "
                                   "was checked")
        directory = claim_directory(name, base)
        job = Restore(fd, head_fd, name, paused, True if fresh_stub else None, disk, saved.get("net_here") or "")
        return _spawn_process(name, directory, job, what="restore", lock=lock)
    except KeyboardInterrupt:       # before the domain process said it runs: nothing of it is kept
        raise _cancelled(directory, "restore",
                         f"{name if isinstance(name, str) else 'the domain'} was not restored") from None
    finally:
        for one in (fd, head_fd):
            if one >= 0:
                os.close(one)
        if lock is not None:
            lock.close()


def _seekable(fd: int) -> bool:
    import stat
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _restorable(path, fd: int, label: str, disk_map: dict[str, str], net_map: dict[str, str]) -> dict:
    """engine.compat's facts about the stream on ``fd``; ControlError with every problem.
    A file is checked by its path (and ``fd`` rewound); a pipe by the head read from it
    (returned as ``head``): its end, and the saved MSRs there, are the restore's to check."""
    from ..cpu import this_host
    from ..engine import RestoreError
    from ..engine.compat import check
    from ..stream import StreamError
    try:
        if _seekable(fd):
            report = check(f"/proc/self/fd/{fd}", this_host(), disk_map, net_map)
            os.lseek(fd, 0, os.SEEK_SET)
        else:
            head = _read_head(fd)
            report = check(head, this_host(), disk_map, net_map)
            report.facts["head"] = head
    except (RestoreError, StreamError, DomainError, OSError) as exc:
        raise ControlError(f"cannot restore from {label}: "
                           f"{one_line(getattr(exc, 'strerror', None) or exc, MAX_REASON)}") from None
    if report.problems:
        shown_problems = report.problems[:MAX_PROBLEMS]
        if len(report.problems) > MAX_PROBLEMS:
            shown_problems.append(f"and {len(report.problems) - MAX_PROBLEMS} more ('hvm stream check' "
                                  "lists them)")
        raise ControlError(f"cannot restore from {label}: this host cannot restore it: "
                           f"{'; '.join(shown_problems)}")
    return {**report.facts, "disk_file": report.disk_file}


def _read_head(fd: int) -> bytes:
    """The bytes of the stream on ``fd`` up to its first MEMORY_LAYOUT (what compat reads),
    at most HEAD_LIMIT."""
    from ..engine import RestoreError
    from ..stream import DONE, NEED_DATA, MemoryLayout, StreamReader
    reader, head = StreamReader(), bytearray()
    while len(head) < HEAD_LIMIT:
        data = os.read(fd, 64 << 10)
        if not data:
            reader.eof()
            break
        head += data
        reader.feed(data)
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            if isinstance(record, MemoryLayout):
                return bytes(head)
    raise RestoreError(f"no MEMORY_LAYOUT in its first {min(len(head), HEAD_LIMIT)} bytes")


def claim_directory(name: str, base: Path | None) -> Path:
    root = base or statedir.state_dir()
    directory = root / name
    if len(str(directory / statedir.SOCKET)) > MAX_SOCKET_PATH:
        raise ControlError(f"state directory path too long for a unix socket: {directory}")
    if directory.exists():
        try:
            DomainClient(name, root).close()
        except ControlError as exc:
            if exc.kind == CRASHED:
                raise ControlError(f"domain name {name!r} is in use by a crashed domain (its logs "
                                   f"are kept in {directory}): 'hvm destroy {name}' clears it") from None
        else:
            raise ControlError(f"domain name {name!r} is already in use")
    statedir.make(root)
    try:
        directory.mkdir()
    except FileExistsError:
        raise ControlError(f"domain name {name!r} is already in use") from None
    return directory


def _spawn(config: DomainConfig, directory: Path, lock: DiskLock | None) -> dict:
    return _spawn_process(config.name, directory, Create(vars(config)), what="start", lock=lock)


def launch(directory: Path, spec: Launch) -> None:
    """Start ``python -m migrate.host.domaind DIRECTORY SPEC`` (migrate.host.launch) with
    the descriptors of ``spec`` (the disk image lock's among them, which the domain process
    holds from then on); its standard error goes to DIRECTORY/stderr.log until it runs.
    Returns once the launcher half of its double fork has exited (the domain process itself
    goes on)."""
    with open(directory / statedir.STDERR, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "migrate.host.domaind", *launch_argv(directory, spec)],
                                pass_fds=spec.fds(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    proc.wait(10)


def exited(directory: Path) -> Line:
    """The answer of a domain process that ended without giving one (kind EXITED): the last
    line it wrote to its standard error."""
    try:
        text = (directory / statedir.STDERR).read_text(errors="replace")
    except OSError:
        text = ""
    return exited_line(text)


def _spawn_process(name: str, directory: Path, job, what: str, lock: DiskLock | None = None) -> dict:
    read_fd, write_fd = os.pipe()
    try:
        launch(directory, Launch(job, write_fd, lock.fd if lock is not None else None))
    finally:
        os.close(write_fd)
    answer = None
    done = {"start": "started", "restore": "restored"}.get(what, what)
    too_late = f"interrupted too late to cancel: {name} had been {done} and is here ('hvm info {name}')"
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as ready:    # unbuffered: select() sees every unread line
            try:
                answer = _read_ready(ready, directory)
            except KeyboardInterrupt:   # it may have said ok already: then it runs, too late to cancel
                answer = _said(ready)
                if answer is None or answer.kind is not Say.OK:
                    raise
                (directory / statedir.STDERR).unlink(missing_ok=True)
                raise ControlError(too_late, INTERRUPTED) from None
        if answer.kind is not Say.OK:
            discard(directory)
            raise ControlError(f"domain {name!r} failed to {what}: {one_line(answer.reason, MAX_REASON)}")
        (directory / statedir.STDERR).unlink(missing_ok=True)
        with DomainClient(name, directory.parent) as client:
            return client.call("info")
    except KeyboardInterrupt:       # once it said ok it runs: too late to cancel, never discarded
        if answer is None or answer.kind is not Say.OK:
            raise
        raise ControlError(too_late, INTERRUPTED) from None


def _ready_line(ready) -> Line | None:
    """The next line on the ready pipe (one is there to read); None at its end."""
    raw = ready.readline().decode(errors="replace").strip()
    return parse(raw) if raw else None


def _said(ready) -> Line | None:
    """The answer the domain process has already written, if any (read without waiting)."""
    while select.select([ready], [], [], 0)[0]:
        line = _ready_line(ready)
        if line is None or line.kind not in PROGRESS:
            return line
    return None


def _read_ready(ready, directory: Path) -> Line:
    """The domain process's answer. It has CREATE_TIMEOUT seconds, counted anew at each
    progress line (AT: a restore from a slow disk or link says how far it is once a second),
    so a large restore is not cut off while one that makes no progress is."""
    deadline = time.monotonic() + CREATE_TIMEOUT
    while time.monotonic() < deadline:
        r, _, _ = select.select([ready], [], [], 0.5)
        if r:
            line = _ready_line(ready)
            if line is None:
                return exited(directory)
            if line.kind not in PROGRESS:
                return line
            deadline = time.monotonic() + CREATE_TIMEOUT
    return Line(Say.ERROR, text=f"no answer within {CREATE_TIMEOUT:g}s")


def discard(directory: Path) -> None:
    """Remove the directory of a domain that never ran, killing its process: first out of
    sight (renamed to a hidden name ``hvm list`` does not read, so it is never seen as a
    crashed domain), then the process, then the files."""
    hidden = hide(directory)
    kill_pidfile(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def hide(directory: Path) -> Path:
    """Rename a domain's directory to a hidden name ``hvm list`` does not read (the
    directory itself if that fails); :func:`discard` it, or rename it back."""
    hidden = directory.with_name(f".{directory.name}.discarded-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(directory, hidden)
    except OSError:
        return directory
    return hidden


def kill_pidfile(directory: Path, timeout: float = 5.0) -> bool:
    """SIGKILL the domain process of ``directory`` and wait until it is gone (its files,
    and the disk image lock among them, closed): whether it is (False: no process could be
    signalled, or it outlived ``timeout``)."""
    pid = _pid(directory)
    if pid is None or not signal_pidfile(directory, signal.SIGKILL, pid):
        return False
    deadline = time.monotonic() + timeout
    while _runs(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _runs(pid)


def signal_pidfile(directory: Path, sig: int, pid: int | None = None) -> bool:
    """Send ``sig`` to the domain process of ``directory`` (``pid``, if read already):
    whether it could be."""
    pid = pid or _pid(directory)
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
    except OSError:
        return False
    return True


def wait_gone(name: str, base: Path | None = None, timeout: float = 10.0) -> bool:
    directory = statedir.domain_dir(name, base)
    deadline = time.monotonic() + timeout
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not directory.exists()


__all__ = ["ControlError", "DomainClient", "create_domain", "destroy_domain", "list_domains",
           "restore_domain", "save_domain", "wait_gone"]
