"""Where domains live: ``$HVM_STATE_DIR/<name>/`` holds a domain process's
control socket, console log, pid and log files."""
from __future__ import annotations

import os
import re
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SOCKET = "control.sock"
CONSOLE = "console.log"
PIDFILE = "pid"
LOGFILE = "domain.log"
STDERR = "stderr.log"       # a starting domain process's standard error, until it runs


def state_dir() -> Path:
    """$HVM_STATE_DIR, else /run/hvm for root, else $XDG_RUNTIME_DIR/hvm or /tmp/hvm-UID."""
    env = os.environ.get("HVM_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/hvm")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "hvm"
    return Path(f"/tmp/hvm-{os.getuid()}")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"invalid domain name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
                         " starting with a letter or digit")
    return name


def domain_dir(name: str, base: Path | None = None) -> Path:
    return (base or state_dir()) / check_name(name)
