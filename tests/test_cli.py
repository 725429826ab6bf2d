"""The `hvm` command: CliRunner for the commands, one real subprocess run
of the entry point, and the error cases a user meets."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from migrate.cli import hvm, parse_size
from migrate.config import DomainConfig, DomainError, NetError, check_net
from migrate.host import control, statedir


def run(*args, ok=True, env=None):
    result = CliRunner().invoke(hvm, list(args), catch_exceptions=False, env=env)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_parse_size():
    assert parse_size("256M") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("64") == 64 << 20
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_bad_name_and_unknown_domain(state_dir):
    result = run("create", "--workload", "idle", "--name", "../etc", ok=False)
    assert result.exit_code == 2 and "invalid domain name" in result.output
    result = run("info", "nosuch", ok=False)
    assert result.exit_code == 1 and "no domain named 'nosuch'" in result.output


def test_an_invalid_domain_name_is_a_usage_error(state_dir, tmp_path):
    """A name no domain can have is the command line's fault: exit 2, as text and as JSON,
    on every command that names a domain (restore's --name included); a name a stream
    carries is not the command line's (exit 1, as before)."""
    for args in (["info", "a/b"], ["pause", "a/b"], ["destroy", "a/b"], ["console", "a/b"],
                 ["save", "a/b", str(tmp_path / "x.hvm")], ["restore", str(tmp_path / "x.hvm"), "--name", "a/b"]):
        result = run(*args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        assert result.output == ("Error: invalid domain name 'a/b': use 1-64 letters, digits, '_', '.', '-' "
                                 "starting with a letter or digit\n"), (args, result.output)
    for args in (["info", "a/b"], ["save", "a/b", "x.hvm"], ["create", "-w", "idle", "-n", "a/b"]):
        result = run(*args, "--json", ok=False)
        assert result.exit_code == 2, (args, result.output)
        error = json.loads(result.stdout)
        assert error["outcome"] == "usage" and error["exit"] == 2, error
        assert error["error"].startswith("invalid domain name 'a/b'") and "guest" not in error, error
    assert not state_dir.exists() or list(state_dir.iterdir()) == []
    with pytest.raises(ValueError, match="invalid domain name"):     # as the daemon and restore catch it
        statedir.check_name("a/b")


def test_no_domain_names_a_missing_state_directory(tmp_path):
    missing = tmp_path / "nonexistent"
    res = run("info", "a", ok=False, env={"HVM_STATE_DIR": str(missing)})
    assert res.exit_code == 1
    assert res.output == f"Error: no domain named 'a' (the state directory {missing} does not exist)\n"
    res = run("info", "a", "--json", ok=False, env={"HVM_STATE_DIR": str(missing)})
    assert json.loads(res.stdout) == {"error": f"no domain named 'a' (the state directory {missing} does not "
                                      "exist)", "outcome": "failed", "exit": 1, "guest": "none here"}
    missing.mkdir()         # there, and empty: no word about it
    res = run("info", "a", ok=False, env={"HVM_STATE_DIR": str(missing)})
    assert res.exit_code == 1 and res.output == "Error: no domain named 'a'\n"


def test_usage_errors_found_by_the_command_are_json_with_json(state_dir, tmp_path):
    """A usage error the command finds itself (not click's parser) is JSON too with --json:
    exit 2, on standard output, one object. Options that do not go together are one."""
    disk = tmp_path / "x.img"
    disk.write_bytes(bytes(1 << 20))
    for args, words in [(["save", "a", "x.hvm", "--throttle"], "need --live"),
                        (["restore", "f.hvm", "--disk-map", "nonsense"], "Invalid value for --disk-map"),
                        (["stream", "check", "f.hvm", "--net-map", "x"], "Invalid value for --net-map"),
                        (["migrate", "a", "nohost", "--insecure"], "Invalid value for HOST:PORT"),
                        (["create", "-w", "idle", "--no-stub", "--disk", str(disk)], "a disk needs the device-model stub"),
                        (["create", "-w", "idle", "--no-stub", "--net", "tap=tap9"], "a NIC needs the device-model stub")]:
        res = run(*args, "--json", ok=False)
        assert res.exit_code == 2, (args, res.output)
        error = json.loads(res.stdout)
        assert error["outcome"] == "usage" and error["exit"] == 2 and words in error["error"], (args, error)
        res = run(*args, ok=False)          # and as text without --json
        assert res.exit_code == 2 and words in res.output and not res.stdout.startswith("{"), (args, res.output)


def test_a_crashed_domain_is_crashed_here(state_dir):
    """exits.guest_state says "crashed here" of a domain whose process is gone (its
    directory and pid left), as its docstring promises, not nothing."""
    from migrate import exits
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (state_dir / "z").mkdir(parents=True)
    (state_dir / "z" / "pid").write_text(f"{gone.pid}\n")
    (state_dir / "z" / "config.json").write_text(json.dumps({"workload": "idle", "memory": 16 << 20}))
    assert exits.guest_state("z") == "crashed here"
    assert exits.guest_state("nosuch") == "none here"


@pytest.mark.parametrize("left", ["config", "nothing"])
def test_destroy_of_a_domain_on_its_way_out_after_a_move_says_it_moved(state_dir, left):
    """`hvm destroy` that comes once a relocated domain's process has removed its control
    socket (on its way out: its guest runs there) says the guest moved, as one that comes
    before does, not that it was already being destroyed and is gone (exit 0)."""
    d = state_dir / "mv"
    d.mkdir(parents=True)           # the stand-in names its directory, as a domain process does
    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(d)])
    try:
        (d / statedir.PIDFILE).write_text(f"{ending.pid}\n")
        if left == "config":
            (d / statedir.CONFIG).write_text(json.dumps({"workload": "idle", "memory": 16 << 20}))
        (d / statedir.MOVED).write_text("10.0.0.2:7000")
        res = run("destroy", "mv", ok=False)
        assert res.exit_code == 1 and res.output == ("Error: mv was not destroyed: it had just moved to "
                                                     "10.0.0.2:7000 (its relocation was past the handoff) and "
                                                     "runs there\n"), res.output
        with pytest.raises(control.ControlError) as info:
            control.destroy_domain("mv")
        assert info.value.guest == "running on 10.0.0.2:7000"
    finally:
        ending.kill()
        ending.wait()


