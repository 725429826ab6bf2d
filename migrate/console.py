"""A domain's console: bytes in, lines out, with waiting for a line."""
from __future__ import annotations

import re
import threading
import time
from collections import deque


MAX_LINE = 4096                 # bytes of one line; a longer one (or one that never ends) is cut
MAX_CHARS = 4 << 20             # characters of the lines kept; the oldest go beyond it


class Console:
    """Collects console output; keeps the last ``max_lines`` lines, of at most MAX_CHARS
    together. The guest writes what it likes: a line longer than MAX_LINE bytes, or one
    that never ends, is cut into lines of MAX_LINE bytes, so neither the memory kept nor
    the work per byte grows with it.

    Lines get absolute numbers (``first_index`` + position) so a reader can
    ask for "lines after the ones I have seen" even as old ones drop out.
    """

    def __init__(self, max_lines: int = 20000, sink=None):
        self._lines: deque[str] = deque()
        self._max_lines = max_lines
        self._chars = 0
        self._dropped = 0
        self._partial = b""
        self._cv = threading.Condition()
        self._sink = sink

    def feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
        with self._cv:
            *ended, partial = (self._partial + data).split(b"\n")
            cut = len(partial) - len(partial) % MAX_LINE
            self._partial = partial[cut:]
            for line in ended + [partial[:cut]] if cut else ended:
                for at in range(0, len(line) or 1, MAX_LINE):
                    self._keep(line[at:at + MAX_LINE].decode("utf-8", "replace"))
            if ended or cut:
                self._cv.notify_all()

    def _keep(self, line: str) -> None:
        self._lines.append(line)
        self._chars += len(line)
        while len(self._lines) > self._max_lines or self._chars > MAX_CHARS:
            self._chars -= len(self._lines.popleft())
            self._dropped += 1

    @property
    def next_index(self) -> int:
        with self._cv:
            return self._dropped + len(self._lines)

    def lines(self, start: int = 0) -> list[str]:
        with self._cv:
            skip = max(0, start - self._dropped)
            return list(self._lines)[skip:]

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """The first line at index >= ``start`` matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                skip = max(0, start - self._dropped)
                for i, line in enumerate(list(self._lines)[skip:]):
                    m = regex.search(line)
                    if m:
                        return m
                    start = self._dropped + skip + i + 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n  ".join(list(self._lines)[-5:])
                    raise TimeoutError(f"no console line matching {pattern!r} in {timeout:g}s; "
                                       f"last lines:\n  {tail}")
                self._cv.wait(remaining)
