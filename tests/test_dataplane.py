"""The C data plane (migrate/dataplane): senders and receivers over real sockets, plain and
TLS 1.3, one and several channels; the round barrier; and hostile channel streams, built
here by an independent Python encoder of specs/stream-format.md "Channel streams", each
refused with one line before the bad bytes reach memory."""
from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

from migrate.dataplane import AUTO, RAW, ZSTD, DataplaneError, Output, Receiver, Sender, TlsContext
from migrate.stream.framing import frame
from migrate.stream.pages import encode_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from bench_compress_auto import tcp_link  # noqa: E402  (a connection drained at a rate)

PAGE = 4096
TOKEN = bytes(range(32))
MAGIC = b"\x89HVMCHAN"


def memory(pages: int, seed: int = 1) -> bytearray:
    """Pages of three kinds: zero, repetitive text, random."""
    rnd = __import__("random").Random(seed)
    out = bytearray(pages * PAGE)
    for pfn in range(pages):
        kind = pfn % 3
        if kind == 1:
            out[pfn * PAGE:(pfn + 1) * PAGE] = (f"page {pfn} ".encode() * 1024)[:PAGE]
        elif kind == 2:
            out[pfn * PAGE:(pfn + 1) * PAGE] = rnd.randbytes(PAGE)
    return out


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory):
    from migrate.host import tls
    root = tmp_path_factory.mktemp("pki")
    tls.keygen(root, ["127.0.0.1", "src"])
    return root / "127.0.0.1", root / "src"


def link(channels: int, secure: bool, tls_dirs, pages: int, dst: bytearray, stub=None):
    pairs = [socket.socketpair() for _ in range(channels)]
    rx = Receiver(channels, 2, TOKEN, TlsContext(True, tls_dirs[0]) if secure else None, timeout=20)
    rx.set_space(0, [(0, pages, dst)])
    rx.set_space(1, stub or [(0, 8, None)])
    rx.open()
    for i, (_, b) in enumerate(pairs):
        rx.add(i, b.fileno())
    client = TlsContext(False, tls_dirs[1]) if secure else None
    outs = [Output(a.fileno(), client, "127.0.0.1", timeout=20) for a, _ in pairs]
    for i, out in enumerate(outs):
        out.channel_header(2, i, TOKEN)
    return pairs, rx, outs


def close(pairs, rx, outs, tx=None):
    if tx is not None:
        tx.close()
    for out in outs:
        out.close()
    rx.close()
    for a, b in pairs:
        a.close()
        b.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("channels", [1, 3])
def test_rounds_arrive_whole_and_in_order(tls_dirs, secure, channels):
    pages = 3000
    src, dst = memory(pages), bytearray(pages * PAGE)
    pairs, rx, outs = link(channels, secure, tls_dirs, pages, dst)
    tx = Sender(outs, channels)
    tx.set_space(0, [(0, pages, src)])
    try:
        st = tx.send(0, range(pages), mode=ZSTD)
        assert st.pages == pages and st.zero_pages == pages // 3 and st.zstd_batches >= 1
        for out in outs:
            out.sync(0)
        assert rx.wait(0, timeout=20) and dst == src
        # round 1: some pages change, one becomes zero: the newer copies win
        src[5 * PAGE:6 * PAGE] = b"\x07" * PAGE
        src[2 * PAGE:3 * PAGE] = bytes(PAGE)
        for round_, mode in ((1, RAW), (2, ZSTD)):          # each page once a round
            tx.send(0, [2, 5, pages - 1], mode=mode, stable=True)
            for out in outs:
                out.sync(round_, final=round_ == 2)
        assert rx.wait(2, final=True, timeout=20) and dst == src
        summary, _, placed = rx.summary()
        assert [s.final for s in summary] == [True] * channels and sum(s.pages for s in summary) == pages + 6
        for s, out in zip(summary, outs):
            assert (s.records, s.pages, s.digest) == (out.state().records - 1, out.state().pages,
                                                      summary[s.index].digest)
        assert rx.error() is None
    finally:
        close(pairs, rx, outs, tx)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_round_of_two_spaces_and_its_syncs_in_one_call(tls_dirs, secure):
    """Sender.round: the pages of both spaces, then every channel's sync, whose figures it
    returns: what each channel's FINAL sync said (CHANNELS repeats them). A round with no
    pages still ends on every channel; a call without a sync writes nothing more."""
    pages, stub_pages = 600, 8
    src, dst = memory(pages), bytearray(pages * PAGE)
    stub_src, stub_dst = memory(stub_pages, seed=2), bytearray(stub_pages * PAGE)
    pairs, rx, outs = link(2, secure, tls_dirs, pages, dst, stub=[(0, stub_pages, stub_dst)])
    tx = Sender(outs, 2)
    tx.set_space(0, [(0, pages, src)])
    tx.set_space(1, [(0, stub_pages, stub_src)])
    try:
        st, synced = tx.round({0: range(pages), 1: range(stub_pages)}, AUTO, sync=0)
        assert st.pages == pages + stub_pages and len(synced) == 2
        assert rx.wait(0, timeout=20) and dst == src and stub_dst == stub_src
        offsets = [out.state().offset for out in outs]
        st, synced = tx.round({}, RAW)          # nothing to send, no sync asked: nothing written
        assert st.pages == 0 and synced == [] and [out.state().offset for out in outs] == offsets
        st, synced = tx.round({}, RAW, sync=1)  # an empty round: a sync on each channel
        assert st.pages == 0 and [s.offset for s in synced] == offsets and rx.wait(1, timeout=20)
        src[3 * PAGE:4 * PAGE] = b"\x05" * PAGE
        stub_src[:PAGE] = b"\x06" * PAGE
        before = [out.state() for out in outs]
        st, synced = tx.round({0: [3], 1: [0]}, RAW, stable=True, sync=2, final=True)
        assert st.pages == 2 and st.data_pages == 2
        assert rx.wait(2, final=True, timeout=20) and dst == src and stub_dst == stub_src
        summary, _, _ = rx.summary()
        for out, s, said, was in zip(outs, summary, synced, before):
            assert s.final and (s.records, s.pages, s.bytes, s.digest) == \
                (said.records, said.pages, said.offset, said.digest)
            assert out.state().records == said.records + 1 and said.records >= was.records
    finally:
        close(pairs, rx, outs, tx)