def test_a_domain_is_on_its_way_out_only_by_what_its_end_leaves(tmp_path):
    """control._ending, asked of a directory with no control socket: a configuration
    without a socket, or logs left alone, is an end; an empty directory (just claimed by a
    domain starting) and one whose socket is there or waits to be published are not."""
    d = tmp_path / "d"
    d.mkdir()
    assert not control._ending(d)                        # claimed, starting
    (d / statedir.LOGFILE).write_text("")
    assert control._ending(d)                            # its last files going
    (d / statedir.CONFIG).write_text("{}")
    assert control._ending(d)
    (d / (statedir.SOCKET + ".new")).write_text("")
    assert not control._ending(d)                        # a received domain, not published yet
    (d / (statedir.SOCKET + ".new")).rename(d / statedir.SOCKET)
    assert not control._ending(d)                        # published meanwhile


def test_a_destroy_that_finds_only_an_empty_directory_waits_a_moment(state_dir):
    """An empty domain directory tells nothing (one just claimed, or one whose last file
    its ending process just removed): a destroy waits a moment; gone, it was already being
    destroyed (exit 0); still there, it says it has no control socket (exit 1)."""
    d = state_dir / "e1"
    d.mkdir(parents=True)
    threading.Timer(0.2, d.rmdir).start()
    assert control.destroy_domain("e1") == "already"
    d.mkdir()
    with pytest.raises(control.ControlError) as info:
        control.destroy_domain("e1")
    assert info.value.kind == control.NO_SOCKET and "has no control socket" in str(info.value)
    d.rmdir()


