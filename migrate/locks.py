"""Open-file-description locks (fcntl ``F_OFD_SETLK``, the kind QEMU locks its images
with) and the disk image lock built on them.

An OFD lock belongs to an open file description, not to a process: it goes with the
description to a process that inherits it (a launcher takes the lock and hands the
descriptor to the domain process it starts), and the kernel drops it when the last
descriptor of that description closes, so a domain process that is killed leaves no
lock behind. Locks are advisory: they keep our own tools from stepping on each other.

The disk image lock (specs/relocation.md, "Disk image locks") uses two bytes of the
image file's lock space, never its contents:

- byte 0, WRITER: held (exclusive) by the one domain that may write the image: a running
  or paused domain made by ``hvm create`` or ``hvm restore``, or a received domain once
  the relocation's GO resumed it;
- byte 1, INCOMING: held (exclusive) by a relocation being received into the image,
  from HELLO until its GO (or its end).

A new domain takes WRITER and needs INCOMING free; a relocation being received takes
INCOMING only (the source still holds WRITER: it is that source's own image), and takes
WRITER at GO, after the source let it go just before sending GO. So two domains never
write one image, and a relocation between two daemons of one host (the same image
mapped on both sides) hands the image over at the moment the guest moves.
"""
from __future__ import annotations

import fcntl
import os
import struct
import time
from pathlib import Path

from .text import SHOWN, one_line

_FLOCK = struct.Struct("hhqqi4x")      # struct flock (Linux, 64-bit): type, whence, start, len, pid
WRITER, INCOMING = 0, 1


class DiskBusy(ValueError):
    """The disk image is in use; the message names the holder when it can be found."""


def _fcntl(fd: int, cmd: int, kind: int, start: int, length: int) -> tuple:
    return _FLOCK.unpack(fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)))


def try_lock(fd: int, start: int, length: int = 1) -> bool:
    """Take an exclusive OFD lock on ``length`` bytes at ``start``; False if another open
    file description holds a conflicting one."""
    try:
        _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, start, length)
    except OSError as exc:
        if exc.errno in (11, 13):      # EAGAIN, EACCES
            return False
        raise
    return True


def unlock(fd: int, start: int, length: int = 1) -> None:
    _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start, length)


def held_elsewhere(fd: int, start: int, length: int = 1) -> bool:
    """Whether another open file description holds a lock on those bytes (F_OFD_GETLK)."""
    return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start, length)[0] != fcntl.F_UNLCK


def holders(path: str | os.PathLike, byte: int) -> list[str]:
    """Who holds an OFD lock covering ``byte`` of the file ``path``, as far as /proc
    tells (processes we may look at): "domain NAME (pid N)" for a domain process, else
    "process COMM (pid N)". Slow-ish (a walk of /proc): for error messages only."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                fst = os.stat(f"/proc/{pid}/fd/{fd}")
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = f.read()
            except OSError:
                continue
            if any(_covers(line, dev, byte) for line in info.splitlines() if line.startswith("lock:")):
                found.append(_describe(int(pid)))
                break
    return found


def _covers(line: str, dev: str, byte: int) -> bool:
    """A /proc fdinfo lock line ("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:123 0 0")
    for the file ``dev`` (major:minor:inode) whose range covers ``byte``."""
    words = line.split()
    if len(words) < 9 or words[6] != dev:
        return False
    try:
        return int(words[7]) <= byte and (words[8] == "EOF" or byte <= int(words[8]))
    except ValueError:
        return False


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        argv = []
    if "migrate.host.domaind" in argv:
        at = argv.index("migrate.host.domaind")
        if at + 1 < len(argv):
            return f"domain {Path(argv[at + 1]).name} (pid {pid})"
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    return f"process {comm} (pid {pid})"


class DiskLock:
    """The lock of one disk image, on a descriptor of its own (O_CLOEXEC; a launcher
    passes it to the domain process explicitly). See the module docstring for the bytes."""

    def __init__(self, path: str, fd: int, writer: bool, incoming: bool):
        self.path, self.fd, self.writer, self.incoming = path, fd, writer, incoming

    @staticmethod
    def _open(path: str) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskBusy(f"cannot open the disk image {one_line(path, SHOWN)}: {exc.strerror}") from None

    @classmethod
    def for_domain(cls, path: str) -> "DiskLock":
        """The lock of a new domain's image (WRITER, and no relocation being received
        into it); DiskBusy naming the holder otherwise."""
        fd = cls._open(path)
        lock = cls(path, fd, False, False)
        try:
            lock.take_writer()
            if held_elsewhere(fd, INCOMING):
                raise lock._busy(INCOMING, "a relocation is being received into it by")
        except BaseException:
            os.close(fd)
            raise
        return lock

    @classmethod
    def for_incoming(cls, path: str) -> "DiskLock":
        """The lock of a relocation received into ``path`` (INCOMING); DiskBusy if another
        relocation is being received into it."""
        fd = cls._open(path)
        if not try_lock(fd, INCOMING):
            lock = cls(path, fd, False, False)
            error = lock._busy(INCOMING, "a relocation is being received into it by")
            os.close(fd)
            raise error
        return cls(path, fd, False, True)

    @classmethod
    def from_fd(cls, path: str, fd: int, incoming: bool) -> "DiskLock":
        """The lock a launcher took and passed to this process as ``fd``."""
        os.set_inheritable(fd, False)
        return cls(path, fd, not incoming, incoming)

    def take_writer(self, wait: float = 0.0) -> None:
        """Take WRITER (trying again for up to ``wait`` seconds: a new domain's check may
        hold it for a moment); DiskBusy naming the holder."""
        deadline = time.monotonic() + wait
        while not try_lock(self.fd, WRITER):
            if time.monotonic() >= deadline:
                raise self._busy(WRITER, "it is in use by")
            time.sleep(0.01)
        self.writer = True

    def release_writer(self) -> None:
        if self.writer:
            unlock(self.fd, WRITER)
            self.writer = False

    def release_incoming(self) -> None:
        if self.incoming:
            unlock(self.fd, INCOMING)
            self.incoming = False

    def _busy(self, byte: int, what: str) -> DiskBusy:
        who = holders(self.path, byte)
        return DiskBusy(f"disk image {one_line(self.path, SHOWN)}: {what} {', '.join(who) if who else 'another process'}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.writer = self.incoming = False


__all__ = ["DiskBusy", "DiskLock", "INCOMING", "WRITER", "held_elsewhere", "holders", "try_lock", "unlock"]
