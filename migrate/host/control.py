"""Client side of domain processes: create, find, list, and talk to them."""
from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack

from ..domain import DomainConfig, DomainError
from ..engine.sinks import DEFAULT_COMPRESSION
from ..kvm.system import DEV_KVM
from . import protocol, statedir

CREATE_TIMEOUT = 60.0
MAX_SOCKET_PATH = 107


class ControlError(Exception):
    """A clear, one-line reason an operation on a domain failed."""


class DomainClient:
    """A connection to one domain process's control socket."""

    def __init__(self, name: str, base: Path | None = None, timeout: float = 10.0):
        self.name = name
        self.dir = statedir.domain_dir(name, base)
        path = self.dir / statedir.SOCKET
        if not path.exists():
            if self.dir.exists() and not _remove_stale(self.dir):
                raise ControlError(f"domain {name!r} is still starting")
            raise ControlError(f"no domain named {name!r}")
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.sock.close()
            if not _remove_stale(self.dir):
                raise ControlError(f"domain {name!r} does not answer on its control socket") from None
            raise ControlError(f"domain {name!r} is not running: its process is gone "
                               "(stale state removed)") from None
        self._unpack = protocol.unpacker()

    def call(self, op: str, **args) -> dict:
        return self.call_with_progress(op, None, self.timeout, **args)

    def call_with_progress(self, op: str, progress=None, timeout: float | None = None, **args) -> dict:
        """Like :meth:`call` for operations that send ``{"progress": ...}`` messages
        before their reply; each is handed to ``progress(dict)``. ``timeout`` bounds the
        wait for each message (None: wait as long as it takes)."""
        self.sock.settimeout(timeout)
        try:
            protocol.send(self.sock, {"op": op, **args})
            while True:
                reply = protocol.receive(self.sock, self._unpack)
                if "progress" in reply and "ok" not in reply:
                    if progress is not None:
                        progress(reply["progress"])
                    continue
                break
        except (protocol.ProtocolError, OSError) as exc:
            raise ControlError(f"domain {self.name!r}: {op} failed: {exc}") from None
        if not reply.get("ok"):
            raise ControlError(f"domain {self.name!r}: {reply.get('error', 'unknown error')}")
        reply.pop("ok")
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


def _remove_stale(directory: Path) -> bool:
    """Remove a dead domain's files; False if its process still lives."""
    try:
        os.kill(int((directory / statedir.PIDFILE).read_text()), 0)
    except (OSError, ValueError):
        shutil.rmtree(directory, ignore_errors=True)
        return True
    return False


def list_domains(base: Path | None = None) -> list[dict]:
    """Info of every live domain; stale ones are cleaned up on the way."""
    root = base or statedir.state_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not statedir.NAME_RE.match(entry.name):
            continue
        try:
            with DomainClient(entry.name, root) as client:
                found.append(client.call("info"))
        except ControlError:
            continue
    return found


def _require_kvm() -> None:
    if not os.path.exists(DEV_KVM):
        raise ControlError(f"{DEV_KVM} does not exist: this host cannot run KVM guests")


def create_domain(config: DomainConfig, base: Path | None = None) -> dict:
    """Start a domain process for ``config``; return its info once running."""
    config.validate()
    statedir.check_name(config.name)
    _require_kvm()
    directory = _claim_directory(config.name, base)
    return _spawn(config, directory)


def save_domain(name: str, path: str | os.PathLike, *, mode: str = "stop",
                compress: int | str | None = DEFAULT_COMPRESSION, progress=None, base: Path | None = None,
                **convergence) -> dict:
    """Save a domain to ``path`` from inside its process (see domaind's SaveJob for
    ``mode``); ``progress(dict)`` gets the save's statistics as it goes. Returns the
    final reply (``path``, ``status``, ``stats``). If the connection is lost (the domain
    process died, or we are interrupted) the partial file is removed here too.
    ``convergence``: for the live modes, protocol.CONVERGENCE_KEYS (None values left out)."""
    path = Path(path).absolute()
    from ..engine import partial_path
    extra = protocol.convergence_request(convergence, "save")
    with DomainClient(name, base) as client:
        try:
            return client.call_with_progress("save", progress, path=str(path), mode=mode,
                                             compress=compress, **extra)
        except BaseException as exc:
            if not isinstance(exc, ControlError) or "save failed" not in str(exc):
                partial_path(path).unlink(missing_ok=True)
            raise


