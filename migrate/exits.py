"""The exit statuses of the `hvm` commands, which scripts can rely on (README, "Exit
status"), and the one place that turns an error into one.

    0    done
    1    failed; the guest is intact where it was (the message says where)
    2    usage: the command line (or the environment, e.g. HVM_STATE_DIR) is wrong; nothing was done
    3    outcome unknown: the guest may be paused on both sides (or a destroyed domain's process has
         not ended, or a request its process took went unanswered); the message says what to do
    130  interrupted (Ctrl-C): the job was cancelled; the message says the guest's state

With ``--json`` an error is a JSON object too, on the stream the command's JSON goes to:
``{"error": "...", "outcome": "failed", "exit": 1, "guest": "running here"}`` (``guest``
when known). Library errors are mapped by their type (and a ControlError by its
``kind``), never by their text; an error of any other type is a bug and stays a traceback.
"""
from __future__ import annotations

import functools
import json

import click

OK, FAILED, USAGE, UNKNOWN, INTERRUPTED = 0, 1, 2, 3, 130
OUTCOMES = {OK: "done", FAILED: "failed", USAGE: "usage", UNKNOWN: "unknown", INTERRUPTED: "interrupted"}

EPILOG = """\b
Exit status:
  0    done
  1    failed; the guest is intact where it was (the message says where)
  2    usage error; nothing was done
  3    outcome unknown (a relocation: the guest is kept paused here); the message says what to do
  130  interrupted (Ctrl-C): the job was cancelled; the message says the guest's state
With --json (where a command has it), errors are JSON too: {"error", "outcome", "exit", "guest"}."""
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
JSON_TO_STDERR = "hvm.json_to_stderr"      # ctx.meta key: this command's stdout is not for JSON


class Failure(click.ClickException):
    """An error as the command line shows it: its line, its exit status and, when known,
    the guest's state; as JSON when the command was asked for JSON."""

    def __init__(self, message: str, code: int = FAILED, guest: str | None = None):
        super().__init__(message)
        self.exit_code, self.guest = code, guest
        self.as_json, self.json_err = False, False

    def as_dict(self) -> dict:
        out = {"error": self.message, "outcome": OUTCOMES.get(self.exit_code, "failed"),
               "exit": self.exit_code}
        if self.guest:
            out["guest"] = self.guest
        return out

    def show(self, file=None) -> None:
        if self.as_json:
            click.echo(json.dumps(self.as_dict()), err=self.json_err)
        else:
            click.echo(f"Error: {self.message}", err=True)


class _JsonUsageError(click.UsageError):
    def show(self, file=None) -> None:
        err = bool(self.ctx and self.ctx.meta.get(JSON_TO_STDERR))
        click.echo(json.dumps({"error": self.format_message(), "outcome": OUTCOMES[USAGE],
                               "exit": USAGE}), err=err)


def _as_json(exc: click.UsageError, wants_json: bool, ctx=None) -> click.UsageError:
    """The usage error to raise: ``exc`` itself, or as JSON when ``--json`` is on."""
    if not wants_json or isinstance(exc, _JsonUsageError):
        return exc
    return _JsonUsageError(exc.format_message(), exc.ctx or ctx)


class _JsonUsage:
    """Usage errors as JSON when ``--json`` is on the command line."""

    def make_context(self, info_name, args, parent=None, **extra):
        wants_json = "--json" in args       # before parsing, which consumes args
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _as_json(exc, wants_json) from None


class Command(_JsonUsage, click.Command):
    """A command whose usage errors are JSON when ``--json`` is on its command line."""


class Group(_JsonUsage, click.Group):
    """The commands of a Group say the exit statuses in their --help (the epilog)."""
    command_class = Command

    def command(self, *args, **kwargs):
        kwargs.setdefault("epilog", EPILOG)
        return super().command(*args, **kwargs)


Group.group_class = Group


def failure(exc: BaseException) -> Failure | None:
    """The Failure an exception stands for; None for a bug (it propagates as a traceback)."""
    from .cpu import CpuModelError
    from .dataplane import DataplaneError
    from .domain import DomainError
    from .engine import RestoreError, SaveError
    from .kvm import KvmError
    from .host import control
    from .host.control import ControlError
    from .host.statedir import BadName, StateDirError
    from .host.tls import TlsError
    from .stream import StreamError
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, ControlError):
        return Failure(str(exc), {control.UNKNOWN: UNKNOWN, control.INTERRUPTED: INTERRUPTED}
                       .get(exc.kind, FAILED), exc.guest)
    if isinstance(exc, (StateDirError, BadName)):
        return Failure(str(exc), USAGE)
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", INTERRUPTED)
    if isinstance(exc, (CpuModelError, DataplaneError, DomainError, KvmError, RestoreError, SaveError,
                        StreamError, TlsError, ValueError)):
        return Failure(str(exc), FAILED)
    return None


def handled(fn):
    """A command callback whose errors leave as Failures (see the module docstring); the
    guest's state is looked up for a command with a ``name`` when the error did not say."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.UsageError as exc:     # raised by the command itself: JSON too with --json
            raise _as_json(exc, bool(kwargs.get("as_json")), click.get_current_context(silent=True)) from None
        except BaseException as exc:
            out = failure(exc)
            if out is None:
                raise
            if out.guest is None and out.exit_code != USAGE and isinstance(kwargs.get("name"), str):
                out.guest = guest_state(kwargs["name"])
            ctx = click.get_current_context(silent=True)
            out.as_json = bool(kwargs.get("as_json"))
            out.json_err = bool(ctx and ctx.meta.get(JSON_TO_STDERR))
            raise out from None
    return wrapper


def guest_state(name: str) -> str | None:
    """``"running here"``, ``"paused here"``, ``"crashed here"``, ``"none here"``: what this
    host holds under ``name`` now; None when it cannot be told."""
    from .host import control
    try:
        with control.DomainClient(name, timeout=2.0) as client:
            return f"{client.call('info')['status']} here"
    except control.ControlError as exc:        # "crashed here" for a crashed one (its guest is lost)
        return "none here" if exc.kind == control.NO_DOMAIN else exc.guest
    except (OSError, ValueError):
        return None


def echo_json(data: dict) -> None:
    """Print a command's JSON result where its JSON goes (stderr when stdout carries data)."""
    ctx = click.get_current_context(silent=True)
    click.echo(json.dumps(data), err=bool(ctx and ctx.meta.get(JSON_TO_STDERR)))


def warn(line: str) -> None:
    click.echo(f"warning: {line}", err=True)


__all__ = ["EPILOG", "FAILED", "Failure", "Group", "HELP_OPTIONS", "INTERRUPTED", "OK", "UNKNOWN",
           "USAGE", "echo_json", "failure", "guest_state", "handled", "warn"]
