"""A save whose pages go on data channels and its restore (migrate/engine/channels.py),
end to end in one process: a live ledger guest, the main stream through a queue, two
channels over socket pairs (their sockets handed over by SCM_RIGHTS as the relocation
daemon does), a restore taking both at once; then the guest checks itself on, and so
does the host. And what the restore refuses: a CHANNELS record that does not match."""
from __future__ import annotations

import os
import queue
import socket
import threading

import pytest

from migrate import dataplane
from migrate.domain import Domain, DomainConfig
from migrate.engine import RestoreError, restore, save
from migrate.engine.channels import ChannelIntake, ChannelSink
from migrate.guest import check
from migrate.stream import FORMAT_VERSION

TOKEN = os.urandom(32)


def channel_pairs(count: int):
    """Socket pairs for the channels, and the unix socket the receiving side takes their
    far ends from (each with its index), as the daemon passes them."""
    pairs = [socket.socketpair() for _ in range(count)]
    give, take = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for i, (_, far) in enumerate(pairs):
        socket.send_fds(give, [i.to_bytes(4, "little")], [far.fileno()])
        far.close()
    give.close()
    return [near for near, _ in pairs], take


@pytest.mark.kvm
@pytest.mark.parametrize("fresh_stub", [False, True], ids=["stub-image", "fresh-stub"])
def test_a_live_save_on_two_channels_restores_whole(domains, fresh_stub):
    src = Domain.boot(DomainConfig("ch", "ledger", 32 << 20, args=[5, 0] + [0] * 6))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"ledger ok gen=2 ", 20)
    near, take = channel_pairs(2)
    outputs = [dataplane.Output(s.fileno(), timeout=20) for s in near]
    for i, out in enumerate(outputs):
        out.channel_header(FORMAT_VERSION, i, TOKEN)
    main: queue.Queue = queue.Queue()
    intake = ChannelIntake(dataplane.Receiver(2, FORMAT_VERSION, TOKEN, timeout=20), take)
    result: dict = {}

    def receive():
        try:
            result["domain"], _ = restore(iter(main.get, None), channels=intake, fresh_stub=fresh_stub)
            domains.append(result["domain"])
        except Exception as exc:        # the assertion below says what
            result["error"] = exc

    receiver = threading.Thread(target=receive)
    receiver.start()
    sink = ChannelSink(main.put, lambda: None, outputs)
    try:
        stats = save(src, sink, live=True, compress="auto")
    finally:
        sink.close()
        main.put(None)
        for s in near:
            s.close()
    receiver.join(30)
    assert "error" not in result, result.get("error")
    assert stats.rounds >= 2 and stats.pages_total >= 32 << 20 >> 12 >> 1
    dom = result["domain"]
    src.destroy()
    dom.resume()
    m = dom.console.wait_for(r"ledger ok gen=(\d+) sum=([0-9a-f]{16})", 20, start=dom.console.next_index)
    assert int(m.group(2), 16) == check.ledger_sum(5, int(m.group(1)), check.ledger_header(dom.memory).npages)
    dom.pause()
    assert check.ledger_verify(dom.memory)[0] == -1


@pytest.mark.kvm
def test_channels_that_do_not_match_their_record_are_refused(domains):
    src = Domain.boot(DomainConfig("ch2", "idle", 16 << 20))
    domains.append(src)
    near, take = channel_pairs(1)
    out = dataplane.Output(near[0].fileno(), timeout=10)
    out.channel_header(FORMAT_VERSION, 0, TOKEN)
    main: queue.Queue = queue.Queue()
    intake = ChannelIntake(dataplane.Receiver(1, FORMAT_VERSION, TOKEN, timeout=10), take)
    result: dict = {}

    def receive():
        try:
            restore(iter(main.get, None), channels=intake, make_domain=lambda cfg, **cpu: remember(Domain(cfg, **cpu)))
        except Exception as exc:
            result["error"] = exc

    built = []

    def remember(dom):
        built.append(dom)
        return dom

    receiver = threading.Thread(target=receive)
    receiver.start()
    sink = ChannelSink(main.put, lambda: None, [out])
    real_send_pages = sink.send_pages

    def lying_send_pages(*args, **kwargs):  # CHANNELS will claim one record more
        st = real_send_pages(*args, **kwargs)
        if kwargs.get("final") and kwargs.get("end"):
            rounds, records, pages, nbytes, digest = sink.finals[0]
            sink.finals[0] = (rounds, records + 1, pages, nbytes, digest)
        return st
    sink.send_pages = lying_send_pages
    try:
        save(src, sink)
    finally:
        sink.close()
        main.put(None)
        near[0].close()
    receiver.join(30)
    assert isinstance(result.get("error"), RestoreError), result
    assert "channel 0 ended with rounds 1, records" in str(result["error"])
    assert built and all(d.status == "destroyed" for d in built)


