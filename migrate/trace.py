"""Where a pause goes, on one clock across processes: with ``HVM_TRACE=DIR`` in the
environment of the processes of a move (the CLI, ``hvm host serve``, the domain processes
they start inherit it), each :func:`mark` appends ``<time.monotonic()> <pid> <tid> <thread
CPU seconds> <label>`` to ``DIR/<pid>``: the thread's CPU time (``time.thread_time()``)
tells a step that computes from one that waits (for a peer, or for a core: two cores are
shared by both ends of a loopback move). CLOCK_MONOTONIC is one clock for every process of
a host, so the files of both ends of a move on one host (or a loopback benchmark) sort
into one timeline: ``tools/trace_show.py DIR`` prints it, move by move, with each step's
share.

Off (the variable unset), a mark is one test of a module global. On, it costs one
``write`` (about 5 us here), so marks sit at the steps of a pause, not per page or record.
Labels start with the side: ``S`` the source's domain process, ``D`` the destination's
daemon, ``R`` the receiving domain process.
"""
from __future__ import annotations

import os
import threading
import time

_dir: str | None = os.environ.get("HVM_TRACE") or None
_out: tuple[int, int] | None = None          # (pid, fd): a forked child opens its own file


def mark(label: str) -> None:
    """Stamp ``label`` now (a no-op unless tracing is on)."""
    if _dir is None:
        return
    global _out
    pid = os.getpid()
    if _out is None or _out[0] != pid:
        try:
            os.makedirs(_dir, exist_ok=True)
            _out = (pid, os.open(os.path.join(_dir, str(pid)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        except OSError:
            return                  # tracing must never fail what it watches
    try:
        os.write(_out[1], f"{time.monotonic():.6f} {pid} {threading.get_native_id()} "
                          f"{time.thread_time():.6f} {label}\n".encode())
    except OSError:
        pass


def enable(directory: str | None) -> None:
    """Trace into ``directory`` from now on (None: off), in this process."""
    global _dir, _out
    _dir, _out = directory, None