def test_a_page_of_a_later_round_never_loses_to_an_earlier_copy(tls_dirs):
    """Channel 1 races ahead with round 1's copy of page 7 while channel 0 still holds
    round 0's copy: the barrier keeps round 1 waiting until round 0 is placed."""
    dst = bytearray(16 * PAGE)
    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    ch0.batch(0, [(7, b"\x01" * PAGE)])
    ch0.sync(0)
    ch0.sync(1, final=True)
    ch1.sync(0)
    ch1.batch(0, [(7, b"\x02" * PAGE)])
    ch1.sync(1, final=True)
    rx, socks = receive([None, bytes(ch1.data)], dst, 16)
    try:
        late = threading.Timer(0.3, lambda: socks[0].sendall(ch0.data))     # channel 0 comes late
        late.start()
        assert rx.wait(1, final=True, timeout=10), rx.error()
        late.join()
        assert dst[7 * PAGE:8 * PAGE] == b"\x02" * PAGE
    finally:
        rx.close()
        for s in socks:
            s.close()


def test_channels_wait_for_the_memory_before_they_place_pages():
    """The channels start (TLS, headers) before the destination's memory exists; their
    pages wait until it is set and the receiver opened."""
    dst = bytearray(16 * PAGE)
    w = ChannelWriter(0)
    w.batch(0, [(3, DATA)])
    w.sync(0, final=True)
    rx = Receiver(1, 2, TOKEN, None, timeout=5)
    a, b = socket.socketpair()
    try:
        rx.add(0, b.fileno())
        feed(a, bytes(w.data))
        assert not rx.wait(0, final=True, timeout=0.3)         # no memory yet: nothing placed
        rx.set_space(0, [(0, 16, dst)])
        rx.open()
        assert rx.wait(0, final=True, timeout=5) and dst[3 * PAGE:4 * PAGE] == DATA
    finally:
        rx.close()
        a.close()
        b.close()


def test_sender_refuses_pages_outside_its_memory(tls_dirs):
    pairs, rx, outs = link(1, False, tls_dirs, 4, bytearray(4 * PAGE))
    tx = Sender(outs, 1)
    tx.set_space(0, [(0, 4, bytearray(4 * PAGE))])
    try:
        with pytest.raises(DataplaneError, match="pfn 0x9 is outside the memory of space 0"):
            tx.send(0, [1, 9])
    finally:
        close(pairs, rx, outs, tx)


def text_pages(pages: int) -> bytearray:
    """Text-like pages (zstd-1 takes them to well under half): windows of 256 KiB of
    random words, each page its own window."""
    rnd = __import__("random").Random(5)
    words = b"the page memory guest host stream record domain kernel save restore dirty round".split()
    base = b" ".join(rnd.choice(words) + b"%d" % rnd.randrange(1000) for _ in range(40000))[:256 << 10]
    return bytearray(b"".join(base[at:at + PAGE] for at in ((pfn * 4133) % (len(base) - PAGE)
                                                          for pfn in range(pages))))


def send_all(fd: int, memory_: bytearray, rate: float = 0.0, mode: int = AUTO):
    """Every page of ``memory_`` into ``fd`` (``mode``: --compress auto unless said), two
    workers on one output paced at ``rate`` (0: not paced); the round's figures."""
    pages = len(memory_) // PAGE
    out = Output(fd)
    tx = Sender([out], 2, rate)
    tx.set_space(0, [(0, pages, memory_)])
    try:
        return tx.send(0, range(pages), mode=mode)
    finally:
        tx.close()
        out.close()


def test_the_pacer_holds_the_rate():
    """--max-bandwidth is a token bucket in the data plane over every output's bytes: 8 MiB
    at 20 MB/s take the rate's time less the burst (max(256 KiB, 20 ms of rate)), not
    less, whatever the encoding threads."""
    pages, rate = 2048, 20e6
    data = bytearray(os.urandom(pages * PAGE))
    with open(os.devnull, "wb") as sink:
        t0 = time.monotonic()
        st = send_all(sink.fileno(), data, rate, mode=RAW)
        took = time.monotonic() - t0
    floor = (st.bytes - max(256 << 10, rate / 50)) / rate
    assert floor * 0.95 <= took <= floor * 2 + 0.5, (took, floor)      # the upper bound: a loaded host


