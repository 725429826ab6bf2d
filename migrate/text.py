"""Text from outside (a stream, a peer, a guest) as it may go into a message or a log: one
printable line of bounded length; and how often a line about what an outsider does may go
into a log. Imports nothing of the project, so every layer, the client included, can use
it."""
from __future__ import annotations

import math
import time

SHOWN = 200         # characters kept of a path or a name from outside in a message
ONE_LINE = 400      # characters kept of one message or note with text from outside in it


def one_line(text, limit: int = ONE_LINE) -> str:
    """``text`` (anything: str() of it) as one printable line of at most ``limit``
    characters: control characters, newlines among them, escaped as repr escapes them; a
    longer text loses its middle (the start and the last 40 characters are kept, with how
    much was cut between them), or, for a small ``limit``, its end."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) <= limit:
        return text
    head = limit - 40 - len(f"...[{len(text)} characters cut]...")   # the count has at most this many digits
    if head < 20:
        return text[:max(0, limit - 3)] + "..."
    return f"{text[:head]}...[{len(text) - head - 40} characters cut]...{text[-40:]}"

class Sparse:
    """Lines of one kind that an outsider can cause at will (a flood of connections, a
    guest's refused accesses), at most one every ``every`` seconds. :meth:`due` says
    whether one may go now, and how many were held back since the last."""

    def __init__(self, every: float, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.last, self.held = -math.inf, 0

    def due(self) -> tuple[int, float] | None:
        """None: not now (counted as held back); else (how many were held back, seconds
        since the last line), and this one counts as said."""
        now = self.clock()
        if now - self.last < self.every:
            self.held += 1
            return None
        held, since = self.held, now - self.last
        self.last, self.held = now, 0
        return held, since


__all__ = ["ONE_LINE", "SHOWN", "Sparse", "one_line"]