def test_an_unanswered_request_is_unknown_an_unanswered_question_is_not(state_dir):
    """A domain process that takes a request and never answers: "info" unanswered is
    NO_ANSWER (nothing was done, exit 1); a pause unanswered is UNKNOWN (exit 3: it was
    asked and may still happen)."""
    from migrate import exits
    d = state_dir / "mute"
    d.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(d / statedir.SOCKET))
    listener.listen(4)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(2)], daemon=True).start()
    try:
        with control.DomainClient("mute", timeout=0.3) as client:
            with pytest.raises(control.ControlError) as asked:
                client.check_answers(0.3)
        with control.DomainClient("mute", timeout=0.3) as client:
            with pytest.raises(control.ControlError) as told:
                client.call("pause")
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert asked.value.kind == control.NO_ANSWER and "nothing was done to it" in str(asked.value)
    assert told.value.kind == control.UNKNOWN and "the pause was asked and may still happen" in str(told.value)
    assert exits.failure(asked.value).exit_code == exits.FAILED
    assert exits.failure(told.value).exit_code == exits.UNKNOWN


def test_an_ok_already_said_when_ctrl_c_comes_is_too_late_to_cancel():
    """control._said reads what the domain process has already written on its ready pipe,
    without waiting: an ok there means it runs, and a Ctrl-C then must not discard it."""
    from migrate.host.launch import Say, say
    r, w = os.pipe()
    with os.fdopen(r, "rb", buffering=0) as ready:
        assert control._said(ready) is None                     # nothing yet: no wait
        os.write(w, say(Say.AT, 4096) + say(Say.OK, 1, 2.0, 3.0))
        assert control._said(ready).kind is Say.OK
    os.close(w)


def test_a_final_newline_is_no_part_of_a_name(state_dir):
    """Python's ``$`` also matches before a final newline: every name, interface name, MAC
    and CPU model name is matched to its very end ("web1\\n" made a domain directory with a
    newline in its name, from the command line, a stream or a HELLO)."""
    result = run("create", "--workload", "idle", "--name", "web1\n", ok=False)
    assert result.exit_code == 2 and "invalid domain name" in result.output
    assert not (statedir.state_dir() / "web1\n").exists()
    net = {"link": "tap", "name": "tap0", "mac": "52:54:00:12:34:56", "mtu": 1500}
    check_net(net)
    for bad in ({"name": "tap0\n"}, {"mac": "52:54:00:12:34:56\n"}):
        with pytest.raises(NetError):
            check_net({**net, **bad})
    with pytest.raises(DomainError, match="not a CPU model name"):
        DomainConfig("a", "idle", 64 << 20, cpu="baseline\n").validate()


def test_usage_error_exits_2(state_dir):
    assert run("create", "--workload", "nosuch", ok=False).exit_code == 2


def test_missing_dev_kvm_is_a_clear_error(state_dir, monkeypatch):
    monkeypatch.setattr(control, "DEV_KVM", "/nonexistent/kvm")
    result = run("create", "--workload", "idle", "--name", "nokvm", ok=False)
    assert result.exit_code == 1 and "/nonexistent/kvm does not exist" in result.output


@pytest.mark.kvm
def test_lifecycle_through_the_cli(state_dir):
    out = run("create", "--workload", "idle", "--memory", "32M", "--name", "life", "--json").output
    info = json.loads(out)
    assert info["status"] == "running" and info["memory"] == 32 << 20
    try:
        listed = json.loads(run("list", "--json").output)
        assert [d["name"] for d in listed] == ["life"]
        assert "life" in run("list").output

        deadline = time.monotonic() + 10
        while "idle ticks=100" not in run("console", "life").output:
            assert time.monotonic() < deadline, run("console", "life").output
            time.sleep(0.2)

        assert "paused life" in run("pause", "life").output
        assert json.loads(run("info", "life", "--json").output)["status"] == "paused"
        before = json.loads(run("info", "life", "--json").output)["console_bytes"]
        time.sleep(1.2)
        assert json.loads(run("info", "life", "--json").output)["console_bytes"] == before
        run("unpause", "life")
        assert "status:" in run("info", "life").output

        dup = run("create", "--workload", "idle", "--name", "life", ok=False)
        assert dup.exit_code == 1 and "already in use" in dup.output
    finally:
        run("destroy", "life", ok=False)
    assert not (state_dir / "life").exists()
    assert json.loads(run("list", "--json").output) == []


