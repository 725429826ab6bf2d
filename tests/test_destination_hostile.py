"""The destination daemon (`hvm host serve`) against hostile or broken peers and its own
failures (specs/relocation.md, sections 1 to 5): floods of idle connections, descriptors
past FD_SETSIZE, malformed HELLOs, peers that trickle bytes, failures while a receiving
domain process is being set up, errors nobody foresaw before and after GO, and the cap on
relocations received at once. Each ends with nothing half-built left behind: no domain
process, state directory, name or memory reservation, disk lock.

Daemons here are plain TCP (``--insecure``) in-process threads unless said otherwise: what
is tested sits behind TLS too, and a plain peer can send exactly the bytes it wants."""
import errno
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from migrate.host import destination
from migrate.host.channel import FRAME, Channel, ChannelError, PeerError
from migrate.locks import DiskLock

from leftovers import kill_domain_processes
from test_relocation import bare_incoming


# -- helpers --------------------------------------------------------------------------------

@pytest.fixture
def daemon(tmp_path):
    """A factory of in-process --insecure daemons whose state directory is ``tmp_path/dst``
    (unless given); stopped, and whatever they started killed, afterwards."""
    made = []

    def start(base=None, **config):
        base = base or tmp_path / "dst"
        server = destination.RelocationServer(destination.ServeConfig("127.0.0.1", 0, None, base=base, **config))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        made.append(server)
        return server

    yield start
    for server in made:
        server.stop()
        kill_domain_processes(server.config.base)


def connect(server, timeout=10.0) -> Channel:
    return Channel(socket.create_connection(("127.0.0.1", server.address[1]), timeout=timeout))


def hello(name="h1", **over) -> dict:
    """A HELLO of an older source (stream version 1, so no CPU description is needed)."""
    return {"proto": 1, "stream_versions": [1], "name": name, "memory": 16 << 20, "stub": True,
            "disk": None, "live": True, **over}


def send_raw(ch: Channel, message) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    ch.sock.sendall(FRAME.pack(len(body), 1, 0) + body)


def answer(ch: Channel, timeout=10.0):
    """("ERROR", text, not_resumed), ("control", message), ("data", bytes) or ("closed", why)."""
    try:
        return ch.receive(timeout)
    except PeerError as exc:
        return "ERROR", str(exc), exc.not_resumed
    except ChannelError as exc:
        return "closed", str(exc)


def refused(ch: Channel, timeout=10.0) -> str:
    got = answer(ch, timeout)
    assert got[0] == "ERROR", got
    assert "\n" not in got[1], got
    return got[1]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes ``sock`` (EOF or reset) within ``seconds``; what it sends
    meanwhile is dropped."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                if not sock.recv(65536):
                    return True
            except OSError:
                return True
    return False


def wait_until(what, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def nothing_left(server) -> None:
    """No name or memory reserved, no route, no connection counted, and the state
    directory empty (a receiving process's directory is hidden once discarded: wait)."""
    base = server.config.base

    def clean():
        return (not server.receiving and not server.routes and server.pending == 0
                and not (base.exists() and any(base.iterdir())))
    wait_until(clean)


def cpu_bodies() -> dict:
    """HELLO's `cpu` for a stream-version-2 HELLO: the CPU records of a recorded stream."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "fuzz_stream", Path(__file__).resolve().parents[1] / "tools" / "fuzz_stream.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    _, records = fuzz.split((Path(__file__).parent / "fixtures" / "idle-v2-baseline-amd.hvm").read_bytes())
    cpu = [body for rtype, body in records if rtype in (0x40, 0x41, 0x42)]
    return {"guest": cpu[:3], "stub": cpu[3:]}


# -- 1. accept(): out of descriptors, and the cap on connections not past HELLO ------------------

def test_daemon_survives_running_out_of_descriptors(tmp_path):
    """A flood of idle TCP connections (no certificate needed) until accept() fails with
    EMFILE: a real `hvm host serve` with 40 descriptors goes on (it logs, backs off) and
    answers the next relocation once the flood is gone; it used to exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrate.cli", "host", "serve", "--listen", f"127.0.0.1:{port}", "--insecure"],
        env={**os.environ, "HVM_STATE_DIR": str(tmp_path / "dst")}, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
    flood = []
    try:
        for _ in range(3):
            if "listening on" in proc.stderr.readline():
                break
        else:
            raise AssertionError("hvm host serve did not start")
        for _ in range(60):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)
        assert proc.poll() is None, "the daemon exited under a flood of connections"
        for s in flood:
            s.close()
        flood.clear()
        ch = Channel(socket.create_connection(("127.0.0.1", port), timeout=10))
        send_raw(ch, {"t": "HELLO", **hello("../x")})
        assert "invalid domain name" in refused(ch)
        ch.close()
        assert proc.poll() is None
    finally:
        for s in flood:
            s.close()
        proc.kill()
        err = proc.communicate()[1]
    assert "cannot accept a connection: Too many open files; going on" in err, err[-2000:]
    assert err.count("cannot accept a connection") <= 3, err[-2000:]     # once in a while, not per try