@pytest.mark.parametrize("content,rate,compressed", [
    ("text", 20e6, "most"),         # a slow link: compressing text gets it out three times sooner
    ("text", 0.0, "none"),          # an output that takes anything at once: never worth compressing
    ("random", 100e6, "none"),      # random pages do not shrink, however slow the link
])
def test_auto_compresses_only_where_it_gets_pages_out_sooner(content, rate, compressed):
    """--compress auto, per batch: two workers share one output, a file on /dev/null,
    paced at ``rate`` (0: not paced) to stand for a link. Each worker's first two batches
    go raw (they measure the output), and the probes that learn zstd's speed and ratio
    while batches go raw are never sent."""
    pages = 8192                    # 32 MiB: 8 batches
    memory_ = text_pages(pages) if content == "text" else bytearray(__import__("random").Random(6).randbytes(
        pages * PAGE))
    with open("/dev/null", "wb") as sink:
        st = send_all(sink.fileno(), memory_, rate)
    assert st.batches == 8 and st.zstd_batches + st.raw_batches == 8
    if compressed == "most":
        assert st.zstd_batches >= 4 and st.zstd_out < st.zstd_in / 2        # all but the first two of each
    else:
        assert st.zstd_batches == 0 and st.zstd_in == 0


def test_auto_on_a_slow_tcp_link_compresses_once_it_has_measured_it():
    """A TCP connection drained at 20 MB/s, text pages: a compressed record drops into the
    socket's buffer at once, so its write says nothing of the link; learnt from it, the
    link looked fast and raw and compressed batches took turns (a third compressed). The
    link's rate comes from raw writes alone: after the first few, the rest go compressed."""
    memory_ = text_pages(32 * 1024)             # 32 batches
    ours, reader = tcp_link(20e6)
    try:
        st = send_all(ours.fileno(), memory_)
    finally:
        ours.shutdown(socket.SHUT_WR)
        reader.join(60)
        ours.close()
    assert st.batches == 32 and st.zstd_batches >= 20, st


def test_a_client_outside_the_ca_is_refused(tls_dirs, tmp_path):
    from migrate.host import tls
    tls.keygen(tmp_path / "other", ["src"])
    a, b = socket.socketpair()
    rx = Receiver(1, 2, TOKEN, TlsContext(True, tls_dirs[0]), timeout=5)
    rx.set_space(0, [(0, 4, bytearray(4 * PAGE))])
    rx.open()
    rx.add(0, b.fileno())
    try:
        with pytest.raises(DataplaneError, match="TLS handshake failed"):
            Output(a.fileno(), TlsContext(False, tmp_path / "other" / "src"), "127.0.0.1", timeout=5)
        with pytest.raises(DataplaneError, match="channel 0: TLS handshake failed"):
            rx.wait(0, timeout=5)
    finally:
        rx.close()
        a.close()
        b.close()


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    """A peer that sends a byte of a TLS record header every 0.2 s and never more: each
    read gets something, so only a limit on the whole handshake ends it."""
    header = b"\x16\x03\x03\x40\x00" * 100
    for byte in header:
        if stop.wait(0.2):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_tls_handshake_has_a_limit_in_all(tls_dirs, side):
    """A data channel's TLS handshake must be done within ``handshake`` seconds in all
    (specs/relocation.md, section 5), however the peer spaces its bytes; before, each read
    had the whole ``timeout``, so a peer trickling a byte a second held a channel forever."""
    a, b = socket.socketpair()
    stop = threading.Event()
    peer = threading.Thread(target=_trickle, args=(b if side == "client" else a, stop), daemon=True)
    peer.start()
    t0 = time.monotonic()
    try:
        if side == "client":
            with pytest.raises(DataplaneError, match=r"^TLS handshake failed: not done within 1 s$"):
                Output(a.fileno(), TlsContext(False, tls_dirs[1]), "127.0.0.1", timeout=0.5, handshake=1.0)
        else:
            rx = Receiver(1, 2, TOKEN, TlsContext(True, tls_dirs[0]), timeout=0.5, handshake=1.0)
            rx.set_space(0, [(0, 4, bytearray(4 * PAGE))])
            rx.open()
            rx.add(0, b.fileno())
            try:
                with pytest.raises(DataplaneError, match=r"channel 0: TLS handshake failed: not done within 1 s"):
                    rx.wait(0, timeout=10)
            finally:
                rx.close()
        took = time.monotonic() - t0
        assert 0.9 < took < 3, took
    finally:
        stop.set()
        peer.join()
        a.close()
        b.close()


# -- an independent encoder of channel streams, for hostile ones ------------------------------