@pytest.mark.kvm
def test_hvm_entry_point_in_a_real_subprocess(state_dir):
    env = {**os.environ, "HVM_STATE_DIR": str(state_dir)}
    hvm_bin = Path(sys.executable).parent / "hvm"
    cmd = [str(hvm_bin)] if hvm_bin.exists() else [sys.executable, "-c", "from migrate.cli import hvm; hvm()"]
    created = subprocess.run(cmd + ["create", "-w", "ledger", "-m", "64M", "-n", "sub", "--arg", "5"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    try:
        follow = subprocess.Popen(cmd + ["console", "sub", "--follow"], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        seen = []
        watchdog = threading.Timer(30, follow.kill)     # a hang fails the test, not the suite
        watchdog.start()
        try:
            for line in follow.stdout:
                seen.append(line)
                if line.startswith("ledger start"):     # its UART driver is up: type
                    follow.stdin.write("over the pipe\n")
                    follow.stdin.flush()
                if line.startswith("ledger input: over the pipe"):
                    break
        finally:
            watchdog.cancel()
        assert any(line.startswith("ledger start seed=5 ") for line in seen)
        assert seen[-1].startswith("ledger input: over the pipe"), seen[-5:]
        follow.kill()
        follow.wait()
    finally:
        destroyed = subprocess.run(cmd + ["destroy", "sub"], env=env, capture_output=True,
                                   text=True, timeout=30)
    assert destroyed.returncode == 0 and "destroyed sub" in destroyed.stdout


@pytest.mark.kvm
def test_demo_runs(state_dir):
    t0 = time.monotonic()
    out = run("demo", "--workload", "ledger", "--memory", "32M").output
    assert time.monotonic() - t0 < 30, "demo must end even while the guest keeps printing"
    assert "== paused: status paused" in out
    assert "console output while paused for 1s: 0 bytes" in out
    assert "| ledger ok gen=" in out and "== destroyed" in out
    assert "| ledger input: hello from the host" in out and "journal=ok" in out
    assert control.list_domains() == []


def test_state_dir_default(monkeypatch):
    monkeypatch.delenv("HVM_STATE_DIR", raising=False)
    assert statedir.state_dir().name in ("hvm",) or statedir.state_dir().name.startswith("hvm-")


@pytest.mark.kvm
def test_disk_and_console_input_through_the_cli(state_dir, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    info = json.loads(run("create", "-w", "ledger", "-m", "32M", "-n", "io", "--arg", "9",
                          "--disk", str(disk), "--json").output)
    try:
        assert info["disk"] == str(disk) and info["stub"] is True
        deadline = time.monotonic() + 15       # type once its driver is up (like a person)
        while "ledger start" not in run("console", "io").output:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "sent 6 bytes to io" in run("input", "io", "typed").output
        while "ledger input: typed" not in run("console", "io").output:
            assert time.monotonic() < deadline, run("console", "io").output
            time.sleep(0.2)
        assert "journal=ok" in run("console", "io").output
        assert json.loads(run("info", "io", "--json").output)["ioreqs"] > 0
    finally:
        run("destroy", "io", ok=False)


def test_create_refuses_a_missing_disk(state_dir, tmp_path):
    result = run("create", "-w", "idle", "--disk", str(tmp_path / "nope.img"), ok=False)
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.kvm
def test_ctrl_c_ends_following_a_console_quietly(state_dir):
    """Ctrl-C is how one stops `hvm console --follow`: exit 0, no error line; the guest runs on."""
    control.create_domain(DomainConfig("cf", "idle", 16 << 20))
    follow = subprocess.Popen([sys.executable, "-m", "migrate.cli", "console", "cf", "--follow"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2.0)
    follow.send_signal(signal.SIGINT)
    try:
        out, err = follow.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        follow.kill()           # it did not stop: fail, and leave no process behind
        raise
    assert follow.returncode == 0 and err == b"", (follow.returncode, err)
    assert b"idle start" in out
    with control.DomainClient("cf") as client:
        assert client.call("info")["status"] == "running"
        client.call("destroy")
    control.wait_gone("cf")