def test_connections_beyond_the_pending_cap_are_closed_at_once(daemon, monkeypatch):
    """MAX_PENDING connections sit in their first bytes: the next is closed at once; once
    they go, connections are served again."""
    monkeypatch.setattr(destination, "MAX_PENDING", 3)
    server = daemon()
    idle = [socket.create_connection(("127.0.0.1", server.address[1])) for _ in range(3)]
    try:
        wait_until(lambda: server.pending == 3)
        extra = socket.create_connection(("127.0.0.1", server.address[1]))
        assert closed_within(extra, 2.0), "a connection beyond the cap was kept"
        extra.close()
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: server.pending == 0)
    ch = connect(server)
    send_raw(ch, {"t": "HELLO", **hello("../x")})
    assert "invalid domain name" in refused(ch)
    ch.close()
    nothing_left(server)


# -- 6. protocol errors at or before HELLO are answered ------------------------------------------

@pytest.mark.parametrize("what,first,error", [
    ("DATA first", FRAME.pack(3, 2, 0) + b"abc", "protocol error: expected HELLO, got DATA"),
    # refused from its header: 4 MiB a connection before HELLO were read and held otherwise
    ("a DATA header first", FRAME.pack(4 << 20, 2, 0), "protocol error: expected HELLO, got DATA"),
    ("another message first", None, "protocol error: expected HELLO, got GO"),
    ("HELLO lacking keys", {"t": "HELLO", "proto": 1, "name": "x"}, "protocol error: HELLO lacks"),
    ("bad frame header", FRAME.pack(4, 7, 0) + b"abcd", "protocol error: bad frame header"),
    ("frame too long", FRAME.pack(1 << 20, 1, 0), "protocol error: frame of 1048576 bytes out of bounds"),
    ("not msgpack", FRAME.pack(1, 1, 0) + b"\xc1", "protocol error: malformed control message"),
])
def test_protocol_errors_before_hello_are_answered(daemon, what, first, error):
    server = daemon()
    ch = connect(server)
    if first is None:
        ch.send("GO")
    elif isinstance(first, dict):
        send_raw(ch, first)
    else:
        ch.sock.sendall(first)
    assert refused(ch).startswith(error)
    ch.close()
    nothing_left(server)


# -- 3. HELLO keys checked before anything is reserved --------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("over,error", [
    ({"channels": "x"}, "HELLO channels must be a count of data channels"),
    ({"channels": {}}, "HELLO channels must be a count of data channels"),
    ({"channels": -1}, "HELLO channels must be a count of data channels (an int, 0 or more), not -1"),
    ({"channels": 1.5}, "HELLO channels must be a count of data channels (an int, 0 or more), not 1.5"),
    ({"channels": True}, "HELLO channels must be a count of data channels"),
    ({"stream_versions": [[1]]}, "HELLO stream_versions must be an array of ints"),
    ({"stream_versions": [{}]}, "HELLO stream_versions must be an array of ints"),
    ({"stream_versions": [True]}, "HELLO stream_versions must be an array of ints"),
    ({"stream_versions": [1.0]}, "HELLO stream_versions must be an array of ints"),
    ({"stream_versions": [2, 1.0]}, "HELLO stream_versions must be an array of ints"),
])
def test_bad_hello_keys_are_refused_in_one_line(daemon, over, error):
    """Mistyped `channels` or `stream_versions` (a stream-version-2 HELLO, whose channels
    count): ERROR in one line, and no name, memory or directory reserved; they used to
    raise after the name was reserved (until a restart), or be granted as they came."""
    server = daemon(max_memory=16 << 20)
    ch = connect(server)
    send_raw(ch, {"t": "HELLO", **{**hello("k1", stream_versions=[2], cpu=cpu_bodies()), **over}})
    assert error in refused(ch)
    ch.close()
    nothing_left(server)