def restore_domain(path: str | os.PathLike, name: str | None = None, paused: bool = False,
                   base: Path | None = None, fresh_stub: bool = False,
                   disk_map: dict[str, str] | None = None) -> dict:
    """Start a domain process restored from the stream file ``path``; its info once it
    runs (or is paused, with ``paused``). ``disk_map``: {saved disk path: disk here}.
    What this host cannot restore (its CPU, a missing disk: ``engine.compat``) is refused
    before anything is started. Errors come back as one line; on any error no process
    and no state are left."""
    from ..cpu import this_host
    from ..engine import RestoreError
    from ..engine.compat import require_restorable
    from ..stream import StreamError
    path = Path(path).absolute()
    _require_kvm()
    try:
        report = require_restorable(path, this_host(), disk_map or {})
    except (RestoreError, StreamError, DomainError) as exc:
        raise ControlError(f"cannot restore from {path}: {exc}") from None
    saved = report.facts
    name = name or saved.get("name")
    if not isinstance(name, str):
        raise ControlError(f"cannot restore from {path}: DOMAIN_CONFIG has no name")
    statedir.check_name(name)
    directory = _claim_directory(name, base)
    disk = saved.get("disk_here") or ""
    return _spawn_process(name, directory, ["--restore", str(path), name, "1" if paused else "0",
                                            "yes" if fresh_stub else "auto", disk], what="restore")


def _claim_directory(name: str, base: Path | None) -> Path:
    root = base or statedir.state_dir()
    directory = root / name
    if len(str(directory / statedir.SOCKET)) > MAX_SOCKET_PATH:
        raise ControlError(f"state directory path too long for a unix socket: {directory}")
    if directory.exists():
        try:
            DomainClient(name, root).close()
        except ControlError:
            pass            # was stale, now removed
        else:
            raise ControlError(f"domain name {name!r} is already in use")
    root.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir()
    except FileExistsError:
        raise ControlError(f"domain name {name!r} is already in use") from None
    return directory


def _spawn(config: DomainConfig, directory: Path) -> dict:
    packed = msgpack.packb(vars(config), use_bin_type=True).hex()
    return _spawn_process(config.name, directory, [packed], what="start")


def launch(directory: Path, args: list[str], pass_fds: tuple[int, ...]) -> None:
    """Start ``python -m migrate.host.domaind DIRECTORY ARGS...`` with ``pass_fds``; its
    standard error goes to DIRECTORY/stderr.log until it runs. Returns once the launcher
    half of its double fork has exited (the domain process itself goes on)."""
    with open(directory / statedir.STDERR, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "migrate.host.domaind", str(directory), *args],
                                pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    proc.wait(10)


def exited(directory: Path) -> str:
    """The answer of a domain process that ended without giving one: the last line it
    wrote to its standard error."""
    try:
        lines = (directory / statedir.STDERR).read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return "error: domain process exited" + (f": {lines[-1]}" if lines else "")


def _spawn_process(name: str, directory: Path, args: list[str], what: str) -> dict:
    read_fd, write_fd = os.pipe()
    try:
        launch(directory, [*args, str(write_fd)], (write_fd,))
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        answer = _read_ready(ready, directory)
    if answer != "ok":
        _kill_pidfile(directory)
        shutil.rmtree(directory, ignore_errors=True)
        raise ControlError(f"domain {name!r} failed to {what}: {answer.removeprefix('error: ')}")
    (directory / statedir.STDERR).unlink(missing_ok=True)
    with DomainClient(name, directory.parent) as client:
        return client.call("info")


def _read_ready(ready, directory: Path) -> str:
    deadline = time.monotonic() + CREATE_TIMEOUT
    while time.monotonic() < deadline:
        r, _, _ = select.select([ready], [], [], 0.5)
        if r:
            return ready.readline().strip() or exited(directory)
    return f"error: no answer within {CREATE_TIMEOUT:g}s"


def _kill_pidfile(directory: Path) -> None:
    try:
        os.kill(int((directory / statedir.PIDFILE).read_text()), 9)
    except (OSError, ValueError):
        pass


def wait_gone(name: str, base: Path | None = None, timeout: float = 10.0) -> bool:
    directory = statedir.domain_dir(name, base)
    deadline = time.monotonic() + timeout
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not directory.exists()


__all__ = ["ControlError", "DomainClient", "create_domain", "list_domains",
           "restore_domain", "save_domain", "wait_gone"]
