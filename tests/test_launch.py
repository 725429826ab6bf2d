"""The domain process's launch spec and pipe lines (migrate.host.launch): declared once,
written and read by the same code, and anything else refused or marked."""
import os
import time
from pathlib import Path

import pytest

from migrate.host import launch
from migrate.host.launch import Create, Go, Launch, LaunchError, Line, Receive, Restore, Say, parse, say


def receive_job(**changes):
    job = dict(stream_fd=5, go_fd=6, name="web1", memory=64 << 20, stub=True, disk_from=None, disk_to=None,
               net_from={"link": "tap", "name": "t0"}, net_to="t9", resume_timeout=60.0, cpu=None, channels=2,
               token=b"t" * 32, tls_dir="/etc/hvm", channel_fd=7, vcpus=2, hugepages=False, live=True,
               handoff=True)
    return Receive(**{**job, **changes})


@pytest.mark.parametrize("job", [Create({"name": "a", "workload": "idle", "memory": 16 << 20}),
                                 Restore(3, -1, "a", True, None, "", ""), Restore(3, 4, "", False, True, "/d.img", "br1"),
                                 receive_job(), receive_job(disk_to="/x", tls_dir=None, cpu={"guest": []})])
def test_a_launch_spec_round_trips(job):
    spec = Launch(job, ready_fd=9, lock_fd=11 if isinstance(job, Restore) else None)
    args = launch.argv(Path("/run/hvm/a"), spec)
    assert args[0] == "/run/hvm/a"              # hvm list and the locks find the process by it
    assert launch.decode(args) == (Path("/run/hvm/a"), spec)
    assert 9 in spec.fds() and -1 not in spec.fds()


def test_a_bad_launch_spec_is_refused():
    good = launch.argv(Path("/d"), Launch(Restore(3, -1, "a", True, None, "", ""), 9))
    with pytest.raises(LaunchError, match="not hex msgpack"):
        launch.decode(["/d", "zz"])
    with pytest.raises(LaunchError, match="usage"):
        launch.decode(["/d"])
    import msgpack
    spec = msgpack.unpackb(bytes.fromhex(good[1]))
    for change, error in [({"mode": "boot"}, "known mode"), ({"paused": 1}, "paused is int"),
                          ({"stream_fd": "3"}, "stream_fd is str"), ({"extra": 1}, "keys"),
                          ({"ready_fd": None}, "lacks ready_fd"), ({"name": None}, "lacks name")]:
        with pytest.raises(LaunchError, match=error):
            launch.decode(["/d", msgpack.packb({**spec, **change}).hex()])


def test_every_line_is_read_back_as_it_was_said():
    said = [say(Say.AT, 4096), say(Say.ROUND, 3), say(Say.OK), say(Say.OK, 123, 10.5, 10.75),
            say(Say.RUNNING, 99.25), say(Say.PAUSED), say(Say.REFUSED, text="disk busy:\nheld"),
            say(Say.ERROR, text="stream does not match HELLO")]
    lines = [parse(raw.decode()) for raw in said]
    assert [line.kind for line in lines] == [Say.AT, Say.ROUND, Say.OK, Say.OK, Say.RUNNING, Say.PAUSED,
                                             Say.REFUSED, Say.ERROR]
    assert lines[0].bytes == 4096 and lines[1].rounds == 3 and lines[2].values == ()
    assert (lines[3].bytes, lines[3].end_at, lines[3].applied_at) == (123, 10.5, 10.75)
    assert lines[4].resumed_at == 99.25
    assert lines[6].reason == "disk busy: held" and lines[6].failed      # one line, kind and text
    assert said[6] == b"refused: disk busy: held\n" and said[0] == b"at 4096\n"
    assert not any(line.failed for line in lines[:6])


@pytest.mark.parametrize("raw", ["", "at", "at x", "ok 1 2", "running", "running soon", "go", "OK",
                                 "exited: no"])
def test_anything_else_is_unknown_not_a_failure_of_a_kind(raw):
    line = parse(raw)
    assert line.kind is Say.UNKNOWN and line.failed and line.reason == raw.strip()


def test_exited_is_made_by_the_reader():
    line = launch.exited("Traceback...\nValueError: boom\n")
    assert line.kind is Say.EXITED and line.reason == "domain process exited: ValueError: boom"
    assert launch.exited("").reason == "domain process exited"


def test_go():
    assert Go.decode(Go().encode()) == Go(False) and Go.decode(Go(True).encode()) == Go(True)
    assert [Go.decode(b) for b in (b"", b"gone\n", b"go later\n", b"stop\n")] == [None] * 4


class _Intake:
    """A data channel intake whose channels end rounds 0 and 1, the second with FINAL."""

    def __init__(self):
        self.asked = []

    def wait_round(self, round_, timeout):
        self.asked.append(round_)
        if round_ < 2:
            return True
        time.sleep(timeout)
        return False

    def ended_final(self, round_):
        return round_ == 1


def test_the_round_reporter_says_every_round_but_the_final_one():
    """ROUND lines answer the source's SYNC after pre-copy rounds; the last round, which
    ends with FINAL syncs, comes in the pause and no SYNC asks for it: no line, so the
    daemon is not woken for it then."""
    from migrate.host.domaind import _RoundReporter
    r, w = os.pipe()
    intake = _Intake()
    reporter = _RoundReporter(intake, w)
    deadline = time.monotonic() + 5
    while 2 not in intake.asked and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.stop()
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        lines = [parse(raw.decode()) for raw in pipe.read().splitlines()]
    assert [(line.kind, line.rounds) for line in lines] == [(Say.ROUND, 1)]


@pytest.mark.parametrize("moved_to", [None, "10.0.0.2:7000"])
def test_a_guest_that_will_not_run_again_is_neither_paused_nor_unpaused(moved_to):
    """A pause or unpause that reaches a domain process after its job destroyed the guest
    (saved, or moved) says so, not "paused" for a pause that did nothing."""
    import types
    from migrate.config import DomainStatus
    from migrate.host.domaind import DomainServer
    server = object.__new__(DomainServer)
    server.domain = types.SimpleNamespace(status=DomainStatus.DESTROYED, config=types.SimpleNamespace(name="g1"))
    server.moved_to, server.saving, server.go = moved_to, False, None
    for op in (DomainServer.op_pause, DomainServer.op_unpause):
        with pytest.raises(ValueError) as info:
            op(server, {})
        assert str(info.value).endswith("g1 moved to 10.0.0.2:7000" if moved_to else "g1 is destroyed here")