# -- 5. a receiving domain process that cannot be set up gives back what was taken -----------------

@pytest.mark.parametrize("failure", ["pipe", "launch"])
def test_failed_setup_gives_back_the_disk_lock_and_the_directory(daemon, tmp_path, monkeypatch, failure):
    """The descriptors run out (EMFILE in os.pipe) or the launch fails in a way nobody
    foresaw, after the disk image's INCOMING lock and the state directory were taken:
    ERROR in one line, the lock free, no directory, no name kept."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    server = daemon(disk_map={"/src/disk.img": str(disk)})
    if failure == "pipe":
        real_pipe = os.pipe

        def pipe():
            if threading.current_thread().name.startswith("reloc-"):
                raise OSError(errno.EMFILE, "Too many open files")
            return real_pipe()
        monkeypatch.setattr(destination.os, "pipe", pipe)
    else:
        def launch(directory, spec):
            raise RuntimeError("no launch today")
        monkeypatch.setattr(destination.control, "launch", launch)
    ch = connect(server)
    send_raw(ch, {"t": "HELLO", **hello("s1", disk="/src/disk.img")})
    text = refused(ch)
    ch.close()
    if failure == "pipe":
        assert text == "cannot start a receiving domain process: [Errno 24] Too many open files"
    else:
        assert text == "internal error of the destination: RuntimeError: no launch today"
    nothing_left(server)
    DiskLock.for_incoming(str(disk)).close()         # the INCOMING lock is free


# -- 4. deadlines on the whole preamble and the whole frame ---------------------------------------

def test_a_trickled_channel_preamble_is_cut_off(daemon, monkeypatch):
    """A data channel's preamble must come whole within the limit (10 s; 1 s here),
    however the peer spaces its bytes."""
    monkeypatch.setattr(destination, "HANDSHAKE_TIMEOUT", 1.0)
    server = daemon()
    s = socket.create_connection(("127.0.0.1", server.address[1]))
    preamble = destination.CHANNEL_PREAMBLE.pack(destination.CHANNEL_MAGIC, bytes(16), 0, 0)
    s.sendall(preamble[:8])
    t0, cut = time.monotonic(), False
    for byte in preamble[8:20]:
        if closed_within(s, 0.25):
            cut = True
            break
        try:
            s.sendall(bytes([byte]))
        except OSError:
            cut = True
            break
    s.close()
    assert cut and time.monotonic() - t0 < 2.5, "the preamble was read for longer than its limit"
    nothing_left(server)


def trickle(ch, data: bytes):
    """Send ``data`` a byte every 0.25 s until the daemon answers: its answer, else None."""
    for byte in data:
        ch.sock.sendall(bytes([byte]))
        if select.select([ch.sock], [], [], 0.25)[0]:
            return answer(ch, 1)
    return None


def test_a_trickled_hello_is_cut_off(daemon, monkeypatch):
    """HELLO must come whole within its limit (30 s; 1 s here): a peer sending a byte
    every 0.25 s is answered ERROR ("timed out") and dropped."""
    monkeypatch.setattr(destination, "WELCOME_TIMEOUT", 1.0)
    server = daemon()
    ch = connect(server)
    body = msgpack.packb({"t": "HELLO", **hello("t1")}, use_bin_type=True)
    frame = FRAME.pack(len(body), 1, 0) + body
    ch.sock.sendall(frame[:8])          # the first bytes at once: they tell TLS from plain TCP
    time.sleep(0.1)
    t0 = time.monotonic()
    got = trickle(ch, frame[8:])
    assert got is not None and got[0] == "ERROR" and "timed out" in got[1], got
    assert time.monotonic() - t0 < 2.5
    ch.close()
    nothing_left(server)


@pytest.mark.kvm
def test_a_trickled_data_frame_is_cut_off_and_cleaned_up(daemon, monkeypatch):
    """After WELCOME a receiving domain process exists: a DATA frame trickled a byte at a
    time must still come whole within the frame limit (60 s; 1 s here), and then the
    daemon answers ERROR and the domain process, its directory and its name go."""
    monkeypatch.setattr(destination, "FRAME_TIMEOUT", 1.0)
    server = daemon()
    ch = connect(server)
    send_raw(ch, {"t": "HELLO", **hello("t2")})
    assert answer(ch)[0] == "control"
    ch.sock.sendall(FRAME.pack(1000, 2, 0))
    t0 = time.monotonic()
    got = trickle(ch, bytes(20))
    assert got is not None and got[0] == "ERROR" and "timed out" in got[1], got
    assert time.monotonic() - t0 < 3.0
    ch.close()
    nothing_left(server)


# -- 2. descriptors past FD_SETSIZE; errors nobody foresaw, before and after GO ---------------------

@pytest.fixture
def high_descriptors():
    """Hold descriptors up to past 1100, so that what is opened next is past FD_SETSIZE
    (1024), as in a daemon that holds many connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: cannot open 1100 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = []
    first = os.open(os.devnull, os.O_RDONLY)
    held.append(first)
    while held[-1] < 1100:
        held.append(os.dup(first))
    yield
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.kvm
def test_descriptors_past_fd_setsize(daemon, high_descriptors):
    """The daemon's connection and pipes numbered past 1023: it still relays (SYNC, DATA)
    and reads its domain process (select() raised ValueError there, which left the
    receiving domain process, its directory and its name behind)."""
    server = daemon()
    ch = connect(server)
    assert ch.sock.fileno() > 1024
    send_raw(ch, {"t": "HELLO", **hello("fd1")})
    assert answer(ch)[0] == "control"
    ch.send("SYNC", bytes=0)
    got = answer(ch)
    assert got[0] == "control" and got[1]["t"] == "SYNCED", got
    ch.send_data(b"not a stream at all")
    text = refused(ch)
    assert text.startswith("restore failed:"), text
    ch.close()
    nothing_left(server)


