"""Domain processes a test may leave behind (tests/conftest.py checks after every test;
fixtures that own a state directory kill what they did not destroy)."""
import os
import signal
from pathlib import Path


def domain_processes(root: str) -> dict[int, str]:
    """pid -> state directory of every live domain process whose directory is under
    ``root`` (a zombie, or a process on its way out, has no arguments left to match)."""
    found, prefix = {}, os.fsencode(os.path.join(root, ""))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"migrate.host.domaind" in argv:
            directory = argv[argv.index(b"migrate.host.domaind") + 1:][:1]
            if directory and directory[0].startswith(prefix):
                found[int(pid)] = os.fsdecode(directory[0])
    return found


def kill_domain_processes(base: Path) -> None:
    """SIGKILL every domain process with a pid file under ``base`` (hidden directories
    too: a received domain's before its stream is applied, a discarded one's)."""
    running = domain_processes(str(base))
    for pidfile in base.glob("*/pid"):
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            continue
        if pid in running:              # not a pid reused since by another process
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
