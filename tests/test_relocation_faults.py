"""Relocation fault matrix and ping-pong (specs/relocation.md, section 4), on loopback.

Each fault test ends by checking that exactly one copy of the guest runs (both hosts'
domain lists and state directories), that its self-check still holds, and that the source
got a one-line error saying what happened. Faults are injected by a proxy between source
and destination (tests/relocation_proxy.py): it sees the frames of a plain-TCP
(``--insecure``) relocation, so it can act on RESTORED or GO, or flip one byte of guest page
data; over TLS it can only flip a byte of ciphertext.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from migrate.cli import hvm
from migrate.domain import DomainConfig
from migrate.engine import file_chunks, restore
from migrate.guest import check
from migrate.host import control, destination
from migrate.host.source import migrate_domain

from relocation_proxy import Proxy
from test_relocation import (  # noqa: F401  (pki and hosts are fixtures)
    console, destroy_all, free_port, hosts, ledger_lines_ok, pki, start_daemon, wait_console, wait_empty,
)

RESUME_TIMEOUT = 3.0        # the receiving domain's self-destroy timeout in these daemons


def insecure_daemon(base, *, max_memory=None, disk_map=None):
    server = destination.RelocationServer(destination.ServeConfig(
        "127.0.0.1", 0, None, disk_map or {}, base, max_memory=max_memory))
    import threading
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_subprocess(base, port):
    """A real `hvm host serve --insecure` whose received domains destroy themselves
    RESUME_TIMEOUT s after RESTORED if GO never resumes them (60 s in production)."""
    code = ("import sys, migrate.host.destination as r; r.RESUME_TIMEOUT = %r; "
            "from migrate.cli import hvm; hvm(sys.argv[1:])" % RESUME_TIMEOUT)
    proc = subprocess.Popen([sys.executable, "-c", code, "host", "serve", "--listen",
                             f"127.0.0.1:{port}", "--insecure"],
                            env={**os.environ, "HVM_STATE_DIR": str(base)},
                            stderr=subprocess.PIPE, text=True)
    for _ in range(3):
        if "listening on" in proc.stderr.readline():
            return proc
    raise AssertionError("hvm host serve did not start")


def statuses(base):
    return [(d["name"], d["status"]) for d in control.list_domains(base)]


def start_ledger(name, base, seed, memory=32 << 20, disk=None):
    control.create_domain(DomainConfig(name, "ledger", memory, args=[seed, 0], disk=disk), base)
    m, _ = wait_console(name, base, rf"^ledger start seed={seed} pages=(\d+) ")
    wait_console(name, base, r"^ledger ok gen=1 ")
    return int(m.group(1))


def ledger_goes_on(name, base, seed, npages):
    """The ledger's self-check lines are right and a new one follows. A guest just moved
    here has a console of its own, empty until its first line after the move: wait for one
    (the clean-clone CI run met it empty once, under the full suite's load)."""
    _, text = wait_console(name, base, r"^ledger ok gen=\d+ ")
    gen = ledger_lines_ok(text, seed, npages)
    _, text = wait_console(name, base, rf"^ledger ok gen={gen + 1} ")
    ledger_lines_ok(text, seed, npages)


# a ledger rewrites all its memory all the time: a downtime target it meets on a loaded
# machine too (pre-copy gives up on one it cannot meet; that is test_convergence's)
LEDGER_TARGET = {"downtime_ms": 1000}


def migrate_error(name, port, base=None, **kw):
    with pytest.raises(control.ControlError) as info:
        migrate_domain(name, f"127.0.0.1:{port}", insecure=True, base=base, **LEDGER_TARGET, **kw)
    text = str(info.value)
    assert "\n" not in text and name in text, text
    return text


def pid_of(name, base) -> int:
    return int((base / name / "pid").read_text())


# -- kill -9 during the handoff ------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("victim,when", [("daemon", "RESTORED"), ("daemon", "GO"), ("domain", "RESTORED")])
def test_kill_during_handoff(hosts, victim, when):
    """kill -9 of the destination daemon (a real `hvm host serve`) or of its receiving
    domain process, at RESTORED (before the source sees it) or at GO (before the
    destination reads it):
    - daemon at RESTORED: the source never gets RESTORED, resumes and keeps running; the
      paused copy on the destination destroys itself (no GO within its resume timeout);
    - daemon at GO: GO was sent, so the source cannot know and stays paused with "outcome
      unknown"; the destination copy never resumed and destroys itself; the operator's
      `hvm unpause` (as the error says) brings back exactly one copy;
    - domain process at RESTORED: GO finds no process to read it, so the guest provably
      never ran there; the daemon says so (not_resumed) and cleans up, and the source
      resumes by itself.
    Without data channels: with them GO goes on channel 0 too, and the outcome with it
    (test_the_source_learns_the_outcome_on_channel_0_when_the_daemon_dies)."""
    src, dst, _ = hosts
    port = free_port()
    daemon = serve_subprocess(dst, port)
    name = f"kh{victim[0]}{when[0]}".lower()
    npages = start_ledger(name, src, 41)
    seen = {}

    def on_control(direction, message):
        if message["t"] != when:
            return True
        seen["paused_there"] = statuses(dst)
        os.kill(daemon.pid if victim == "daemon" else pid_of(name, dst), signal.SIGKILL)
        if victim == "daemon":
            daemon.wait()
            return False
        time.sleep(0.2)
        return True

    proxy = Proxy(("127.0.0.1", port), frames=True, on_control=on_control)
    try:
        error = migrate_error(name, proxy.port, channels=0)
    finally:
        proxy.close()
        daemon.kill()
        daemon.wait()
    assert seen["paused_there"] == [(name, "paused")]
    if (victim, when) == ("daemon", "RESTORED"):
        assert "failed before the handoff" in error and f"{name} keeps running here" in error
        assert statuses(src) == [(name, "running")]
    elif victim == "domain":
        assert "failed at the handoff" in error and "was gone before GO" in error, error
        assert f"{name} keeps running here" in error
        assert statuses(src) == [(name, "running")]
    else:
        assert "outcome unknown: GO was sent" in error and f"'hvm unpause {name}'" in error
        assert statuses(src) == [(name, "paused")]
        assert statuses(dst) in ([], [(name, "paused")])    # never running there
    wait_empty(dst, RESUME_TIMEOUT + 5)
    if statuses(src) == [(name, "paused")]:               # the operator, as told
        res = CliRunner().invoke(hvm, ["unpause", name], env={"HVM_STATE_DIR": str(src)})
        assert res.exit_code == 0, res.output
    assert statuses(src) == [(name, "running")] and statuses(dst) == []
    ledger_goes_on(name, src, 41, npages)


@pytest.mark.kvm
@pytest.mark.parametrize("fault", ["daemon killed", "control cut"])
def test_the_source_learns_the_outcome_on_channel_0_when_the_daemon_cannot_say(hosts, fault):
    """GO goes on data channel 0 (the handoff there), then on the control connection, where
    the proxy either kills the destination daemon (kill -9) or cuts the connection as the
    GO passes. The receiving domain process answers on channel 0 whichever way it took
    GO, or gave up: the source knows where the guest is, one copy runs, and the answer is
    true. Either way can happen: the copy took GO on channel 0 and runs there (the move
    succeeds; the daemon, if alive, keeps it), or it saw the daemon's go pipe close first,
    destroyed itself, and said so (the source resumes). Without the answer on channel 0,
    both ended "outcome unknown", the source paused."""
    src, dst, _ = hosts
    port = free_port()
    daemon = serve_subprocess(dst, port)
    name = "hc" + fault[0]
    npages = start_ledger(name, src, 47)

    def on_control(direction, message):
        if message["t"] != "GO":
            return True
        if fault == "daemon killed":
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait()
        return False

    proxy = Proxy(("127.0.0.1", port), frames=True, on_control=on_control)
    try:
        migrate_domain(name, f"127.0.0.1:{proxy.port}", insecure=True, base=src, **LEDGER_TARGET)
        error = None
    except control.ControlError as exc:
        error = str(exc)
    finally:
        proxy.close()
        daemon.kill()
        daemon.wait()
    if error is None:
        assert statuses(src) == [] and statuses(dst) == [(name, "running")]
        ledger_goes_on(name, dst, 47, npages)
    else:
        assert "outcome unknown" not in error and "never ran" in error, error
        assert f"{name} keeps running here" in error, error
        assert statuses(src) == [(name, "running")]
        wait_empty(dst, 10)
        ledger_goes_on(name, src, 47, npages)


@pytest.mark.kvm
def test_a_copy_destroyed_there_before_go_is_known_never_to_have_run(hosts):
    """`hvm destroy` on the destination of a copy that awaits GO, GO sent right after: its
    domain process says, as it goes, that it was destroyed before GO (and closes the pipe
    GO comes down), so the source learns the copy never ran and resumes its own. Before,
    a GO written while the process was still tearing down was taken in and unanswered:
    "outcome unknown", the source left paused. Without data channels (with them, GO goes
    on channel 0 before the control connection's GO this test waits for)."""
    src, dst, _ = hosts
    server = insecure_daemon(dst)
    name = "dbg"
    npages = start_ledger(name, src, 43)

    def on_control(direction, message):
        if message["t"] == "GO":
            with control.DomainClient(name, dst) as client:
                client.call("destroy")
        return True

    proxy = Proxy(("127.0.0.1", server.address[1]), frames=True, on_control=on_control)
    try:
        error = migrate_error(name, proxy.port, channels=0)
    finally:
        proxy.close()
        server.stop()
    assert "failed at the handoff" in error and "never ran and is destroyed" in error, error
    assert f"{name} keeps running here" in error
    assert statuses(src) == [(name, "running")]
    wait_empty(dst, 10)
    ledger_goes_on(name, src, 43, npages)


@pytest.mark.kvm
def test_a_round_longer_than_the_frame_timeout_goes_on_while_its_channels_carry(hosts, monkeypatch):
    """Round 0 of a paced move takes several times the destination's FRAME_TIMEOUT (1.5 s
    here), the control connection quiet all along while its pages go on the data
    channels: the receiving process's CHANNELS lines keep the daemon waiting, and the
    move completes. The daemon gave up at 2 x FRAME_TIMEOUT ("timed out waiting for the
    peer": a 16 GiB guest's round 0 on 1 GbE)."""
    src, dst, _ = hosts
    monkeypatch.setattr(destination, "FRAME_TIMEOUT", 1.5)
    server = insecure_daemon(dst)
    control.create_domain(DomainConfig("lr", "dirtier", 64 << 20, args=[32 << 20, 4_000_000, 0]), src)
    time.sleep(4)                                   # about 16 MiB touched: round 0 takes 5 s at 3 MB/s
    t0 = time.monotonic()
    try:
        migrate_domain("lr", f"127.0.0.1:{server.address[1]}", insecure=True, base=src, max_bandwidth=3e6)
    finally:
        server.stop()
    assert time.monotonic() - t0 > 3 * 1.5
    assert statuses(dst) == [("lr", "running")] and statuses(src) == []


# -- one corrupted byte in flight -------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("channel", ["insecure", "tls"])
def test_one_corrupted_byte_in_flight(hosts, pki, channel):
    """One bit of guest page data flipped between source and destination.
    insecure: the proxy parses the frames and the stream's records and flips a byte in
    the page data of a page record 2 MiB in; the destination's record CRC catches it, the
    restore fails, the destination cleans up and says why, and the source keeps running.
    tls: the flipped byte is ciphertext; TLS's record authentication (AES-GCM/ChaCha20's
    tag) rejects it before our stream parser sees anything, the daemon drops the link and
    the source keeps running."""
    src, dst, daemon = hosts
    name = f"cb{channel[0]}"
    npages = start_ledger(name, src, 23)
    if channel == "insecure":
        server = insecure_daemon(dst)
    else:
        server = daemon(dst)
    proxy = Proxy(("127.0.0.1", server.address[1]), frames=channel == "insecure", flip_after=2 << 20)
    try:
        if channel == "insecure":
            error = migrate_error(name, proxy.port)
            assert "destination: restore failed" in error and "CRC" in error.upper(), error
            assert proxy.flipper.flipped["record_type"] in (3, 4)
        else:
            with pytest.raises(control.ControlError) as info:
                migrate_domain(name, f"127.0.0.1:{proxy.port}", tls_dir=str(pki / "ca" / "src"),
                               **LEDGER_TARGET)
            error = str(info.value)
            assert "\n" not in error and "failed during the stream" in error, error
        assert proxy.flipped
        assert f"{name} keeps running here" in error
    finally:
        proxy.close()
        server.stop()
    assert statuses(src) == [(name, "running")]
    wait_empty(dst)
    ledger_goes_on(name, src, 23, npages)


# -- the destination cannot take the guest -------------------------------------------------------

@pytest.mark.kvm
def test_no_room_on_the_destination(hosts):
    """`hvm host serve --max-memory`: a destination with 48 MiB for guests takes a 32 MiB
    ledger, then refuses a second one at HELLO ("no room"), before any guest state moves;
    the second keeps running on the source."""
    src, dst, _ = hosts
    server = insecure_daemon(dst, max_memory=48 << 20)
    try:
        n1 = start_ledger("nr1", src, 3)
        n2 = start_ledger("nr2", src, 4)
        migrate_domain("nr1", f"127.0.0.1:{server.address[1]}", insecure=True, **LEDGER_TARGET)
        control.wait_gone("nr1", src)
        error = migrate_error("nr2", server.address[1])
        assert "refused: no room for domain nr2: it needs 32 MiB and this host has 16 MiB of its " \
               "48 MiB left" in error, error
    finally:
        server.stop()
    assert statuses(src) == [("nr2", "running")] and statuses(dst) == [("nr1", "running")]
    ledger_goes_on("nr2", src, 4, n2)
    ledger_goes_on("nr1", dst, 3, n1)


@pytest.mark.kvm
def test_destination_restore_fails_mid_stream(hosts):
    """The receiving domain process dies mid pre-copy (as an out-of-memory kill would):
    the daemon reports the failed restore, cleans up, and the source keeps running."""
    src, dst, _ = hosts
    server = insecure_daemon(dst)
    npages = start_ledger("rf", src, 9, memory=64 << 20)
    state = {}

    def progress(stats):
        if stats["stream_bytes"] > 8 << 20 and "killed" not in state and (dst / "rf" / "pid").exists():
            os.kill(pid_of("rf", dst), signal.SIGKILL)
            state["killed"] = True

    try:
        error = migrate_error("rf", server.address[1], progress=progress)
    finally:
        server.stop()
    assert state.get("killed") and "rf keeps running here" in error
    assert "restore failed" in error and "domain process exited" in error, error
    assert statuses(src) == [("rf", "running")]
    wait_empty(dst)
    ledger_goes_on("rf", src, 9, npages)


# -- pagetouch end to end ---------------------------------------------------------------------------

@pytest.mark.kvm
def test_pagetouch_relocated_keeps_its_pattern(hosts, pki, tmp_path):
    """A 64 MiB pagetouch guest relocated over TLS: it goes on running on the destination
    and QEMU's pagetouch check holds on its memory there; the source copy is gone."""
    src, dst, daemon = hosts
    server = daemon(dst)
    control.create_domain(DomainConfig("pt", "pagetouch", 64 << 20))
    wait_console("pt", src, r"^pagetouch pass=\d+ ")
    reply = migrate_domain("pt", f"127.0.0.1:{server.address[1]}", tls_dir=str(pki / "ca" / "src"))
    assert reply["stats"]["rounds"] >= 2
    control.wait_gone("pt", src)
    assert statuses(src) == [] and statuses(dst) == [("pt", "running")]
    m, _ = wait_console("pt", dst, r"^pagetouch pass=(\d+) ")
    wait_console("pt", dst, rf"^pagetouch pass=(?!{m.group(1)}\b)\d+ ")     # passes go on
    with control.DomainClient("pt", dst) as c:
        c.call("pause")
    path = tmp_path / "pt.hvm"
    control.save_domain("pt", path, mode="checkpoint", base=dst)
    dom, _ = restore(file_chunks(path))
    try:
        assert check.pagetouch_check(dom.memory) == []
    finally:
        dom.destroy()


# -- ping-pong ---------------------------------------------------------------------------------------

@pytest.mark.kvm
def test_ping_pong_ledger_with_disk(hosts, pki, tmp_path):
    """One ledger guest with a disk (shared image, --disk-map on both daemons) relocated
    back and forth 6 times: after every move exactly one copy runs, the ledger's sums are
    ledger_sum's and its disk journal reads back ok."""
    src, dst, daemon = hosts
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    servers = [daemon(src, {str(disk): str(disk)}), daemon(dst, {str(disk): str(disk)})]
    bases = [src, dst]
    npages = start_ledger("pp", src, 99, disk=str(disk))
    for move in range(6):
        here, there = move % 2, 1 - move % 2
        reply = migrate_domain("pp", f"127.0.0.1:{servers[there].address[1]}",
                               tls_dir=str(pki / "ca" / "127.0.0.1"), base=bases[here], **LEDGER_TARGET)
        assert reply["stats"]["downtime"] < 1.0
        control.wait_gone("pp", bases[here])
        assert statuses(bases[here]) == [] and statuses(bases[there]) == [("pp", "running")]
        _, text = wait_console("pp", bases[there], r"^ledger ok gen=\d+ .* journal=ok$")
        gen = ledger_lines_ok(text, 99, npages)
        _, text = wait_console("pp", bases[there], rf"^ledger ok gen={gen + 1} .* journal=ok$")
        ledger_lines_ok(text, 99, npages)
