"""The domain process's interface, declared once: how it is launched and what it says.

A domain process (:mod:`migrate.host.domaind`) is started as
``python -m migrate.host.domaind DIR SPEC``: DIR its state directory, SPEC a
:class:`Launch` (hex of a msgpack map) in one of three modes, each a dataclass below:
:class:`Create` (boot a new domain), :class:`Restore` (from a stream on a descriptor) and
:class:`Receive` (an incoming relocation, fed by the relocation daemon). Its launcher
(:mod:`migrate.host.control`, :mod:`migrate.host.destination`) builds the spec; the
process decodes and checks it (:func:`decode`): every key of its mode, with its type.

It answers on its *ready pipe* in lines, each a :class:`Line` of one kind of
:class:`Say`, whose fields are declared in :data:`LINES`:

=========== ======================================= ==========================================
kind        line                                    when
=========== ======================================= ==========================================
AT          ``at BYTES``                            receive, restore: stream bytes applied so far
                                                    (restore: at most once a second)
ROUND       ``round N``                             receive: every data channel ended N rounds
CHANNELS    ``channels BYTES``                      receive: bytes the data channels carried so
                                                    far, while they grow (at most twice a second)
OK          ``ok`` / ``ok BYTES END_AT APPLIED_AT`` started (create, restore) / state applied
                                                    (receive: the stream's length, when END
                                                    was read and the state applied, seconds of
                                                    CLOCK_MONOTONIC)
TAKEN       ``taken TAKEN_AT``                      receive: GO came on data channel 0 (when); the
                                                    answer to it follows (RUNNING, PAUSED, REFUSED)
RUNNING     ``running RESUMED_AT``                  receive, after GO: the guest runs
PAUSED      ``paused``                              receive, after ``go paused``: kept paused
REFUSED     ``refused: REASON``                     receive, after GO: it could not resume the
                                                    pair, which never ran and is destroyed
ERROR       ``error: REASON``                       it failed (before GO: nothing ran)
=========== ======================================= ==========================================

A reader that finds the pipe closed with no answer makes a line of kind EXITED itself
(:func:`exited`: the last line the process wrote to its standard error); a line that is
not one of these is kind UNKNOWN with the line as its text (a bug of the sender: reported
as what it said, and after GO it does not say whether the guest ran). The relocation daemon says GO on the *go pipe*: ``go`` or ``go
paused`` (:class:`Go`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import msgpack


class LaunchError(ValueError):
    """A launch spec that is not one (a bug of the launcher)."""


# -- the launch spec ------------------------------------------------------------------------
@dataclass
class Create:
    """Boot a new domain: ``config`` is a DomainConfig as a map."""
    config: dict


@dataclass
class Restore:
    """Restore from the stream on ``stream_fd``, read once, after the bytes of the memfd
    ``head_fd`` (-1: none) that the launcher read to check it. ``name``: the domain's name;
    ``paused``: leave it paused; ``fresh_stub``: True boots a fresh stub, None decides by the
    stub build (migrate.engine.restore); ``disk``: the disk image here ("": the saved one);
    ``net``: the bridge or TAP device here for the NIC ("": the saved one)."""
    stream_fd: int
    head_fd: int
    name: str
    paused: bool
    fresh_stub: bool | None
    disk: str
    net: str


@dataclass
class Receive:
    """Restore an incoming relocation from the pipe ``stream_fd`` (specs/relocation.md,
    section 4), stay paused, wait for GO on ``go_fd``; the rest is what HELLO said and what
    the daemon decided: the stream must match ``memory``, ``stub``, ``disk_from``,
    ``net_from`` and ``vcpus``; the domain is named ``name``, its disk is ``disk_to`` and its
    NIC hangs on ``net_to``; ``cpu``: HELLO's CPU records (or None); ``channels`` data
    channels arrive on the unix socket ``channel_fd`` with ``token`` (TLS with the keys in
    ``tls_dir``), and with ``handoff`` channel 0 carries READY and GO after its pages; no GO within ``resume_timeout`` seconds destroys the copy; ``hugepages``:
    the guest's RAM of 2 MiB huge pages (this host's choice, ``hvm host serve --hugepages``)."""
    stream_fd: int
    go_fd: int
    name: str
    memory: int
    stub: bool
    disk_from: str | None
    disk_to: str | None
    net_from: dict | None
    net_to: str | None
    resume_timeout: float
    cpu: dict | None
    channels: int
    token: bytes
    tls_dir: str | None
    channel_fd: int
    vcpus: int
    hugepages: bool
    live: bool
    handoff: bool


MODES: dict[str, type] = {"create": Create, "restore": Restore, "receive": Receive}


@dataclass
class Launch:
    """A domain process's whole launch: its answer goes to ``ready_fd``; ``lock_fd``: the
    disk image lock its launcher took (migrate.locks), held for the process's life."""
    job: Create | Restore | Receive
    ready_fd: int
    lock_fd: int | None = None

    @property
    def mode(self) -> str:
        return next(name for name, kind in MODES.items() if isinstance(self.job, kind))

    def fds(self) -> tuple[int, ...]:
        """The descriptors the process inherits (every ``*_fd`` of the spec that is set)."""
        out = [self.ready_fd] + ([self.lock_fd] if self.lock_fd is not None else [])
        out += [getattr(self.job, f.name) for f in dataclasses.fields(self.job) if f.name.endswith("_fd")]
        return tuple(fd for fd in out if fd >= 0)


