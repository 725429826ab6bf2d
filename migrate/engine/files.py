"""Streams in files: the only module of the engine that opens one.

A save writes only a regular file it creates: ``FILE.partial`` in the target's directory
(created exclusively, never through a symlink, and locked while the save writes it),
fsynced, renamed to ``FILE`` and the directory fsynced, so ``FILE`` appears only when
complete; on any failure the partial file is removed and the error propagates. A
``FILE`` that exists must be a regular file (it is replaced): a device, FIFO, socket,
symlink or directory is refused before anything is written. A partial file left by a
save that was killed (no lock on it) is removed; one being written is refused. A save to
a stream (``hvm save NAME -``) writes to a descriptor it is given.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

from ..locks import try_lock
from ..stream import DONE, NEED_DATA, StreamReader
from ..stream import DomainConfig as ConfigRecord
from .save import SaveError, SaveStats, save
from .sinks import FileSink
from .state import RestoreError

CHUNK = 1 << 20
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def check_target(path: str | os.PathLike) -> None:
    """SaveError unless ``path`` may be a save's target: it does not exist, or it is a
    regular file (a symlink is not followed: it is refused), in an existing directory."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise SaveError(f"cannot save to {path}: directory {path.parent} does not exist") from None
        return
    except OSError as exc:
        raise SaveError(f"cannot save to {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise SaveError(f"cannot save to {path}: it is {kind}; a save writes only a regular file "
                        f"(or '-' for standard output)")


def save_to_file(domain, path: str | os.PathLike, *, on_written: Callable[[], None] | None = None,
                 **options) -> SaveStats:
    """:func:`save` into ``path`` atomically (see the module docstring). ``on_written()``
    is called once the whole stream is in the file, before it is made durable: a
    checkpoint's guest can run again there, without waiting for the disk (the stream
    holds the state of the pause whatever the guest does next; a failure to sync still
    fails the save and removes the file)."""
    path = Path(path)
    check_target(path)
    partial = partial_path(path)
    fd = _create_partial(path, partial)
    try:
        stats = _save_into(domain, fd, on_written, options)
        os.fsync(fd)
        check_target(path)          # still nothing but a regular file (or nothing) there
        os.rename(partial, path)    # under the partial file's lock still
        os.close(fd)
        fd = -1
        _fsync_dir(path.parent)
        stats.synced = time.monotonic() - stats.start_time
    except BaseException:
        if fd >= 0:
            os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    return stats


def _create_partial(path: Path, partial: Path) -> int:
    """``partial`` created exclusively (never through a symlink) and locked; a stale one
    (a killed save's: nobody holds its lock) is replaced; one being written is refused."""
    for attempt in (1, 2):
        try:
            return _locked_file(partial)
        except FileExistsError:
            if attempt == 2 or not drop_stale_partial(path):
                raise SaveError(f"cannot save to {path}: {partial.name} is being written by another "
                                f"save (or is not a regular file)") from None
        except OSError as exc:
            raise SaveError(f"cannot save to {path}: {exc.strerror}") from None
    raise AssertionError("unreachable")


