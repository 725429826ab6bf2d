"""Where domains live: ``$HVM_STATE_DIR/<name>/`` holds a domain process's
control socket, console log, pid and log files."""
from __future__ import annotations

import os
import re
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
SOCKET = "control.sock"
HIDDEN_SOCKET = SOCKET + ".new"     # a receiving domain's, until RESTORED: not listed
CONSOLE = "console.log"
PIDFILE = "pid"
LOGFILE = "domain.log"
STDERR = "stderr.log"       # a starting domain process's standard error, until it runs
CONFIG = "config.json"      # the domain's configuration: what `hvm list` shows of it once crashed
MOVED = "moved"             # HOST:PORT its guest moved to: a process on its way out after a relocation
FATAL = "fatal.log"         # a fatal signal's Python traceback (faulthandler): never rotated, empty until then
LOG_MAX = 8 << 20           # bytes of console.log and domain.log before each moves to its ".1" (the one before goes)
LOGS = (CONSOLE, CONSOLE + ".1", LOGFILE, LOGFILE + ".1", STDERR, FATAL)    # what a crashed domain leaves for a post-mortem


class StateDirError(ValueError):
    """The state directory cannot hold domains (a file, or not writable); one line."""


def state_dir() -> Path:
    """$HVM_STATE_DIR, else /run/hvm for root, else $XDG_RUNTIME_DIR/hvm or /tmp/hvm-UID."""
    env = os.environ.get("HVM_STATE_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0 and os.access("/run", os.W_OK):
        path = Path("/run/hvm")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "hvm"
    else:
        path = Path(f"/tmp/hvm-{os.getuid()}")
    if path.exists() and not path.is_dir():
        raise StateDirError(f"the state directory {path} is not a directory"
                            + (" (HVM_STATE_DIR)" if env else ""))
    return path


def make(root: Path) -> None:
    """Create the state directory ``root`` if needed; StateDirError if it cannot be."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"cannot make the state directory {root}: {exc.strerror or exc}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise StateDirError(f"the state directory {root} is not writable")


class BadName(ValueError):
    """A domain name that cannot be one (a ValueError, as callers that check names from
    a stream or a HELLO catch it); on the command line, a usage error (migrate.exits)."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BadName(f"invalid domain name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
                      " starting with a letter or digit")
    return name


def domain_dir(name: str, base: Path | None = None) -> Path:
    return (base or state_dir()) / check_name(name)
