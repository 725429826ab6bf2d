"""Text from outside (a stream, a peer, a guest) as it may go into a message or a log: one
printable line of bounded length. Imports nothing of the project, so every layer, the
client included, can use it."""
from __future__ import annotations

SHOWN = 200         # characters kept of a path or a name from outside in a message


def one_line(text, limit: int = 400) -> str:
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

__all__ = ["SHOWN", "one_line"]
