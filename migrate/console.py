"""A domain's console: bytes in, lines out, with waiting for a line."""
from __future__ import annotations

import re
import threading
import time
from collections import deque


class Console:
    """Collects console output; keeps the last ``max_lines`` lines.

    Lines get absolute numbers (``first_index`` + position) so a reader can
    ask for "lines after the ones I have seen" even as old ones drop out.
    """

    def __init__(self, max_lines: int = 20000, sink=None):
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._dropped = 0
        self._partial = b""
        self._cv = threading.Condition()
        self._sink = sink

    def feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
        with self._cv:
            text = self._partial + data
            *lines, self._partial = text.split(b"\n")
            for line in lines:
                if len(self._lines) == self._lines.maxlen:
                    self._dropped += 1
                self._lines.append(line.decode("utf-8", "replace"))
            if lines:
                self._cv.notify_all()

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
