"""Streams in files: the only module of the engine that opens one.

A save writes ``FILE.partial`` in the target's directory, fsyncs it, renames it to
``FILE`` and fsyncs the directory, so ``FILE`` appears only when complete; on any
failure the partial file is removed and the error propagates.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..stream import DONE, NEED_DATA, StreamReader
from ..stream import DomainConfig as ConfigRecord
from .save import SaveError, SaveStats, save
from .sinks import FileSink
from .state import RestoreError

CHUNK = 1 << 20


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def save_to_file(domain, path: str | os.PathLike, **options) -> SaveStats:
    """:func:`save` into ``path`` atomically (see the module docstring)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SaveError(f"cannot save to {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise SaveError(f"cannot save to {path}: it is a directory")
    partial = partial_path(path)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SaveError(f"cannot save to {path}: {exc.strerror}") from None
    sink = FileSink(fd)
    try:
        try:
            stats = save(domain, sink, **options)
        finally:
            sink.close()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(partial, path)
        _fsync_dir(path.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    return stats


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_chunks(path: str | os.PathLike, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a stream file, ``chunk`` at a time."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise RestoreError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        while data := f.read(chunk):
            yield data


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