@pytest.mark.kvm
def test_a_channel_stream_without_its_channels_is_refused(domains):
    """The main stream alone (as if saved to a file) names channels it does not carry."""
    src = Domain.boot(DomainConfig("ch3", "idle", 16 << 20))
    domains.append(src)
    near, take = channel_pairs(1)
    out = dataplane.Output(near[0].fileno(), timeout=10)
    out.channel_header(FORMAT_VERSION, 0, TOKEN)
    chunks: list = []

    def drop_channel():              # the far end of the channel, read and thrown away
        _, fds, _, _ = socket.recv_fds(take, 16, 1)
        with socket.socket(fileno=fds[0]) as far:
            while far.recv(1 << 20):
                pass
    drain = threading.Thread(target=drop_channel)
    drain.start()
    sink = ChannelSink(chunks.append, lambda: None, [out])
    try:
        save(src, sink)
    finally:
        sink.close()
        near[0].close()
    drain.join()
    take.close()
    with pytest.raises(RestoreError, match="came on data channels, which this restore did not receive"):
        restore([b"".join(chunks)])


def test_ended_final_says_whether_a_round_ended_with_final_syncs():
    """The receiving process skips the ROUND line of the last round (domaind's reporter):
    ended_final must say so as soon as wait_round says the round ended, not later."""
    near, take = channel_pairs(2)
    outputs = [dataplane.Output(s.fileno(), timeout=10) for s in near]
    for i, out in enumerate(outputs):
        out.channel_header(FORMAT_VERSION, i, TOKEN)
    receiver = dataplane.Receiver(2, FORMAT_VERSION, TOKEN, timeout=10)
    intake = ChannelIntake(receiver, take)
    receiver.set_space(0, [dataplane.Range(0, 8, None)])
    receiver.open()
    try:
        for out in outputs:
            out.sync(0)
        assert intake.wait_round(0, 10) and not intake.ended_final(0)
        for out in outputs:
            out.sync(1, final=True)
        assert intake.wait_round(1, 10)
        assert intake.ended_final(1) and not intake.ended_final(0)
    finally:
        receiver.close()
        for out in outputs:
            out.close()
        for s in near:
            s.close()


def test_a_channels_record_claiming_more_rounds_is_named_at_once():
    """CHANNELS says the channels ended round 4; their FINAL syncs ended round 0. The
    restore says so at once (it used to wait for a round no channel could reach, for the
    whole timeout, then say the channels "did not end")."""
    import time
    from migrate.stream import Channels
    near, take = channel_pairs(1)
    out = dataplane.Output(near[0].fileno(), timeout=10)
    out.channel_header(FORMAT_VERSION, 0, TOKEN)
    receiver = dataplane.Receiver(1, FORMAT_VERSION, TOKEN, timeout=10)
    intake = ChannelIntake(receiver, take)
    receiver.set_space(0, [dataplane.Range(0, 8, None)])
    receiver.open()
    try:
        out.sync(0, final=True)
        assert receiver.wait(0, final=True, timeout=10)
        got = receiver.summary()[0][0]
        claimed = Channels(((5, got.records, got.pages, got.bytes, got.digest),))     # all true but the rounds
        t0 = time.monotonic()
        with pytest.raises(RestoreError, match=r"^channel 0 ended with rounds 1, records 0, pages 0, "
                                               r"bytes 48; CHANNELS says 5, 0, 0, 48 "):
            intake.finish(claimed, timeout=10)
        assert time.monotonic() - t0 < 2
    finally:
        intake.close()
        out.close()
        for s in near:
            s.close()


def test_the_receiving_process_says_the_channels_carry_pages(monkeypatch):
    """_RoundReporter says CHANNELS with the channels' bytes, at most every CHANNELS_EVERY
    seconds and only while they grow: the daemon's sign that a quiet round lives."""
    import os
    import time
    from migrate.host import domaind
    from migrate.host.launch import Say, parse
    monkeypatch.setattr(domaind, "CHANNELS_EVERY", 0.1)

    class Intake:
        carried = 0

        def bytes(self):
            return self.carried

        def wait_round(self, round_, timeout):
            time.sleep(0.05)
            return False

    intake = Intake()
    r, w = os.pipe()
    reporter = domaind._RoundReporter(intake, w)
    try:
        time.sleep(0.4)                     # nothing carried: nothing said
        intake.carried = 4096
        time.sleep(0.4)                     # carried once: said once
        intake.carried = 8192
        time.sleep(0.4)
    finally:
        reporter.stop()
        reporter.thread.join(2)
        os.close(w)
    lines = [parse(raw) for raw in os.read(r, 4096).decode().splitlines()]
    os.close(r)
    assert [(line.kind, line.bytes) for line in lines] == [(Say.CHANNELS, 4096), (Say.CHANNELS, 8192)]
