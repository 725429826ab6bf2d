"""When live pre-copy stops (specs/relocation.md, "Convergence"): the parameters, the pure
decision taken after every pre-copy round, and the vCPU throttle (the page output's
pacer is the data plane's).

:func:`decide` is a pure function of the round statistics, so its rules are tested without
a guest. The saver calls it once per round with the dirty pages just fetched (the pages the
next round, or the final one, must send) and acts on the answer: ``continue`` (another
round, at the answer's throttle percentage), ``switch`` (pause and send the final round) or
``cancel`` (stop; the guest keeps running where it is).

Pre-copy never gives up on the downtime target by itself: when it cannot converge (the
timeout passed; or, without a timeout, the dirty set stalled with no throttle left to
raise, or the round cap was reached) ``on_timeout`` decides: ``cancel`` (the default) or
``force`` (switch anyway; the downtime will exceed the target, and the saver says so).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import StrEnum

from ..config import Convergence, OnTimeout  # noqa: F401  (re-exported)



class Reason(StrEnum):
    """Why pre-copy ended (SaveStats.reason; the value is what statistics show)."""
    SMALL = "small"
    DOWNTIME = "downtime-target"
    STALLED = "stalled"
    MAX_ROUNDS = "max-rounds"
    TIMEOUT_FORCE = "timeout-force"
    TIMEOUT_CANCEL = "timeout-cancel"
    OFFLINE = "offline"


SMALL, DOWNTIME, STALLED, MAX_ROUNDS, TIMEOUT_FORCE, TIMEOUT_CANCEL, OFFLINE = tuple(Reason)


class Action(StrEnum):
    """What the saver does after a pre-copy round (:func:`decide`)."""
    CONTINUE = "continue"       # another round, at the decision's throttle
    SWITCH = "switch"           # pause and send the final round
    CANCEL = "cancel"           # stop; the guest keeps running where it is


@dataclass(frozen=True)
class Round:
    """One finished page round: pages queued, stream bytes written, wall seconds to send
    them, and ``lag``: the seconds the receiver still needed once they had left (a
    relocation's SYNC round trip after the round; 0 for a file, written when sent)."""
    pages: int
    bytes: int
    seconds: float
    lag: float = 0.0


RATE_MIN_PAGES = 64     # a round smaller than this says little about seconds per page


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason | None   # for switch and cancel
    estimate: float         # estimated downtime seconds if we switched now
    throttle: int           # percent for the next round (continue), else the current one


def estimate_final(dirty: int, rounds: list[Round], conv: Convergence) -> float:
    """Seconds the downtime would take if the guest paused now, from the rounds so far
    (``rounds``, oldest first): the ``dirty`` pages at the slower seconds per page of the
    last two rounds (those of at least RATE_MIN_PAGES pages; the source's encode and send,
    and the receiver's placing as far as it held the source back), the receiver's lag
    after the last round (what it still had to place when the source was done, and the
    message round trip) in proportion to the pages, at most all of it, and the fixed
    ``state_seconds``. The paused final round competes with no running guest and takes no
    write-protect faults, so it is rarely slower. The lag scales because a backlog does:
    after round 0 (every page, into memory the receiver touches first) a paced 63 MiB
    guest's lag made the estimate of a 700-page final round 19-24 ms, and such rounds took
    6.4-8.4 ms in all (bench_relocation, 2026-12-05)."""
    if not rounds:
        return conv.state_seconds
    recent = [r for r in rounds[-2:] if r.pages >= RATE_MIN_PAGES] or [rounds[-1]]
    per_page = max(r.seconds / r.pages if r.pages else 0.0 for r in recent)
    return dirty * per_page + final_lag(dirty, rounds) + conv.state_seconds


def final_lag(dirty: int, rounds: list[Round]) -> float:
    """The receiver's lag :func:`estimate_final` adds for ``dirty`` pages: the last round's,
    in proportion to the pages, at most all of it (0 before any round)."""
    if not rounds:
        return 0.0
    last = rounds[-1]
    return last.lag * min(1.0, dirty / last.pages) if last.pages else last.lag


def estimate_next(dirty: int, rounds: list[Round], conv: Convergence) -> float:
    """The downtime estimate after one more round: that round sends the ``dirty`` pages
    (at the rate :func:`estimate_final` uses, plus the last lag), and the guest dirties
    pages during it as fast as it dirtied ``dirty`` during the last round (its send and
    lag). Infinite when the last round gives no rate."""
    if not rounds:
        return float("inf")
    last = rounds[-1]
    interval = last.seconds + last.lag
    if interval <= 0:
        return float("inf")
    next_seconds = estimate_final(dirty, rounds, conv) - conv.state_seconds
    return estimate_final(round(dirty / interval * next_seconds), rounds, conv)


def _stalled(history: list[int], conv: Convergence, rounds: int = 1) -> bool:
    """The last ``rounds`` dirty sets each failed to shrink below min_shrink of the one before."""
    if len(history) < rounds + 1:
        return False
    return all(history[-i] > conv.min_shrink * history[-i - 1] for i in range(1, rounds + 1))


def decide(conv: Convergence, history: list[int], rounds: list[Round], elapsed: float,
           throttle: int) -> Decision:
    """After a pre-copy round: ``history`` the dirty-page counts fetched after each round so
    far (round 1 first; the last entry is the set now to send), ``rounds`` the figures of
    the rounds sent so far (round 0 first), ``elapsed`` the seconds since pre-copy began,
    ``throttle`` the percent in force.

    In order: a small dirty set switches. An estimated downtime within the target with
    headroom to spare (estimate * headroom <= target) switches too, unless one more round
    is expected to cut the estimate's page part (all but the fixed state_seconds, which no
    round changes) to min_gain of it or less (:func:`estimate_next`) and the last round
    did not stall, the timeout has not passed and the round cap is not reached: then
    another round. Past the timeout: give up. A
    stalled dirty set (not below min_shrink of the last) raises the throttle when enabled
    (from the second stalled round in a row, then every stalled round, up to
    throttle_max); with a timeout, rounds go on until it passes. Without a timeout, two
    stalled rounds in a row with no throttle left to raise give up (further rounds do not
    pay off), and so does reaching max_rounds. Giving up is ``on_timeout``: cancel, or
    switch (force) with the reason it gave up for.
    """
    dirty = history[-1]
    estimate = estimate_final(dirty, rounds, conv)
    if dirty <= conv.small_pages:
        return Decision(Action.SWITCH, SMALL, estimate, throttle)
    past_timeout = conv.timeout is not None and elapsed >= conv.timeout
    if estimate * conv.headroom <= conv.downtime:
        if (not past_timeout and len(history) < conv.max_rounds and not _stalled(history, conv)
                and estimate_next(dirty, rounds, conv) - conv.state_seconds
                <= conv.min_gain * (estimate - conv.state_seconds)):
            return Decision(Action.CONTINUE, None, estimate, throttle)
        return Decision(Action.SWITCH, DOWNTIME, estimate, throttle)
    if past_timeout:
        return _give_up(conv, TIMEOUT_FORCE, TIMEOUT_CANCEL, estimate, throttle)
    if _stalled(history, conv):
        can_raise = conv.throttle and throttle < conv.throttle_max
        if can_raise and (throttle > 0 or _stalled(history, conv, 2)):
            raised = conv.throttle_initial if throttle == 0 else throttle + conv.throttle_step
            return Decision(Action.CONTINUE, None, estimate, min(raised, conv.throttle_max))
        if not can_raise and conv.timeout is None and _stalled(history, conv, 2):
            return _give_up(conv, STALLED, STALLED, estimate, throttle)
    if conv.timeout is None and len(history) >= conv.max_rounds:
        return _give_up(conv, MAX_ROUNDS, MAX_ROUNDS, estimate, throttle)
    return Decision(Action.CONTINUE, None, estimate, throttle)


def _give_up(conv: Convergence, forced: Reason, cancelled: Reason, estimate: float, throttle: int) -> Decision:
    if conv.on_timeout is OnTimeout.FORCE:
        return Decision(Action.SWITCH, forced, estimate, throttle)
    return Decision(Action.CANCEL, cancelled, estimate, throttle)


class VcpuThrottle:
    """Duty-cycles a domain's vCPU from a thread of the saver: every ``period`` seconds it
    pauses the domain for ``percent`` of the period (QEMU's auto-converge, done from
    outside the guest). ``stop()`` ends the thread and leaves the domain running; it is
    always called (also on errors). A pause or resume that fails ends the throttle and is
    kept in ``error``."""

    def __init__(self, domain, period: float = 0.05):
        self.domain, self.period = domain, period
        self.percent = 0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_percent(self, percent: int) -> None:
        self.percent = max(0, min(99, int(percent)))
        if self.percent and self._thread is None and self.error is None:
            self._thread = threading.Thread(target=self._loop, name="vcpu-throttle", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            held = self.period * self.percent / 100
            if held <= 0:
                self._stop.wait(self.period)
                continue
            try:
                self.domain.pause(durable=False)    # holds the vCPUs back; saves nothing
                self._stop.wait(held)
                self.domain.resume()
            except Exception as exc:     # the domain failed; the saver sees it in its own calls
                self.error = exc
                return
            self._stop.wait(self.period - held)

    def stop(self) -> None:
        """End the thread and wait for it, however long that takes: each of its calls is
        bounded (the domain's pause gives up after its own timeout, and resume waits for
        nothing a throttle started), so the wait is too. Returning while the thread still
        ran would let it resume the guest after the saver's final pause, which finds the
        guest paused already and flushes nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.percent = 0
