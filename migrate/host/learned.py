"""What past relocations from this host measured of the downtime's fixed part, per
destination (specs/relocation.md, section 6): the state's capture, records, check and apply
and the handoff, the part of a pause that does not grow with the last dirty pages (measured
as what the estimate's other terms leave of the downtime: :func:`fixed_part`, kept only
from moves where those terms were small: :func:`worth_keeping`). The
convergence estimate's ``state_seconds`` is a constant measured on one kind of host (7 ms);
a slower host, or a slower link to one destination, pays more, and the estimate then falls
short. So after each live relocation the source keeps what that part took, and the next move
to the same destination starts from the largest of the last KEEP of them with a margin
for the pause's noise (and from the default, until KEEP are kept, if larger), leaving out
one far above the others and never above a share of the move's target (:func:`expected`).

The record is a small JSON file in the state directory (``.downtime.json``), rewritten in
one write (no temporary file to leave behind); anything unreadable in it, a torn write
included, is ignored and replaced (it only tunes an estimate).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from ..engine.convergence import Reason

FILE = ".downtime.json"      # a dot: never a domain's name (statedir.NAME_RE), and not listed as one
KEEP = 5                    # measurements kept per destination
MAX_DESTINATIONS = 64       # the oldest destination goes beyond this
MIN_SECONDS, MAX_SECONDS = 0.001, 1.0      # a measurement outside these is not kept
KEEP_SHARE = 0.5            # kept only from a move whose other terms were at most this share
MARGIN = 1.25               # the largest kept, times this, is what a move expects
OUTLIER = 4.0               # one over this many times the median of the others is left out
FROM_REASONS = (Reason.SMALL, Reason.DOWNTIME)   # see from_move
TARGET_SHARE = 0.4          # a move expects at most this share of its downtime target (or the default)


def fixed_part(downtime: float, estimate: float, fixed: float) -> float | None:
    """What the fixed part of a relocation's downtime turned out to be: the measured
    ``downtime`` less the estimate's other terms (``estimate`` made with fixed part
    ``fixed``: the last pages at the rounds' rate and the destination's lag). So it also
    takes in what those terms missed on this path: the last round's own costs (the dirty
    log's fetch, the channels' barrier, END), whatever the guest dirtied between the
    switch and the pause. None without an estimate."""
    if not estimate > 0:
        return None
    value = downtime - (estimate - fixed)
    return value if math.isfinite(value) else None


def from_move(stats) -> bool:
    """Whether a move (its SaveStats) may teach the fixed part at all: it switched on its
    own (reason in FROM_REASONS) and was never throttled. A forced switch, or one made
    under the throttle, which is released before the pause, sends a last round larger
    than the set its estimate was made for, and the excess would count as fixed."""
    return stats.reason in FROM_REASONS and not any(stats.throttle_history)


def worth_keeping(downtime: float, estimate: float, fixed: float) -> bool:
    """Whether a move's :func:`fixed_part` says what the fixed part is: only when the
    estimate's other terms (the last pages and the lag, ``estimate - fixed``) were at most
    KEEP_SHARE of the measured ``downtime``. Those terms are rates from pre-copy rounds,
    with the guest running and write-protect faults, and the paused final round goes
    faster: after a large final round they can come to most of the downtime, and what they
    leave of it is far below the fixed part (2.6-3.1 ms kept after flat-out 511 MiB moves
    where idle ones took 5-7 ms, and the next small move's downtime was then 1.4-1.9x its
    estimate; AMD host, 2026-12-06). A small final round leaves the fixed part nearly
    alone, however wrong its rate."""
    return estimate > 0 and estimate - fixed <= KEEP_SHARE * downtime


def load(path: Path, destination: str) -> float | None:
    """The fixed part to expect on a move to ``destination`` (HOST:PORT): the largest of
    the last KEEP measured, or None (no record, or an unreadable one)."""
    values = _read(path).get(destination)
    return max(values) if values else None


def expected(path: Path, destination: str, default: float, target: float = math.inf) -> float:
    """The fixed part to expect on a move to ``destination``: MARGIN times the largest of
    the last KEEP measured, and while fewer than KEEP are kept, ``default`` if larger. The
    largest of one or two measures of a noisy pause is often below the next one (idle
    pauses of 5.0-6.7 ms on one host: a move whose fixed part came from a 5.0 ms one took
    1.33x its estimate; AMD host, 2026-12-06), and even the largest of five can be: 3.64
    ms, then 4.88 ms, a move at 1.31x its estimate (Intel host, 2026-12-07).

    Two bounds keep one slow pause (a hiccup, or a destination that held RESTORED back:
    the measure is the source's, of a peer it cannot trust) from setting every later move's
    estimate: a value over OUTLIER times the median of the others kept is left out, until
    most of the last KEEP say the same; and a move expects at most TARGET_SHARE of its
    downtime ``target`` (but at least ``default``). A fixed part of 1 s against a 300 ms
    target would otherwise never let a busy guest switch on the target, and its moves,
    given up, would keep nothing that could replace it."""
    values = _believed(_read(path).get(destination, []))
    bounds = [MARGIN * max(values)] if values else []
    return min(max(bounds + ([default] if len(values) < KEEP else [])), max(default, TARGET_SHARE * target))


def _believed(values: list[float]) -> list[float]:
    """``values`` less those over OUTLIER times the median of the others."""
    if len(values) < 2:
        return values
    return [v for i, v in enumerate(values) if v <= OUTLIER * statistics.median(values[:i] + values[i + 1:])]


def record(path: Path, destination: str, seconds: float) -> None:
    """Keep ``seconds``, measured on a move to ``destination``. Errors writing are ignored:
    the record only tunes an estimate."""
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        return
    table = _read(path)
    values = table.pop(destination, [])[-(KEEP - 1):] + [seconds]
    table[destination] = values             # the most recent last
    while len(table) > MAX_DESTINATIONS:
        table.pop(next(iter(table)))
    data = json.dumps({"version": 1, "destinations": table}).encode()
    try:        # in place, in one write: a process killed in it leaves at worst a torn file,
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)    # read as none
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read(path: Path) -> dict[str, list[float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    table = data.get("destinations") if isinstance(data, dict) and data.get("version") == 1 else None
    if not isinstance(table, dict):
        return {}
    out = {}
    for key, values in list(table.items())[-MAX_DESTINATIONS:]:
        if isinstance(key, str) and isinstance(values, list):
            kept = [v for v in values[-KEEP:] if isinstance(v, float) and MIN_SECONDS <= v <= MAX_SECONDS]
            if kept:
                out[key] = kept
    return out