def argv(directory: Path, launch: Launch) -> list[str]:
    """The arguments after ``python -m migrate.host.domaind``."""
    spec = {"mode": launch.mode, "ready_fd": launch.ready_fd, "lock_fd": launch.lock_fd,
            **dataclasses.asdict(launch.job)}
    return [str(directory), msgpack.packb(spec, use_bin_type=True).hex()]


def decode(args: list[str]) -> tuple[Path, Launch]:
    """:func:`argv` back, every key checked (LaunchError)."""
    if len(args) != 2:
        raise LaunchError(f"usage: python -m migrate.host.domaind DIR SPEC (got {len(args)} arguments)")
    try:
        spec = msgpack.unpackb(bytes.fromhex(args[1]), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise LaunchError(f"launch spec is not hex msgpack: {exc}") from None
    if not isinstance(spec, dict) or spec.get("mode") not in MODES:
        raise LaunchError("launch spec is not a map with a known mode")
    kind = MODES[spec.pop("mode")]
    ready_fd, lock_fd = _typed(spec.pop("ready_fd", None), int, "ready_fd"), spec.pop("lock_fd", None)
    if lock_fd is not None:
        _typed(lock_fd, int, "lock_fd")
    hints = typing.get_type_hints(kind)
    names = [f.name for f in dataclasses.fields(kind)]
    if set(spec) != set(names):
        raise LaunchError(f"{kind.__name__} spec has keys {sorted(spec)}, expected {sorted(names)}")
    job = kind(**{name: _typed(spec[name], hints[name], name) for name in names})
    return Path(args[0]), Launch(job, ready_fd, lock_fd)


def _typed(value, kind, name: str):
    if value is None and kind is not type(None) and type(None) not in typing.get_args(kind):
        raise LaunchError(f"launch spec lacks {name}")
    plain = tuple(typing.get_origin(k) or k for k in (typing.get_args(kind) or (kind,)))
    if not isinstance(value, plain) or (isinstance(value, bool) and bool not in plain):
        if not (float in plain and isinstance(value, int) and not isinstance(value, bool)):
            raise LaunchError(f"launch spec {name} is {type(value).__name__}, expected {kind}")
    return value


# -- what the domain process says ---------------------------------------------------------
class Say(StrEnum):
    """The kinds of line on the ready pipe (module docstring)."""
    AT = "at"
    ROUND = "round"
    CHANNELS = "channels"
    OK = "ok"
    TAKEN = "taken"
    RUNNING = "running"
    PAUSED = "paused"
    REFUSED = "refused"
    ERROR = "error"
    EXITED = "exited"       # made by the reader: the pipe closed without an answer
    UNKNOWN = "unknown"     # made by the reader: a line that is none of the above


# kind -> its fields, in order (name, type); None: free text after "KIND: "
LINES: dict[Say, tuple[tuple[str, type], ...] | None] = {
    Say.AT: (("bytes", int),),
    Say.ROUND: (("rounds", int),),
    Say.CHANNELS: (("bytes", int),),
    Say.OK: (("bytes", int), ("end_at", float), ("applied_at", float)),     # or none (create, restore)
    Say.TAKEN: (("taken_at", float),),
    Say.RUNNING: (("resumed_at", float),),
    Say.PAUSED: (),
    Say.REFUSED: None,
    Say.ERROR: None,
    Say.EXITED: None,
    Say.UNKNOWN: None,
}
FAILURES = (Say.REFUSED, Say.ERROR, Say.EXITED, Say.UNKNOWN)
PROGRESS = (Say.AT, Say.ROUND, Say.CHANNELS)


@dataclass(frozen=True)
class Line:
    """One line of the ready pipe: its ``kind``, its ``values`` (LINES) or its ``text``."""
    kind: Say
    values: tuple = ()
    text: str = ""

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES

    def __getattr__(self, name: str):
        fields = LINES.get(self.kind) or ()
        for i, (field, _) in enumerate(fields):
            if field == name and i < len(self.values):
                return self.values[i]
        raise AttributeError(f"{self.kind} line has no {name}")

    def format(self) -> str:
        """The line as written (without its newline)."""
        if self.kind is Say.UNKNOWN:
            return self.text
        if LINES[self.kind] is None:
            return f"{'error' if self.kind is Say.EXITED else self.kind}: {' '.join(self.text.split())}"
        words = [str(self.kind)] + [f"{v:.6f}" if isinstance(v, float) else str(v) for v in self.values]
        return " ".join(words)

    @property
    def reason(self) -> str:
        """What a failure says (its text); for any other line, the line."""
        return self.text if self.failed else self.format()


def say(kind: Say, *values, text: str = "") -> bytes:
    """A line to write on the ready pipe."""
    return (Line(kind, values, text).format() + "\n").encode()


def parse(raw: str) -> Line:
    """A line read from the ready pipe (without its newline)."""
    line = raw.strip()
    head, colon, rest = line.partition(":")
    if colon and head in (Say.ERROR, Say.REFUSED) and " " not in head:
        return Line(Say(head), text=rest.strip())
    word, *words = line.split() or [""]
    fields = LINES.get(word) if word in tuple(Say) else None
    if fields is not None and (len(words) == len(fields) or (word == Say.OK and not words)):
        try:
            return Line(Say(word), tuple(kind(w) for (_, kind), w in zip(fields, words)))
        except ValueError:
            pass
    return Line(Say.UNKNOWN, text=line)


def exited(stderr: str) -> Line:
    """The answer of a process that ended without giving one: ``stderr`` is what it wrote to
    its standard error; its last line says why."""
    lines = stderr.strip().splitlines()
    return Line(Say.EXITED, text="domain process exited" + (f": {lines[-1]}" if lines else ""))


# -- the go pipe ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Go:
    """GO (specs/relocation.md, "Handoff"): resume the received pair, or keep it paused."""
    paused: bool = False

    def encode(self) -> bytes:
        return b"go paused\n" if self.paused else b"go\n"

    @classmethod
    def decode(cls, data: bytes) -> "Go | None":
        """The GO written, or None for anything else (the relocation was given up)."""
        words = data.split()
        if not words or words[0] != b"go" or words[1:] not in ([], [b"paused"]):
            return None
        return cls(paused=words[1:] == [b"paused"])


__all__ = ["Create", "FAILURES", "Go", "LINES", "Launch", "LaunchError", "Line", "MODES", "PROGRESS",
           "Receive", "Restore", "Say", "argv", "decode", "exited", "parse", "say"]