@pytest.mark.kvm
def test_an_unforeseen_error_before_go_cleans_up(daemon, tmp_path, monkeypatch):
    """An exception nobody foresaw while the stream is received (a ValueError, as select()
    raised): the receiving domain process is discarded, the name, memory and the disk
    image's INCOMING lock are given back, and the source gets ERROR in one line."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    server = daemon(disk_map={"/src/disk.img": str(disk)}, max_memory=16 << 20)

    def sync(self, rounds=0):
        raise ValueError("filedescriptor out of range in select()")
    monkeypatch.setattr(destination.Incoming, "sync", sync)
    ch = connect(server)
    send_raw(ch, {"t": "HELLO", **hello("u1", disk="/src/disk.img")})
    assert answer(ch)[0] == "control"
    ch.send("SYNC", bytes=0)
    assert refused(ch) == ("internal error of the destination: ValueError: filedescriptor out of range "
                           "in select()")
    ch.close()
    nothing_left(server)
    DiskLock.for_incoming(str(disk)).close()


class FakeIncoming:
    """Stands for a receiving domain process (no KVM): a stream of 0 bytes restores, and
    ``resume`` does what the test says."""
    made: list = []
    resume_does = None

    def __init__(self, name, hello, disk_to, base, net_to=None, channels=0, tls_dir=None, hugepages=False):
        self.channel_id, self.token, self.bytes, self.ran_at = os.urandom(16), os.urandom(32), 0, 0.0
        self.handoff = False        # no data channels, so no handoff on channel 0
        self.calls = []
        FakeIncoming.made.append(self)

    def let_the_handoff_go(self):
        pass

    def withdraw(self):
        self.discard()
        return "discarded"

    def watch(self, ch):
        pass

    def finish(self):
        return {"read": 0.0, "apply": 0.0, "answer": 0.0}

    def resume(self, paused=False):
        self.ran_at = time.monotonic()
        return FakeIncoming.resume_does()

    def discard(self):
        self.calls.append("discard")

    def abandon(self):
        self.calls.append("abandon")

    def close(self):
        self.calls.append("close")


def handoff(server, resume_does):
    """HELLO, STREAM_END, GO against a daemon with FakeIncoming; the answer to GO."""
    FakeIncoming.made, FakeIncoming.resume_does = [], resume_does
    ch = connect(server)
    try:
        send_raw(ch, {"t": "HELLO", **hello("g1")})
        assert answer(ch)[0] == "control"
        ch.send("STREAM_END", bytes=0)
        assert answer(ch)[1]["t"] == "RESTORED"
        ch.send("GO")
        return answer(ch)
    finally:
        ch.close()


def test_an_unforeseen_error_after_go_leaves_the_outcome_unknown(daemon, monkeypatch):
    """After GO, an exception nobody foresaw while the daemon passes GO on and waits for
    the answer: the guest may have run, so the source gets ERROR *without* not_resumed
    (outcome unknown, it stays paused) and the copy here is abandoned (killed, directory
    kept for the operator), never discarded as if it had not run."""
    monkeypatch.setattr(destination, "Incoming", FakeIncoming)
    server = daemon()

    def boom():
        raise ValueError("filedescriptor out of range in select()")
    got = handoff(server, boom)
    assert got[0] == "ERROR" and got[2] is False, got
    assert got[1] == ("resume failed after GO: internal error of the destination: ValueError: "
                      "filedescriptor out of range in select()")
    wait_until(lambda: FakeIncoming.made[0].calls)
    assert FakeIncoming.made[0].calls == ["abandon"]
    nothing_left(server)


def test_running_not_sent_is_logged_as_the_truth(daemon, monkeypatch, caplog):
    """The guest runs here but RUNNING cannot be sent: the log says it runs here and the
    source was not told, not that the relocation failed."""
    monkeypatch.setattr(destination, "Incoming", FakeIncoming)
    real_send = Channel.send

    def send(self, kind, **fields):
        if kind == "RUNNING":
            raise ChannelError("connection failed: [Errno 32] Broken pipe")
        return real_send(self, kind, **fields)
    monkeypatch.setattr(Channel, "send", send)
    server = daemon()
    caplog.set_level(logging.INFO, logger="hvm.relocd")
    got = handoff(server, lambda: 0.001)
    assert got[0] == "closed", got
    wait_until(lambda: any("RUNNING could not be sent" in r.getMessage() for r in caplog.records))
    [line] = [r.getMessage() for r in caplog.records if "g1" in r.getMessage()]
    assert "relocated g1 from 127.0.0.1:" in line and "it runs here, but RUNNING could not be sent" in line
    assert "the source was not told" in line and "relocation" not in line, line
    assert FakeIncoming.made[0].calls == ["close"]
    nothing_left(server)


# -- 8. the cap on relocations received at once --------------------------------------------------

@pytest.mark.kvm
def test_relocations_at_once_are_capped(daemon, monkeypatch):
    """MAX_RECEIVING relocations under way (1 here): another HELLO is refused in one line
    and nothing is started for it; once one ends, HELLO is welcome again. An admitted
    relocation no longer counts among the connections not past HELLO."""
    monkeypatch.setattr(destination, "MAX_RECEIVING", 1)
    server = daemon()
    first = connect(server)
    send_raw(first, {"t": "HELLO", **hello("c1")})
    assert answer(first)[0] == "control"
    assert server.pending == 0 and list(server.receiving) == ["c1"]
    second = connect(server)
    send_raw(second, {"t": "HELLO", **hello("c2")})
    assert refused(second) == ("this host receives at most 1 relocations at once and is receiving that many "
                               "now: try again later")
    second.close()
    assert not (server.config.base / "c2").exists()
    first.close()                       # the source goes: its relocation ends, cleaned up
    nothing_left(server)
    third = connect(server)
    send_raw(third, {"t": "HELLO", **hello("c3")})
    assert answer(third)[0] == "control"
    third.close()
    nothing_left(server)


def test_a_round_goes_on_while_its_channels_carry_pages(monkeypatch):
    """With data channels the control connection is quiet for a whole round: the daemon's
    wait for the source's next frame starts again from each CHANNELS line of the receiving
    process (the channels carried more bytes), so a round of any length goes on while its
    pages come; once they stop, the wait ends FRAME_TIMEOUT after the last. It ended after
    FRAME_TIMEOUT whatever came (and receive() gave one more: rounds over 120 s failed)."""
    from migrate.host.launch import Say, say
    monkeypatch.setattr(destination, "FRAME_TIMEOUT", 1.0)
    ready_r, ready_w = os.pipe()
    incoming = bare_incoming(ready_r=ready_r)
    source, ours = socket.socketpair()

    def channels_carry():
        for n in range(1, 6):                   # 2.5 s of a round's pages
            time.sleep(0.5)
            os.write(ready_w, say(Say.CHANNELS, n << 20))

    talker = threading.Thread(target=channels_carry)
    talker.start()
    t0 = time.monotonic()
    try:
        incoming.watch(Channel(ours))           # returns at its limit: no frame comes
        waited = time.monotonic() - t0
    finally:
        talker.join()
        for fd in (ready_r, ready_w):
            os.close(fd)
        source.close()
        ours.close()
    assert 3.2 <= waited <= 4.5, waited         # the last line at 2.5 s, then 1 s