class ChannelWriter:
    def __init__(self, index: int, version: int = 2, token: bytes = TOKEN, magic: bytes = MAGIC):
        self.data = bytearray(magic + struct.pack("<II", version, index) + token)
        self.records = self.pages = 0

    def record(self, rtype: int, body: bytes, pages: int = 0) -> None:
        self.data += frame(rtype, body)
        self.records += 1
        self.pages += pages

    def batch(self, space: int, pages, compressed: bool = False) -> None:
        self.record(4 if compressed else 3, encode_batch(space, pages, compressed), len(pages))

    def sync(self, round_: int, final: bool = False, **lie) -> None:
        values = {"records": self.records, "pages": self.pages, "offset": len(self.data),
                  "digest": xxhash.xxh3_128(bytes(self.data)).digest(), "flags": int(final), "reserved": 0}
        values.update(lie)
        body = struct.pack("<IIQQQ16sQ", round_, values["flags"], values["records"], values["pages"],
                           values["offset"], values["digest"], values["reserved"])
        self.record(0x50, body)


def feed(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:         # the receiver gave up first and the test closed the socket
        pass


def receive(streams: list, dst: bytearray, pages: int, cap: int = 0):
    rx = Receiver(len(streams), 2, TOKEN, None, timeout=5, cap=cap)
    rx.set_space(0, [(0, pages, dst)])
    rx.open()
    socks = []
    for i, data in enumerate(streams):
        a, b = socket.socketpair()
        rx.add(i, b.fileno())
        if data is not None:
            threading.Thread(target=feed, args=(a, data), daemon=True).start()
        socks += [a, b]
    return rx, socks[::2] + socks[1::2]


def refused(streams: list, pages: int = 16, cap: int = 0) -> tuple[str, bytearray]:
    dst = bytearray(pages * PAGE)
    rx, socks = receive(streams, dst, pages, cap)
    try:
        with pytest.raises(DataplaneError) as info:
            rx.wait(1 << 20, final=True, timeout=10)
        message = str(info.value)
        assert "\n" not in message
        return message, dst
    finally:
        rx.close()
        for s in socks:
            s.close()


def one(fn) -> bytes:
    w = ChannelWriter(0)
    fn(w)
    return bytes(w.data)


DATA = b"\x5a" * PAGE


@pytest.mark.parametrize("build,message", [
    (lambda w: None, "before its FINAL sync"),
    (lambda w: w.record(3, encode_batch(0, [(16, DATA)], False), 1), "pfn 0x10 outside the memory of space 0"),
    (lambda w: w.record(3, encode_batch(2, [(1, DATA)], False), 1), "unknown address space 2"),
    (lambda w: w.record(3, encode_batch(0, [(1, DATA)], False)[:-1], 1), "carries 4095 data bytes, 1 pages need 4096"),
    (lambda w: w.record(3, encode_batch(0, [(1, DATA), (1, DATA)], False), 2), "pfn 0x1 sent twice in round 0"),
    (lambda w: w.record(4, encode_batch(0, [(1, DATA)], False), 1), "has page type 0, not allowed here"),
    (lambda w: w.record(0x30, b"\x80"), "not a record a data channel carries"),
    (lambda w: w.sync(0, records=99), "counts or digest differ"),
    (lambda w: w.sync(3), "ends round 3, this channel is in round 0"),
    (lambda w: w.sync(0, flags=2), "flags 0x2 or reserved field not allowed"),
    (lambda w: (w.sync(0, final=True), w.data.extend(b"\0" * 8)), "bytes after its FINAL sync"),
    (lambda w: w.data.extend(struct.pack("<IIII", 3, 1 << 30, 0, 0)), "record body length 1073741824 exceeds"),
    (lambda w: w.data.extend(struct.pack("<IIII", 3, 0, 1, 0)), "record header reserved field is nonzero"),
])
def test_hostile_channel_records(build, message):
    text, dst = refused([one(build)])
    assert message in text and text.startswith("channel 0")
    assert dst == bytes(len(dst)), "nothing of a refused record reaches memory"


def test_hostile_framing_and_headers():
    w = ChannelWriter(0)
    w.batch(0, [(3, DATA)])
    bad_crc = bytearray(w.data)
    bad_crc[60] ^= 1
    assert "record CRC-32 mismatch" in refused([bytes(bad_crc)])[0]
    w = ChannelWriter(0)
    w.batch(0, [(3, DATA)], compressed=True)        # a zstd frame: its body needs padding
    body_len = struct.unpack_from("<I", w.data, 52)[0]
    assert body_len % 8
    padded = bytearray(w.data)
    padded[48 + 16 + body_len] = 1                  # the first padding byte
    assert "padding is not zero" in refused([bytes(padded)])[0]
    for writer, what in [(ChannelWriter(0, token=bytes(32)), "token"), (ChannelWriter(0, version=1), "version"),
                         (ChannelWriter(1), "index"), (ChannelWriter(0, magic=b"\x89HVMPAIR"), "magic")]:
        text, _ = refused([bytes(writer.data)])
        assert "its header is not this relocation's" in text, what


def test_the_same_page_on_two_channels_in_one_round_is_refused():
    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    for w in (ch0, ch1):
        w.batch(0, [(4, DATA)])
        w.sync(0, final=True)
    assert "pfn 0x4 sent twice in round 0" in refused([bytes(ch0.data), bytes(ch1.data)])[0]


@pytest.mark.parametrize("finals", [(0, 1), (1, 0)])
def test_channels_that_end_different_rounds_are_refused_at_once(finals):
    """One channel's FINAL sync ends round 0, the other's sync of round 0 is not FINAL: the
    receiver refuses at that round's barrier (it used to wait forever for the channel that
    had ended, until its caller's timeout). Found by tools/fuzz/channels_fuzz.c."""
    import time
    writers = [ChannelWriter(0), ChannelWriter(1)]
    for index, last in enumerate(finals):
        w = writers[index]
        w.batch(0, [(index, DATA)])
        w.sync(0, final=last == 0)
        if last == 1:
            w.sync(1, final=True)
    t0 = time.monotonic()
    text, _ = refused([bytes(w.data) for w in writers])
    ended = finals.index(0)
    assert f"channel {ended} ends round 0 with its FINAL sync, channel {1 - ended} does not" in text
    assert time.monotonic() - t0 < 3


def test_zstd_frames_are_checked_before_decompressing():
    import zstandard
    data = zstandard.ZstdCompressor(write_content_size=False).compress(DATA)
    body = struct.pack("<II", 0, 1) + struct.pack("<QII", 1, 2, 0) + data
    assert "zstd frame declares unknown bytes" in refused([one(lambda w: w.record(4, body, 1))])[0]
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    body = struct.pack("<II", 0, 1) + struct.pack("<QII", 1, 2, 0) + skippable
    assert "not a zstd frame" in refused([one(lambda w: w.record(4, body, 1))])[0]
    good = zstandard.ZstdCompressor(write_content_size=True).compress(DATA)
    body = struct.pack("<II", 0, 1) + struct.pack("<QII", 1, 2, 0) + good + b"\0"
    assert "bytes after the frame" in refused([one(lambda w: w.record(4, body, 1))])[0]


def test_a_well_formed_stream_from_the_independent_encoder_is_placed():
    import random
    rnd = random.Random(3)
    pages = {pfn: rnd.randbytes(PAGE) for pfn in (1, 2, 9)}
    w = ChannelWriter(0)
    w.batch(0, list(pages.items()), compressed=True)
    w.sync(0)
    w.batch(0, [(9, bytes(PAGE)), (2, b"\x11" * PAGE)])
    w.sync(1, final=True)
    dst = bytearray(16 * PAGE)
    rx, socks = receive([bytes(w.data)], dst, 16)
    try:
        assert rx.wait(1, final=True, timeout=10), rx.error()
        assert dst[PAGE:2 * PAGE] == pages[1] and dst[2 * PAGE:3 * PAGE] == b"\x11" * PAGE
        assert dst[9 * PAGE:10 * PAGE] == bytes(PAGE)
        summary = rx.summary()[0][0]
        assert (summary.rounds, summary.final, summary.pages) == (2, True, 5)
    finally:
        rx.close()
        for s in socks:
            s.close()


def test_the_fast_crc_is_zlibs():
    """Record CRCs are folded with carry-less multiplication where the CPU has it (the data
    plane's, and the stream reader's and writer's framing.crc32: crc32_fold.h in both);
    every length and alignment (the 64-byte main loop, the 16-byte folds, the tail) and
    seed must give zlib's value, from bytes and memoryviews alike."""
    import random
    import zlib
    from migrate.dataplane._dataplane import lib
    from migrate.stream.framing import crc32, record_crc
    rnd = random.Random(5)
    data = rnd.randbytes(70000)
    for n in list(range(0, 200)) + [4095, 4096, 4097, 65536, 69997]:
        for start in (0, 1, 13):
            piece = data[start:start + n]
            for crc in (0, 0xFFFFFFFF, rnd.getrandbits(32)):
                want = zlib.crc32(piece, crc)
                assert lib.dp_crc32(crc, piece, len(piece)) == want, (n, start, crc)
                assert crc32(memoryview(bytearray(piece)), crc) == want, (n, start, crc)
    body = data[:5000]
    assert record_crc(4, body) == zlib.crc32(body, zlib.crc32(struct.pack("<III", 4, 5000, 0)))


def test_a_closed_receiver_takes_no_channel():
    """A channel handed over after close (a restore failing while channels still arrive)
    is refused: no thread starts that close would not join (and free would pull its
    memory from under)."""
    rx = Receiver(2, 2, TOKEN, None, timeout=5)
    a, b = socket.socketpair()
    try:
        rx.close()
        with pytest.raises(DataplaneError, match="the receiver is closed"):
            rx.add(0, b.fileno())
    finally:
        rx.close()
        a.close()
        b.close()


def test_no_channel_places_pages_once_another_failed():
    """Channel 1's batches are all in its socket, waiting for the memory to be opened;
    channel 0 fails (a wrong token). Channel 1 stops without placing a page."""
    dst = bytearray(16 * PAGE)
    rx = Receiver(2, 2, TOKEN, None, timeout=5)
    rx.set_space(0, [(0, 16, dst)])             # described, never opened
    w = ChannelWriter(1)
    for pfn in range(16):
        w.batch(0, [(pfn, DATA)])
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        pairs[1][0].sendall(bytes(w.data))
        rx.add(1, pairs[1][1].fileno())
        pairs[0][0].sendall(bytes(ChannelWriter(0, token=bytes(32)).data))
        rx.add(0, pairs[0][1].fileno())
        deadline = time.monotonic() + 5
        while rx.error() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "its header is not this relocation's" in rx.error()
        time.sleep(0.2)                         # channel 1 had every chance to go on
        assert dst == bytes(len(dst))
    finally:
        rx.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_bytes_after_a_final_sync_are_refused_before_the_wait_ends():
    """The bytes came with the FINAL sync: the wait for it fails, it does not report the
    channel done (it used to, in a third to a half of these tries, with the error
    following later)."""
    for _ in range(40):
        w = ChannelWriter(0)
        w.batch(0, [(3, DATA)])
        w.sync(0, final=True)
        dst = bytearray(16 * PAGE)
        rx = Receiver(1, 2, TOKEN, None, timeout=5)
        rx.set_space(0, [(0, 16, dst)])
        rx.open()
        a, b = socket.socketpair()
        try:
            a.sendall(bytes(w.data) + b"\0" * 8)    # all there before the channel's thread starts
            rx.add(0, b.fileno())
            with pytest.raises(DataplaneError, match="bytes after its FINAL sync"):
                rx.wait(0, final=True, timeout=5)
        finally:
            rx.close()
            a.close()
            b.close()


@pytest.mark.parametrize("trailer", ["record", "garbage"])
def test_bytes_after_a_final_sync_in_a_tls_record_of_their_own_are_refused_before_the_wait_ends(tls_dirs, trailer):
    """The same on a TLS channel, the bytes in a record after the FINAL sync's: TLS has
    not decrypted them when the FINAL sync is read (it used to count only what it had
    decrypted: the FINAL sync counted, and the error came a read later). Bytes that are
    no TLS record at all count too (the peek's protocol error). Every byte is on the
    socket before the receiver is opened, i.e. before it reads a record; the waits poll,
    so that they see the channel done if it ever is."""
    server, client = TlsContext(True, tls_dirs[0]), TlsContext(False, tls_dirs[1])
    w = ChannelWriter(0)
    w.batch(0, [(3, DATA)])
    w.sync(0, final=True)
    for _ in range(40):
        rx = Receiver(1, 2, TOKEN, server, timeout=5)
        rx.set_space(0, [(0, 16, bytearray(16 * PAGE))])
        a, b = socket.socketpair()
        rx.add(0, b.fileno())
        out = Output(a.fileno(), client, "127.0.0.1", timeout=5)
        try:
            out.write(bytes(w.data))        # header, batch, FINAL sync: one TLS record
            if trailer == "record":
                out.write(b"\0" * 8)        # a record of their own
            else:
                a.sendall(b"\0" * 8)        # not a TLS record
            rx.open()
            deadline = time.monotonic() + 5
            with pytest.raises(DataplaneError, match="^channel 0: bytes after its FINAL sync$"):
                while time.monotonic() < deadline:
                    assert not rx.wait(0, final=True, timeout=0), "the channel was reported done"
        finally:
            out.close()
            rx.close()
            a.close()
            b.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_channel_timeout_reads_the_same_with_or_without_tls(tls_dirs, secure):
    """A quiet peer: the receiver's read and the sender's write run out of time. TLS used
    to say "TLS error" (OpenSSL's WANT_READ / WANT_WRITE on a socket whose timeout ran
    out); both say what the plain socket says."""
    server = TlsContext(True, tls_dirs[0]) if secure else None
    client = TlsContext(False, tls_dirs[1]) if secure else None

    def channel(rx, write_timeout):
        a, b = socket.socketpair()
        rx.add(0, b.fileno())
        out = Output(a.fileno(), client, "127.0.0.1", timeout=write_timeout)
        out.channel_header(2, 0, TOKEN)
        return [(a, b)], [out]

    rx = Receiver(1, 2, TOKEN, server, timeout=0.5)     # opened: reads records, gets none
    rx.set_space(0, [(0, 16, bytearray(16 * PAGE))])
    rx.open()
    pairs, outs = channel(rx, 5)
    try:
        with pytest.raises(DataplaneError) as info:
            rx.wait(0, timeout=5)
        assert str(info.value) == "channel 0: no data within the channel timeout before its FINAL sync (offset 48)"
    finally:
        close(pairs, rx, outs)
    rx = Receiver(1, 2, TOKEN, server, timeout=5)       # never opened: reads no record
    pairs, outs = channel(rx, 0.5)
    try:
        with pytest.raises(DataplaneError) as info:
            for _ in range(64):                         # more than the socket buffers hold
                outs[0].write(bytes(1 << 20))
        assert str(info.value) == f"writing the stream failed: {os.strerror(errno.EAGAIN)}"
    finally:
        close(pairs, rx, outs)


def test_a_final_wait_ends_once_every_channel_ended_whatever_round():
    """Waiting for FINAL syncs that end round 4 when the channels' FINAL syncs ended round
    0: no channel can get further, so the wait ends at once, and the summaries say what
    the channels ended (a CHANNELS record claiming more rounds used to run out the whole
    timeout, said as "did not end", not the mismatch)."""
    w = ChannelWriter(0)
    w.batch(0, [(3, DATA)])
    w.sync(0, final=True)
    dst = bytearray(16 * PAGE)
    rx, socks = receive([bytes(w.data)], dst, 16)
    try:
        t0 = time.monotonic()
        assert rx.wait(4, final=True, timeout=10), rx.error()
        assert time.monotonic() - t0 < 2
        summary = rx.summary()[0][0]
        assert (summary.rounds, summary.final) == (1, True)
        assert not rx.wait(4, timeout=0.2), "without final, a round not ended is still waited for"
    finally:
        rx.close()
        for s in socks:
            s.close()


def test_the_bytes_of_all_channels_together_are_capped():
    """The relocation's stream cap holds for its channels too, over all of them together:
    at the cap a stream is placed, a byte under it every channel fails with one line
    naming it, and the batch that crosses it is not placed."""
    ch0, ch1 = ChannelWriter(0), ChannelWriter(1)
    for w, pfns in ((ch0, (0, 1, 2, 3)), (ch1, (8, 9))):
        for pfn in pfns:
            w.batch(0, [(pfn, DATA)])
        w.sync(0, final=True)
    total = len(ch0.data) + len(ch1.data)
    dst = bytearray(16 * PAGE)
    rx, socks = receive([bytes(ch0.data), bytes(ch1.data)], dst, 16, cap=total)
    try:
        assert rx.wait(0, final=True, timeout=10), rx.error()
    finally:
        rx.close()
        for s in socks:
            s.close()
    text, _ = refused([bytes(ch0.data), bytes(ch1.data)], cap=total - 1)
    assert f"the data channels carry more than their cap of {total - 1} bytes in all" in text
    w = ChannelWriter(0)                # one channel: the third batch crosses the cap
    for pfn in range(4):
        if pfn == 2:
            at = len(w.data)
        w.batch(0, [(pfn, DATA)])
        if pfn == 2:
            cap = len(w.data) - 1
    w.sync(0, final=True)
    text, dst = refused([bytes(w.data)], cap=cap)
    assert text == (f"channel 0: the data channels carry more than their cap of {cap} bytes in all "
                    f"(offset {at} of this one)")
    assert dst[:2 * PAGE] == DATA * 2 and dst[2 * PAGE:] == bytes(14 * PAGE)


def test_a_target_refuses_a_pfn_twice_in_a_batch_after_a_descent():
    """pfns 1, 0, 1: not ascending at 0, and 1 again after it."""
    from migrate.dataplane import Target
    mem = bytearray(16 * PAGE)
    target = Target(1)
    try:
        target.set_space(0, [(0, 16, mem)])
        for pfns in ([1, 1], [1, 0, 1], [2, 0, 1, 3, 0]):
            with pytest.raises(DataplaneError, match="appears twice in one batch"):
                target.place(3, encode_batch(0, [(p, DATA) for p in pfns], False))
        assert mem == bytes(len(mem))
    finally:
        target.close()


def _handoff_link(secure: bool, tls_dirs):
    """Two channels of a handoff, each ended by its FINAL sync after one page."""
    pages, channels = 16, 2
    pairs = [socket.socketpair() for _ in range(channels)]
    rx = Receiver(channels, 2, TOKEN, TlsContext(True, tls_dirs[0]) if secure else None, timeout=5, handoff=True)
    rx.set_space(0, [(0, pages, bytearray(pages * PAGE))])
    rx.open()
    for i, (_, b) in enumerate(pairs):
        rx.add(i, b.fileno())
    client = TlsContext(False, tls_dirs[1]) if secure else None
    outs = [Output(a.fileno(), client, "127.0.0.1", timeout=5) for a, _ in pairs]
    tx = Sender(outs, channels)
    tx.set_space(0, [(0, pages, memory(pages))])
    for i, out in enumerate(outs):
        out.channel_header(2, i, TOKEN)
    tx.send(0, range(pages), mode=RAW, stable=True)
    for out in outs:
        out.sync(0, final=True)
    assert rx.wait(0, final=True, timeout=5) and rx.error() is None
    return pairs, rx, outs, tx


def _await_go(handoff, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while (go := handoff.go()) is None:
        assert time.monotonic() < deadline, "no GO"
        select.select([handoff], [], [], 0.1)
    return go


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("paused", [False, True])
def test_the_handoff_on_channel_0_outlives_the_receiver(tls_dirs, secure, paused):
    """READY, GO and ANSWER after channel 0's FINAL sync, its TLS session taken from the
    receiver, which is then closed (its channels' sockets too) before READY: the handoff
    goes on."""
    pairs, rx, outs, tx = _handoff_link(secure, tls_dirs)
    handoff = rx.handoff()
    other_r, other_w = os.pipe()
    try:
        rx.close()
        for _, b in pairs:
            b.close()               # the intake's sockets: the handoff has a descriptor of its own
        assert handoff.go() is None                     # nothing yet, and no wait
        assert outs[0].handoff("ready", other_r, 0.05) is None     # before READY: neither
        handoff.ready()
        assert outs[0].handoff("ready", other_r, 5) == "ready"
        outs[0].go(paused)
        assert _await_go(handoff) is paused
        os.write(other_w, b"x")
        assert outs[0].handoff("answer", other_r, 5) == "other"    # the control link, say
        handoff.answer("paused" if paused else "running")
        assert outs[0].handoff("answer", -1, 5) == ("paused" if paused else "running")
    finally:
        os.close(other_r)
        os.close(other_w)
        handoff.close()
        close(pairs, rx, outs, tx)


def test_the_source_waits_for_ready_or_its_control_link(tls_dirs):
    """Whatever comes first: the control connection readable ends the wait for READY."""
    r, w = os.pipe()
    try:
        with _handed_over(tls_dirs, True) as (_, outs, handoff):
            os.write(w, b"x")
            assert outs[0].handoff("ready", r, 5) == "other"
            handoff.ready()
            handoff.answer("refused")
            assert outs[0].handoff("ready", -1, 5) == "ready"
            assert outs[0].handoff("answer", -1, 5) == "refused"
    finally:
        os.close(r)
        os.close(w)


@contextlib.contextmanager
def _handed_over(tls_dirs, secure: bool = False):
    """A handoff link, channel 0 taken: (socket pairs, outputs, the destination's Handoff)."""
    pairs, rx, outs, tx = _handoff_link(secure, tls_dirs)
    handoff = rx.handoff()
    try:
        yield pairs, outs, handoff
    finally:
        handoff.close()
        close(pairs, rx, outs, tx)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_handoff_message_that_is_not_go_or_ready_is_refused(tls_dirs, secure):
    with _handed_over(tls_dirs, secure) as (_, outs, handoff):
        outs[0].write(b"\x89HVMGO!1" + struct.pack("<II", 2, 0))        # an unknown flag
        with pytest.raises(DataplaneError, match="^channel 0: GO expected, other bytes came$"):
            _await_go(handoff)


def test_a_ready_or_answer_that_is_not_one_is_refused(tls_dirs):
    with _handed_over(tls_dirs) as (pairs, outs, _):
        pairs[0][1].sendall(b"\x89HVMRDY1" + struct.pack("<II", 0, 1))  # reserved not zero
        with pytest.raises(DataplaneError, match="^channel 0: READY expected, other bytes came$"):
            outs[0].handoff("ready", -1, 5)
        pairs[0][1].sendall(b"\x89HVMANS1" + struct.pack("<II", 4, 0))  # no such answer
        with pytest.raises(DataplaneError, match="^channel 0: ANSWER expected, other bytes came$"):
            outs[0].handoff("answer", -1, 5)


def test_a_go_cut_short_is_refused_when_the_channel_ends(tls_dirs):
    with _handed_over(tls_dirs) as (pairs, outs, handoff):
        outs[0].write(b"\x89HVMGO")
        pairs[0][0].shutdown(socket.SHUT_WR)
        with pytest.raises(DataplaneError, match="^channel 0: no GO: the channel ended$"):
            _await_go(handoff)


def test_no_handoff_without_asking_for_it_and_bytes_after_final_stay_refused(tls_dirs):
    """Without ``handoff``, channel 0 is like any other: no handoff to take, and a GO after
    its FINAL sync is refused as bytes after it."""
    pages = 16
    a, b = socket.socketpair()
    rx = Receiver(1, 2, TOKEN, None, timeout=5)
    rx.set_space(0, [(0, pages, bytearray(pages * PAGE))])
    rx.open()
    rx.add(0, b.fileno())
    out = Output(a.fileno())
    try:
        out.channel_header(2, 0, TOKEN)
        out.sync(0, final=True)
        out.go(False)
        deadline = time.monotonic() + 5
        with pytest.raises(DataplaneError, match="^channel 0: bytes after its FINAL sync$"):
            while time.monotonic() < deadline:
                rx.wait(0, final=True, timeout=0.05)
                time.sleep(0.01)
        with pytest.raises(DataplaneError, match="^channel 0 carries no handoff$"):
            rx.handoff()
    finally:
        out.close()
        rx.close()
        a.close()
        b.close()


def test_closing_a_tls_channel_the_peer_stopped_reading_does_not_wait(tls_dirs):
    """A destination that stops reading holds a channel's send buffer full: the close
    (close_notify) is tried without waiting, not for the send timeout, which each channel's
    close in turn could otherwise spend (before the source's copy of a moved guest goes)."""
    import ssl
    a, b = socket.socketpair()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls_dirs[0] / "cert.pem", tls_dirs[0] / "key.pem")
    server.load_verify_locations(tls_dirs[0] / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    done = threading.Event()

    def peer():                 # the handshake, then no more reading
        with server.wrap_socket(b, server_side=True) as tls:
            tls.do_handshake()
            done.wait(30)
    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        out = Output(a.fileno(), TlsContext(False, tls_dirs[1]), "127.0.0.1", timeout=5.0, handshake=5.0)
        a.setblocking(False)            # the buffers full, no TLS record half written
        with contextlib.suppress(BlockingIOError):
            while True:
                a.send(bytes(1 << 16))
        a.setblocking(True)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        t0 = time.monotonic()
        out.close()
        assert time.monotonic() - t0 < 1.5
    finally:
        done.set()
        thread.join(10)
        a.close()