def _locked_file(partial: Path) -> int:
    """A new file named ``partial`` (FileExistsError if the name is taken, a symlink
    included), locked whole (tells another save this one is alive) before its name appears:
    made unnamed (O_TMPFILE) and then linked, so no other save ever finds it unlocked and
    takes it for a killed save's. Where the filesystem cannot make one unnamed, it is made
    by name and locked at once."""
    try:
        fd = os.open(partial.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try_lock(fd, 0, 0)
        return fd
    try:
        try_lock(fd, 0, 0)
        procfd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:        # linkat(AT_SYMLINK_FOLLOW) of its /proc link (a plain link() would not follow it)
            os.link(str(fd), partial, src_dir_fd=procfd, follow_symlinks=True)   # never over anything
        finally:
            os.close(procfd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def drop_stale_partial(path: Path) -> bool:
    """Remove ``path``'s partial file if it is a killed save's (a regular file no save holds
    a lock on): one that a save still writes, or a later save's, stays. Removed while its
    lock is held here, and only if the name still is that file (a save that replaced it
    meanwhile keeps its own). Whether the name is free now (removed, or nothing there)."""
    partial = partial_path(path)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.ENOENT
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and try_lock(fd, 0, 0)):
            return False
        now = os.stat(partial, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        partial.unlink()
        return True
    except OSError as exc:
        return exc.errno == errno.ENOENT
    finally:
        os.close(fd)


def save_to_stream(domain, fd: int, *, on_written: Callable[[], None] | None = None,
                   **options) -> SaveStats:
    """:func:`save` into the descriptor ``fd`` (a pipe, a terminal-less standard output,
    a file opened by someone else); fsynced at the end when it is a regular file, after
    ``on_written()`` (as :func:`save_to_file`). A failed save leaves a stream without END
    there, which any reader refuses."""
    stats = _save_into(domain, fd, on_written, options)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.fsync(fd)
        stats.synced = time.monotonic() - stats.start_time
    return stats


def _save_into(domain, fd: int, on_written: Callable[[], None] | None, options: dict) -> SaveStats:
    """:func:`save` into ``fd`` through a :class:`FileSink`; ``on_written()`` once the
    stream is whole, before the data plane is freed."""
    sink = FileSink(fd)
    try:
        stats = save(domain, sink, **options)
        if on_written is not None:
            on_written()
        return stats
    finally:
        sink.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileChunks:
    """The bytes of stream files read one after the other, for a reader that reads them
    once: ``sources`` are paths, or descriptors this object owns (it closes each file at
    its end, and what is left in :meth:`close`). Iterated, it yields ``chunk`` bytes at a
    time, each read into the same buffer and good until the next is asked for (a
    StreamReader copies what it is fed); :meth:`readinto` reads straight into the caller's
    buffer instead, as StreamReader.read_from asks, so that a restore's page batches land
    in the buffers it places them from, without a copy."""

    def __init__(self, sources, chunk: int = CHUNK) -> None:
        self._sources = list(sources)
        self._chunk = chunk
        self._file = None

    def _next_file(self):
        while self._file is None and self._sources:
            source = self._sources.pop(0)
            if isinstance(source, int):
                try:
                    self._file = os.fdopen(source, "rb", buffering=0)
                except OSError as exc:
                    os.close(source)
                    raise RestoreError(f"cannot read descriptor {source}: {exc.strerror}") from None
                continue
            try:
                self._file = open(source, "rb", buffering=0)
            except OSError as exc:
                raise RestoreError(f"cannot read {source}: {exc.strerror}") from None
        return self._file

    def readinto(self, view) -> int:
        """Read into ``view``: how many bytes (0 once every file has ended)."""
        while (f := self._next_file()) is not None:
            if n := f.readinto(view):
                return n
            f.close()
            self._file = None
        return 0

    def __iter__(self) -> Iterator[memoryview]:
        buf = bytearray(self._chunk)
        try:
            with memoryview(buf) as view:
                while n := self.readinto(view):
                    yield view[:n]
        finally:                    # the end, or a reader that stopped early
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for source in self._sources:
            if isinstance(source, int):
                os.close(source)
        self._sources = []


def file_chunks(path: str | os.PathLike, chunk: int = CHUNK) -> FileChunks:
    """The bytes of the stream file ``path`` (FileChunks: opened when first read; a file
    that cannot be read raises RestoreError then)."""
    return FileChunks([path], chunk)


def read_config(path: str | os.PathLike) -> dict:
    """The DOMAIN_CONFIG map of a stream file, read (and checked) up to that record."""
    reader = StreamReader()
    for data in file_chunks(path, 64 << 10):
        reader.feed(data)
        while (record := reader.next_record()) is not NEED_DATA:
            if record is DONE:
                break
            if isinstance(record, ConfigRecord):
                return record.config
    reader.eof()
    raise RestoreError(f"{path}: stream has no DOMAIN_CONFIG")
