"""The network card: virtio-net in the stub on a TAP device, the guest's stack (netecho:
ARP, ping, UDP echo), notification suppression, pausing, DMA in the dirty log, save and
restore with the announce, the ledger's disk beside it, and hostile traffic (descriptor
chains, NET_RX requests, device state) that must hurt neither the host nor the stub.

The other end of the wire is an AF_PACKET socket on the NIC's TAP device (class Wire):
the test speaks Ethernet frames to the guest directly, so no address is configured on
the host and nothing but the TAP device (named with this process id, gone with its
domain) is made."""
import json
import os
import socket
import struct
import time

import pytest
from click.testing import CliRunner

from migrate.cli import hvm
from migrate.domain import Domain, DomainConfig, DomainError
from migrate.engine import file_chunks, restore, save_to_file
from migrate.engine.state import RestoreError, config_from_record
from migrate.host import control, destination
from migrate.stream import DomainConfig as ConfigRecord
from migrate.stub import abi
from migrate.stub.netback import NetError, check_net, parse_net, rarp_frame

GUEST_IP, PEER_IP = "10.0.0.2", "10.0.0.1"
PEER_MAC = bytes.fromhex("020000000001")
NO_CSUM, NO_EVENT_IDX, KICK_EACH, IRQ = 1, 2, 4, 8
NAIVE = NO_EVENT_IDX | KICK_EACH | IRQ
ETH_P_ALL, PACKET_OUTGOING = 3, 4
_taps = iter(range(1000))


def ip_number(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


def need_tap():
    if os.geteuid() != 0:
        pytest.skip("NIC test skipped: TAP devices need root")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("NIC test skipped: /dev/net/tun is missing")


# -- frames ------------------------------------------------------------------------------

def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def eth(dst: bytes, kind: int, payload: bytes) -> bytes:
    return dst + PEER_MAC + struct.pack("!H", kind) + payload


def ipv4(proto: int, payload: bytes, src=PEER_IP, dst=GUEST_IP) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", ~csum(head) & 0xFFFF) + head[12:] + payload


def pseudo(src: str, dst: str, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)


def udp(payload: bytes, dport=7, sport=40000, bad_sum=False) -> bytes:
    head = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    total = ~csum(pseudo(PEER_IP, GUEST_IP, 8 + len(payload)) + head + payload) & 0xFFFF
    return head[:6] + struct.pack("!H", (total or 0xFFFF) ^ (0x1234 if bad_sum else 0)) + payload


def icmp_echo(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, ~csum(head + payload) & 0xFFFF, ident, seq) + payload


class Wire:
    """The far end of a TAP device: frames sent here reach the guest's NIC, frames the
    guest sends arrive here."""

    def __init__(self, ifname: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def expect(self, match, timeout=5.0, count=1) -> list[bytes]:
        """``count`` frames from the guest for which ``match(frame)`` holds."""
        got, deadline = [], time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {count} frames came"
            self.sock.settimeout(left)
            try:
                frame, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            if addr[2] != PACKET_OUTGOING and match(frame):
                got.append(frame)
        return got

    def quiet(self, match, seconds: float) -> bool:
        """No frame matching for ``seconds``."""
        try:
            self.expect(match, seconds)
        except AssertionError:
            return True
        return False

    def close(self):
        self.sock.close()


def is_udp_reply(frame: bytes, dport=40000) -> bool:
    return len(frame) >= 42 and frame[12:14] == b"\x08\x00" and frame[23] == 17 \
        and struct.unpack_from("!H", frame, 36)[0] == dport


def udp_payload(frame: bytes) -> bytes:
    length = struct.unpack_from("!H", frame, 38)[0]
    return frame[42:34 + length]


class Nic:
    """A booted guest with a NIC on a fresh TAP device and the wire to it."""

    def __init__(self, domains, workload="netecho", opts=0, mtu=9000, args=None, **kw):
        need_tap()
        self.tap = f"hvt{os.getpid() % 100000}n{next(_taps)}"
        self.net = parse_net(f"tap={self.tap},mtu={mtu}")
        self.mac = bytes.fromhex(self.net["mac"].replace(":", ""))
        self.dom = Domain.boot(DomainConfig(workload, workload, 32 << 20,
                                            args=args or [ip_number(GUEST_IP), opts], net=self.net, **kw))
        domains.append(self.dom)
        self.wire = Wire(self.tap)

    def start(self, pattern=r"^netecho start "):
        self.dom.resume()
        self.dom.console.wait_for(pattern, 20)
        return self

    def echo(self, payload: bytes, sport=40000, timeout=5.0) -> bytes:
        self.wire.send(eth(self.mac, 0x0800, ipv4(17, udp(payload, sport=sport))))
        [reply] = self.wire.expect(lambda f: is_udp_reply(f, sport), timeout)
        return reply

    def status(self) -> dict:
        reply = self.echo_port(b"", 10)
        return dict(item.split("=") for item in udp_payload(reply).decode().split())

    def echo_port(self, payload, port):
        self.wire.send(eth(self.mac, 0x0800, ipv4(17, udp(payload, dport=port, sport=40010))))
        return self.wire.expect(lambda f: is_udp_reply(f, 40010))[0]


# -- the guest's stack over the stub's NIC ------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("opts", [0, NO_CSUM | NAIVE], ids=["offload-suppressed", "plain-naive"])
def test_netecho_answers_arp_ping_and_udp(domains, opts):
    nic = Nic(domains, opts=opts).start()
    wire, mac = nic.wire, nic.mac
    request = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, PEER_MAC, socket.inet_aton(PEER_IP),
                          bytes(6), socket.inet_aton(GUEST_IP))
    wire.send(eth(b"\xff" * 6, 0x0806, request))
    [arp] = wire.expect(lambda f: f[12:14] == b"\x08\x06")
    assert arp[:6] == PEER_MAC and arp[6:12] == mac and arp[20:22] == b"\x00\x02"
    assert arp[22:28] == mac and arp[28:32] == socket.inet_aton(GUEST_IP)

    wire.send(eth(mac, 0x0800, ipv4(1, icmp_echo(0x4242, 7, b"ping payload" * 5))))
    [pong] = wire.expect(lambda f: f[12:14] == b"\x08\x00" and f[23] == 1)
    assert pong[34] == 0 and pong[38:42] == struct.pack("!HH", 0x4242, 7)
    assert pong[42:] == b"ping payload" * 5 and csum(pong[34:]) == 0xFFFF and csum(pong[14:34]) == 0xFFFF

    for size in (1, 1472, 8972):            # up to a 9000-byte MTU's largest datagram
        payload = os.urandom(size)
        reply = nic.echo(payload)
        assert udp_payload(reply) == payload and reply[26:30] == socket.inet_aton(GUEST_IP)
        field = struct.unpack_from("!H", reply, 40)[0]
        if opts & NO_CSUM:                  # the guest summed it: the datagram checks
            assert csum(pseudo(GUEST_IP, PEER_IP, 8 + size) + reply[34:]) == 0xFFFF
        else:                               # offloaded: the pseudo-header sum, the rest for the host
            assert field == csum(pseudo(GUEST_IP, PEER_IP, 8 + size))
    wire.send(eth(mac, 0x0800, ipv4(17, udp(b"corrupt", bad_sum=True))))
    assert wire.quiet(lambda f: is_udp_reply(f), 0.5)       # a bad checksum is dropped
    status = nic.status()
    assert int(status["bad"]) == 1 and int(status["echo"]) == 3 and int(status["icmp"]) == 1
    features = int(nic.dom.console.wait_for(r"^netecho net .* features=([0-9a-f]+)$", 5).group(1), 16)
    assert bool(features & 0b11) != bool(opts & NO_CSUM) and bool(features & (1 << 29)) != bool(opts & NO_EVENT_IDX)


@pytest.mark.kvm
def test_fewer_exits_per_packet_with_suppression_and_batching(domains):
    """A burst of echoes, then echoes one at a time: the suppressing, batching driver makes
    far fewer guest exits per packet in a burst, and one notification per echo (for its
    reply: the device asks for none when receive buffers come back) where a driver that
    notifies every time makes two and takes an interrupt."""
    per_packet, per_echo = {}, {}
    for name, opts in (("suppressed", 0), ("naive", NAIVE)):
        nic = Nic(domains, opts=opts).start()
        nic.echo(b"warm")
        n, before = 64, nic.dom.vcpu.exits
        for i in range(n):
            nic.wire.send(eth(nic.mac, 0x0800, ipv4(17, udp(struct.pack("!I", i) * 16, sport=41000 + i))))
        nic.wire.expect(lambda f: f[6:12] == nic.mac and f[12:14] == b"\x08\x00" and f[23] == 17, count=n)
        time.sleep(0.2)
        per_packet[name] = (nic.dom.vcpu.exits - before) / n
        kicks = int(nic.status()["kicks"])
        for i in range(n):
            nic.echo(b"one at a time %d" % i, sport=44000 + i)
        per_echo[name] = (int(nic.status()["kicks"]) - kicks - 1) / n     # less the status reply's
        nic.dom.destroy()
    assert per_packet["naive"] >= 2.0, per_packet       # notify RX and TX, and an interrupt
    assert per_packet["suppressed"] < per_packet["naive"] / 10, per_packet
    assert per_echo["suppressed"] <= 1.05 and per_echo["naive"] >= 2.0, per_echo


@pytest.mark.kvm
def test_packets_wait_while_paused(domains):
    nic = Nic(domains).start()
    nic.echo(b"before")
    nic.dom.pause()
    taken = nic.dom.stub.net.stats["rx_packets"]
    for i in range(5):
        nic.wire.send(eth(nic.mac, 0x0800, ipv4(17, udp(b"held %d" % i, sport=42000 + i))))
    assert nic.wire.quiet(lambda f: f[23:24] == b"\x11", 0.5)
    assert nic.dom.stub.net.stats["rx_packets"] == taken      # no NET_RX while paused
    nic.dom.resume()
    replies = nic.wire.expect(lambda f: f[23:24] == b"\x11", count=5)
    assert sorted(udp_payload(f) for f in replies) == [b"held %d" % i for i in range(5)]


@pytest.mark.kvm
def test_received_packets_show_only_in_the_merged_dirty_log(domains):
    """The receive used ring is written only by the device (the stub, through its window,
    from the receive thread): KVM logs it in the stub VM, not the guest VM."""
    nic = Nic(domains).start()
    nic.echo(b"warm")
    nic.dom.pause()
    fields = next(r for r in nic.dom.capture().stub.devices if r["device"] == "virtio-net")["fields"]
    used_pfn = fields["rx_used"] // 4096
    nic.dom.set_dirty_logging(True)
    nic.dom.fetch_dirty()
    for merged in (True, False):
        nic.dom.resume()
        nic.echo(b"logged")
        nic.dom.pause()
        if merged:
            dirty = nic.dom.fetch_dirty()
        else:
            dirty = nic.dom.vm.get_dirty_log(0)
            assert used_pfn in nic.dom.stub.fetch_window_dirty()
        assert (used_pfn in dirty) is merged


@pytest.mark.kvm
@pytest.mark.parametrize("fresh_stub", [False, True], ids=["stub-image", "fresh-stub"])
def test_save_and_restore_keep_the_nic_and_announce_it(domains, tmp_path, fresh_stub):
    nic = Nic(domains).start()
    for i in range(3):
        nic.echo(b"before %d" % i)
    path = tmp_path / "net.hvm"
    nic.dom.pause()
    state = nic.dom.capture()
    save_to_file(nic.dom, path)
    nic.dom.destroy()
    nic.wire.close()
    [record] = [r for r in state.stub.devices if r["device"] == "virtio-net"]
    assert (record["version"], record["min_version"]) == (1, 1)
    assert record["fields"]["mac"] == nic.mac and record["fields"]["rx_used_idx"] >= 3
    from migrate.engine import compat       # the stream says which interface of which boot it was
    net_id = compat.read_head(path).config.config["net_id"]
    assert net_id["boot_id"] == compat.boot_id() and isinstance(net_id["ifindex"], int)

    dom, _ = restore(file_chunks(path), fresh_stub=fresh_stub)
    domains.append(dom)
    wire = Wire(nic.tap)                    # the same TAP device name, made anew
    dom.resume()
    rarp = wire.expect(lambda f: f[12:14] == b"\x80\x35", timeout=2, count=3)
    assert all(f[:6] == b"\xff" * 6 and f[6:12] == nic.mac and f[22:28] == nic.mac for f in rarp)
    nic.dom, nic.wire = dom, wire
    assert udp_payload(nic.echo(b"after")) == b"after"
    assert int(nic.status()["echo"]) == 4   # its counters came along


@pytest.mark.kvm
def test_ledger_journal_and_console_beside_the_nic(domains, tmp_path):
    """One guest using all three devices: the ledger keeps its disk journal and echoes
    console input while it answers UDP between its pages."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 << 20))
    nic = Nic(domains, "ledger", args=[5, 256, ip_number(GUEST_IP)], disk=str(disk))
    nic.start(r"^ledger net ip=10\.0\.0\.2 ")
    nic.dom.console.wait_for(r"^ledger ok gen=2 .* journal=ok$", 30)
    for i in range(20):
        payload = os.urandom(100 + i * 50)
        assert udp_payload(nic.echo(payload, sport=43000 + i)) == payload
    nic.dom.send_input(b"still here\n")
    nic.dom.console.wait_for(r"^ledger input: still here$", 20)
    start = nic.dom.console.next_index
    nic.dom.console.wait_for(r"^ledger ok gen=\d+ .* journal=ok$", 30, start=start)
    assert not any("CORRUPT" in ln or "JOURNAL BAD" in ln for ln in nic.dom.console.lines())


# -- hostile traffic --------------------------------------------------------------------------

def mmio(stub, offset, value=None, size=4):
    if value is None:
        result, data, _ = stub.request(abi.TYPE_MMIO, abi.NET_BASE + offset, size, abi.DIR_READ)
        assert result == 0
        return data
    assert stub.request(abi.TYPE_MMIO, abi.NET_BASE + offset, size, abi.DIR_WRITE, value)[0] == 0


class Driver:
    """The test as a virtio-net driver: rings at fixed guest addresses of an idle guest."""
    RX, TX = (0x500000, 0x501000, 0x502000), (0x510000, 0x511000, 0x512000)

    def __init__(self, nic):
        self.stub, self.mem = nic.dom.stub, nic.dom.memory

    def setup(self, features=(1 << 32) | (1 << 5)):
        stub = self.stub
        mmio(stub, 0x070, 0)
        mmio(stub, 0x070, 3)
        mmio(stub, 0x024, 0)
        mmio(stub, 0x020, features & 0xFFFFFFFF)
        mmio(stub, 0x024, 1)
        mmio(stub, 0x020, features >> 32)
        mmio(stub, 0x070, 11)
        for sel, rings in ((0, self.RX), (1, self.TX)):
            mmio(stub, 0x030, sel)
            mmio(stub, 0x038, 8)
            for off, addr in zip((0x080, 0x090, 0x0A0), rings):
                mmio(stub, off, addr)
                mmio(stub, off + 4, 0)
                self.mem[addr:addr + 4096] = bytes(4096)
            mmio(stub, 0x044, 1)
        mmio(stub, 0x070, 15)

    def post(self, queue, descs):
        desc, avail, _ = self.RX if queue == 0 else self.TX
        for i, (addr, length, flags, nxt) in enumerate(descs):
            struct.pack_into("<QIHH", self.mem, desc + 16 * i, addr, length, flags, nxt)
        idx = struct.unpack_from("<H", self.mem, avail + 2)[0]
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (idx % 8), 0)
        struct.pack_into("<H", self.mem, avail + 2, idx + 1)

    def used(self, queue):
        return struct.unpack_from("<H", self.mem, (self.RX if queue == 0 else self.TX)[2] + 2)[0]


@pytest.mark.kvm
def test_bad_descriptor_chains_fail_the_nic_not_the_host(domains):
    nic = Nic(domains, "idle", args=[0] * 8)       # idle never touches its NIC
    nic.dom.stub.net.resume_rx()
    drv, stub = Driver(nic), nic.dom.stub
    buf = 0x520000
    frame = bytes(12) + eth(b"\xff" * 6, 0x0800, bytes(50))
    nic.dom.memory[buf:buf + len(frame)] = frame
    good = [(buf, len(frame), 0, 0)]
    drv.setup()
    drv.post(1, good)
    mmio(stub, 0x050, 1)
    assert drv.used(1) == 1 and mmio(stub, 0x070) & 0x40 == 0
    nic.wire.expect(lambda f: f == frame[12:])                   # it went out
    assert stub.net.stats["tx_packets"] == 1

    bad_tx = {
        "loop": [(buf, 20, 1, 1), (buf, 20, 1, 0)],
        "outside RAM": [(64 << 20, 100, 0, 0)],
        "huge length": [(buf, 0xFFFFFFFF, 0, 0)],
        "next out of range": [(buf, 20, 1, 9)],
        "indirect": [(buf, 16, 4, 0)],
        "device-writable": [(buf, len(frame), 2, 0)],
    }
    for name, chain in bad_tx.items():
        drv.setup()
        drv.post(1, chain)
        mmio(stub, 0x050, 1)
        assert mmio(stub, 0x070) & 0x40, f"{name}: no NEEDS_RESET"
        assert mmio(stub, 0x060) & 2, name                  # the configuration-change interrupt
        assert "stub: virtio-net: bad transmit" in stub.log_lines[-1] or "outside" in stub.log_lines[-1], name
        assert stub.log_lines[-1].endswith("device needs reset"), name
    # a packet too long or with a header this device did not offer is dropped, not fatal
    for name, chain, header in (("too long", [(buf, 0x2401, 0, 0)], b""),
                                ("gso", [(buf, len(frame), 0, 0)], b"\x00\x01")):
        drv.setup()
        nic.dom.memory[buf:buf + 2] = header or b"\0\0"
        drv.post(1, chain)
        mmio(stub, 0x050, 1)
        assert mmio(stub, 0x070) & 0x40 == 0 and drv.used(1) == 1, name
    nic.dom.memory[buf:buf + 2] = b"\0\0"
    assert stub.net.stats["tx_packets"] == 1

    # receive: a chain the device may not write fails it when a packet arrives
    drv.setup()
    drv.post(0, [(buf, 4096, 0, 0)])                # not device-writable
    nic.wire.send(eth(nic.mac, 0x0800, bytes(60)))
    deadline = time.monotonic() + 5
    while not mmio(stub, 0x070) & 0x40:
        assert time.monotonic() < deadline, "receive did not fail the device"
        time.sleep(0.05)
    # NET_RX with slots out of range is refused; the stub goes on serving
    for first, count in ((64, 1), (0, 0), (0, 65), (1 << 40, 1)):
        assert stub.request(abi.TYPE_NET_RX, first, 1, abi.DIR_WRITE, 0, count)[0] == 1, (first, count)
    drv.setup()
    drv.post(1, good)
    mmio(stub, 0x050, 1)
    nic.wire.expect(lambda f: f == frame[12:])
    nic.dom.resume()                                # and the guest was never harmed
    nic.dom.console.wait_for(r"^idle ticks=100$", 10)


@pytest.mark.kvm
def test_nic_state_records_are_checked(domains):
    nic = Nic(domains, "idle", args=[0] * 8)
    stub = nic.dom.stub
    good = stub.save_devices()
    [net] = [r for r in good if r["device"] == "virtio-net"]

    def with_fields(**changes):
        return [dict(r, fields={**r["fields"], **changes}) if r is net else r for r in good]
    refused = {
        "another MAC": with_fields(mac=b"\x02" * 6),
        "another MTU": with_fields(mtu=1500),
        "queue size not a power of two": with_fields(rx_num=12),
        "ready without a size": with_fields(tx_ready=1, tx_num=0),
        "a request in flight": with_fields(rx_last_avail=5, rx_used_idx=4),
        "a feature never offered": with_fields(driver_features=1 << 2),
        "too wide": with_fields(status=1 << 40),
        "missing": [r for r in good if r is not net],
        "twice": good + [net],
    }
    for name, records in refused.items():
        with pytest.raises(Exception, match="refused"):
            stub.load_devices(records)
    missing_field = with_fields()
    del next(r for r in missing_field if r["device"] == "virtio-net")["fields"]["tx_used"]
    with pytest.raises(Exception, match="refused"):
        stub.load_devices(missing_field)
    stub.load_devices(good)
    assert stub.save_devices() == good
    # a stub without a NIC refuses a NIC's record
    plain = Domain.boot(DomainConfig("plain", "idle", 16 << 20))
    domains.append(plain)
    with pytest.raises(Exception, match="refused"):
        plain.stub.load_devices(plain.stub.save_devices() + [net])


# -- configuration, without KVM ------------------------------------------------------------------

def test_net_config_parsing_and_checks():
    net = parse_net("bridge=br0,mtu=9000")
    assert net["link"] == "bridge" and net["name"] == "br0" and net["mtu"] == 9000
    assert net["mac"].startswith("52:54:00:")
    assert parse_net("tap=tap7,mac=02:AA:bb:cc:dd:ee")["mac"] == "02:aa:bb:cc:dd:ee"
    for text, error in (("bogus", "not KEY=VALUE"), ("tap=a,bridge=b", "once"), ("mtu=1500", "say tap"),
                        ("tap=x,mtu=9001", "out of range"), ("tap=x,mtu=big", "number"),
                        ("tap=a/b", "interface name"), ("tap=" + "x" * 16, "interface name"),
                        ("tap=x,mac=01:00:00:00:00:01", "unicast"), ("tap=x,mac=zz", "six hex"),
                        ("tap=x,speed=10", "unknown key")):
        with pytest.raises(NetError, match=error):
            parse_net(text)
    for bad in (None, {}, dict(net, link="wifi"), dict(net, mtu=True), dict(net, extra=1), dict(net, name="%d")):
        with pytest.raises(NetError):
            check_net(bad)
    with pytest.raises(DomainError, match="needs the device-model stub"):
        DomainConfig("n", "netecho", 32 << 20, stub=False, net=net).validate()


def test_domain_config_net_from_a_stream_is_checked():
    base = {"name": "n", "workload": "netecho", "memory": 32 << 20, "args": [0] * 8, "timer_hz": 100,
            "stub": True, "disk": None}
    net = parse_net("tap=t0")
    assert config_from_record(ConfigRecord({**base, "net": net})).net == net
    assert config_from_record(ConfigRecord(base)).net is None          # a stream from before NICs
    for bad, error in (("tap0", "must be a map"), ({"link": "tap"}, "refused"),
                       (dict(net, name="../x"), "refused"), (dict(net, mtu=10), "refused")):
        with pytest.raises(RestoreError, match=error):
            config_from_record(ConfigRecord({**base, "net": bad}))


def test_hello_nic_needs_a_net_map(tmp_path):
    server = object.__new__(destination.RelocationServer)
    server.config = destination.ServeConfig("127.0.0.1", 0, None, net_map=destination.parse_net_map(["brA=lo", "t1=t9"]))
    hello = {"name": "g", "stub": True}
    assert server.check_net(dict(hello, net=None)) is None
    assert server.check_net(dict(hello, net={"link": "tap", "name": "t1"})) == "t9"
    for net, error in (({"link": "tap", "name": "t2"}, "maps none: start hvm host serve with --net-map t2=DST"),
                       ({"link": "bridge", "name": "brA"}, "there is no bridge lo"),
                       ({"link": "wifi", "name": "t1"}, "nil or a map"), ("t1", "nil or a map"),
                       ({"link": "tap", "name": "a b"}, "interface name")):
        with pytest.raises(destination.Refused, match=error):
            server.check_net(dict(hello, net=net))
    with pytest.raises(ValueError, match="SRC=DST"):
        destination.parse_net_map(["brA"])
    with pytest.raises(ValueError, match="interface name"):
        destination.parse_net_map(["brA=x/y"])


def test_rarp_frame_is_what_qemu_announces():
    mac = bytes.fromhex("525400123456")
    frame = rarp_frame(mac)[abi.NET_HDR_SIZE:]
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03"      # reverse request
    assert frame[22:28] == mac and frame[32:38] == mac


def test_cli_net_options():
    res = CliRunner().invoke(hvm, ["create", "-w", "netecho", "-n", "x", "--net", "bogus"])
    assert res.exit_code == 2 and "not KEY=VALUE" in res.output
    res = CliRunner().invoke(hvm, ["create", "-w", "netecho", "-n", "x", "--no-stub", "--net", "tap=t0"])
    assert res.exit_code == 2 and "a NIC needs the device-model stub" in res.output      # a usage error
    res = CliRunner().invoke(hvm, ["host", "serve", "--insecure", "--listen", "127.0.0.1:1", "--net-map", "x"])
    assert res.exit_code == 2 and "SRC=DST" in res.output


@pytest.mark.kvm
def test_restore_maps_the_nic_with_net_map(state_dir, tmp_path):
    """hvm restore --net-map SRC=DST attaches the saved NIC to DST here (a stream names
    interfaces of the host that saved it); a map entry the stream does not use is refused
    in one line before anything starts, and hvm stream check says the same."""
    from test_relocation import wait_console
    need_tap()
    base = f"hvt{os.getpid() % 100000}m"
    net = parse_net(f"tap={base}a")
    mac = bytes.fromhex(net["mac"].replace(":", ""))
    control.create_domain(DomainConfig("nm", "netecho", 32 << 20, args=[ip_number(GUEST_IP), 0], net=net))
    path = tmp_path / "nm.hvm"
    try:
        wait_console("nm", state_dir, r"^netecho start ")
        run = CliRunner().invoke
        assert run(hvm, ["save", "nm", str(path)]).exit_code == 0
        res = run(hvm, ["restore", str(path), "--net-map", f"{base}x={base}b"])
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert f"--net-map {base}x: the stream's NIC is on tap {base}a" in res.output
        assert control.list_domains() == []
        res = run(hvm, ["stream", "check", str(path), "--net-map", f"{base}a={base}b", "--json"])
        assert res.exit_code == 0 and json.loads(res.output)["net_here"] == f"{base}b", res.output

        res = run(hvm, ["restore", str(path), "--net-map", f"{base}a={base}b"])
        assert res.exit_code == 0, res.output
        wire = Wire(f"{base}b")          # the restored NIC answers there
        try:
            frame = eth(mac, 0x0800, ipv4(17, udp(b"mapped", sport=40000)))
            wire.send(frame)
            [reply] = wire.expect(lambda f: is_udp_reply(f, 40000), 5)
            assert udp_payload(reply) == b"mapped"
        finally:
            wire.close()
        assert not os.path.exists(f"/sys/class/net/{base}a")
    finally:
        try:
            control.destroy_domain("nm")
        except control.ControlError:
            pass
