"""The host network back end: a TAP device behind the stub's virtio-net device
(specs/ioreq.md, "Net ring" and "Receiving packets").

Transmit is synchronous, like the block ring: the stub copies the guest's
packets into the ring's TX slots and makes the NET_TX hypercall, and the host
writes them to the TAP device before the stub runs on. Receive is not: packets
arrive while the guest runs. A thread per NIC reads them from the TAP device
into the ring's RX slots (which belong to the host until it posts them), then
takes the stub's lock (the one every ioreq is made under, guest exits included)
and posts a NET_RX ioreq; the stub copies what fits into the guest's receive
buffers and raises the guest's interrupt if the driver wants one. Packets the
guest has no buffers for stay in their slots (and the rest in the TAP device's
queue) until the stub says, with the NET_RXBUF hypercall, that the driver has
added buffers. While the domain is paused no NET_RX is posted.

The config of a NIC is plain data (it travels in DOMAIN_CONFIG):
``{"link": "tap" | "bridge", "name": str, "mac": "52:54:00:12:34:56", "mtu": int}``:
``tap``: the TAP device NAME (an existing one is attached, else one is made for the
domain); ``bridge``: a new TAP device made for the domain and added to bridge NAME.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time

from ..config import (  # noqa: F401  (the NIC's configuration, re-exported)
    LINKS, MTU_DEFAULT, MTU_MAX, MTU_MIN, NetError, check_ifname, check_net, parse_net, random_mac,
)
from . import abi

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM = 0x01
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU = 0x8913, 0x8914, 0x8922
SIOCGIFINDEX, SIOCBRADDIF, SIOCSIFHWADDR = 0x8933, 0x89A2, 0x8924
IFF_UP = 0x1
IFREQ = struct.Struct("16sH22x")            # name, flags (or the first half of an int)
IFREQ_INT = struct.Struct("16si20x")        # name, an int (index, MTU)
IFREQ_HWADDR = struct.Struct("16sH6s16x")   # name, sa_family (ARPHRD_ETHER), address

STARVED_RETRY = 1.0         # seconds before held packets are offered again without NET_RXBUF
ANNOUNCE_DELAYS = (0.0, 0.05, 0.15, 0.25, 0.35)     # at once, then QEMU's announce-self steps


def mac_bytes(mac: str) -> bytes:
    return bytes(int(b, 16) for b in mac.split(":"))


# -- the TAP device ------------------------------------------------------------------

def _ifreq(name: str) -> bytes:
    return name.encode().ljust(16, b"\0")


def _sock_ioctl(request: int, arg: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, arg)


def open_tap(net: dict) -> tuple[int, str]:
    """Open (or make) the NIC's TAP device with virtio-net headers, up, with the NIC's
    MTU, on its bridge for ``bridge``. Returns (fd, interface name); NetError if not."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise NetError(f"cannot open {TUN_DEVICE}: {exc.strerror} (TAP devices need root)") from None
    want = net["name"] if net["link"] == "tap" else "hvm%d"
    try:
        try:
            reply = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(_ifreq(want), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as exc:
            raise NetError(f"cannot attach TAP device {want}: {exc.strerror}") from None
        name = IFREQ.unpack(reply)[0].rstrip(b"\0").decode()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", abi.NET_HDR_SIZE))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        _sock_ioctl(SIOCSIFMTU, IFREQ_INT.pack(_ifreq(name), net["mtu"]))
        if net["link"] == "bridge":
            # fe:... like libvirt: the highest address on the bridge never becomes the bridge's
            # own, so the bridge keeps its address when this device goes away
            own = b"\xfe" + mac_bytes(net["mac"])[1:]
            _sock_ioctl(SIOCSIFHWADDR, IFREQ_HWADDR.pack(_ifreq(name), 1, own))
            index = IFREQ_INT.unpack(_sock_ioctl(SIOCGIFINDEX, IFREQ_INT.pack(_ifreq(name), 0)))[1]
            try:
                _sock_ioctl(SIOCBRADDIF, IFREQ_INT.pack(_ifreq(net["name"]), index))
            except OSError as exc:
                raise NetError(f"cannot add {name} to bridge {net['name']}: {exc.strerror}") from None
        flags = IFREQ.unpack(_sock_ioctl(SIOCGIFFLAGS, IFREQ.pack(_ifreq(name), 0)))[1]
        _sock_ioctl(SIOCSIFFLAGS, IFREQ.pack(_ifreq(name), flags | IFF_UP))
    except NetError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise NetError(f"cannot set up TAP device {want}: {exc.strerror}") from None
    return fd, name


def rarp_frame(mac: bytes) -> bytes:
    """A RARP request from ``mac`` for itself, broadcast (what QEMU's announce-self sends),
    behind an empty virtio-net header."""
    rarp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    frame = b"\xff" * 6 + mac + struct.pack("!H", 0x8035) + rarp
    return bytes(abi.NET_HDR_SIZE) + frame.ljust(60, b"\0")


class NetBackend:
    """The TAP device of one NIC and the thread that receives from it. ``post_rx(first,
    count)`` posts a NET_RX ioreq under the stub's lock and returns the packets taken, or
    None if the stub cannot take any now (the domain is paused: the thread checks
    ``rx_enabled`` under that lock); ``mem`` is the stub's RAM."""

    def __init__(self, net: dict, name: str):
        check_net(net)
        self.net = net
        self.name = name
        self.mac = mac_bytes(net["mac"])
        self.fd, self.ifname = open_tap(net)
        self.mem = None
        self.post_rx = None
        self.lock = None
        self.rx_enabled = False         # set and read under the stub's lock
        self.rx_batch = abi.NET_SLOTS   # most packets per NET_RX (benchmarks lower it)
        self._first, self._held = 0, 0  # RX slots holding packets not yet taken
        self._starved = False           # the guest took none: wait for NET_RXBUF
        self._offload = 0
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._fd_lock = threading.Lock()    # the announce thread's writes against close()
        self.stats = {"rx_packets": 0, "rx_batches": 0, "rx_bytes": 0, "rx_wanted": 0,
                      "tx_packets": 0, "tx_kicks": 0, "tx_bytes": 0, "tx_errors": 0,
                      "announces": 0, "rx_seconds": 0.0}
        self._tx_error_logged = False

    def start(self, mem, post_rx, lock) -> None:
        """Begin receiving (still gated by ``rx_enabled``) for a stub whose RAM is ``mem``."""
        self.mem, self.post_rx, self.lock = mem, post_rx, lock
        if self._thread is None:
            self._thread = threading.Thread(target=self._receive, daemon=True, name=f"netrx-{self.name}")
            self._thread.start()

    def stop(self) -> None:
        """Receive no more (the receive thread ends at its next turn); close() follows."""
        self._closed = True
        self._wake()

    def close(self) -> None:
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._fd_lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def running(self) -> bool:
        """Whether its receive thread is still alive (after close: it did not end in time)."""
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, OSError):
            pass

    # -- pause gating (called with the domain's vCPU stopped or about to run) --------
    def pause_rx(self) -> None:
        """No NET_RX after this returns (the caller holds no stub lock)."""
        with self.lock:
            self.rx_enabled = False

    def resume_rx(self) -> None:
        with self.lock:
            self.rx_enabled = True
        self._wake()

    # -- hypercalls (in the thread running the stub, under its lock) -------------------
    def serve_tx(self, mem) -> None:
        """NET_TX: write the TX slots the stub filled to the TAP device."""
        count = struct.unpack_from("<I", mem, abi.NET_RING)[0]
        if count > abi.NET_SLOTS:
            log.error("%s: net ring: stub says %d TX packets, there are %d slots: ignored",
                      self.name, count, abi.NET_SLOTS)
            return
        lens = abi.NET_LENS.unpack_from(mem, abi.NET_TX_LEN)
        view = memoryview(mem)
        try:
            for i in range(count):
                n = lens[i]
                if not abi.NET_HDR_SIZE + 14 <= n <= abi.NET_SLOT_SIZE:
                    self.stats["tx_errors"] += 1
                    continue
                at = abi.NET_TX + i * abi.NET_SLOT_SIZE
                try:
                    os.write(self.fd, view[at:at + n])
                except OSError as exc:      # EIO (link down), EAGAIN: the wire drops it
                    self.stats["tx_errors"] += 1
                    if not self._tx_error_logged:
                        self._tx_error_logged = True
                        log.warning("%s: writing to %s failed: %s", self.name, self.ifname, exc.strerror)
                    continue
                self.stats["tx_packets"] += 1
                self.stats["tx_bytes"] += n - abi.NET_HDR_SIZE
        finally:
            view.release()
        self.stats["tx_kicks"] += 1

    def rx_wanted(self) -> None:
        """NET_RXBUF: the driver added receive buffers; post the held packets again."""
        self.stats["rx_wanted"] += 1
        self._starved = False
        self._wake()

    # -- the receive thread --------------------------------------------------------------
    def _receive(self) -> None:
        try:
            while not self._closed:
                self._wait()
                if self._closed:
                    return
                if self.rx_enabled and not self._starved:
                    self._fill()
                    if self._held:
                        self._post()
        except Exception:           # never silently: the NIC stops receiving, the guest goes on
            if self._closed:        # the domain is going: its stub was stopped under a request
                log.info("%s: the NIC's receive thread ended with its domain", self.name)
            else:
                log.exception("%s: the NIC's receive thread failed", self.name)

    def _wait(self) -> None:
        """Until there is something to do: packets to read (or held, once no longer
        starved), a wake-up (resume, NET_RXBUF, close)."""
        watch = [self._wake_r]
        if self.rx_enabled and not self._starved:
            if self._held:
                return
            watch.append(self.fd)
        readable, _, _ = select.select(watch, [], [], STARVED_RETRY)
        if not readable and self._starved:
            self._starved = False       # a wake-up lost somewhere must not stop the NIC for good
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _fill(self) -> None:
        """Read packets from the TAP device into free RX slots (the host's own: no lock)."""
        self._apply_offload()
        mem = self.mem
        lens = []
        room = min(self.rx_batch, abi.NET_SLOTS) - self._held
        while room > 0:
            slot = (self._first + self._held + len(lens)) % abi.NET_SLOTS
            at = abi.NET_RX + slot * abi.NET_SLOT_SIZE
            view = memoryview(mem)[at:at + abi.NET_SLOT_SIZE]
            try:
                n = os.readv(self.fd, [view])
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADFD or self._closed:
                    return
                raise
            finally:
                view.release()
            struct.pack_into("<I", mem, abi.NET_RX_LEN + 4 * slot, n)
            lens.append(n)
            room -= 1
        self._held += len(lens)
        self.stats["rx_bytes"] += sum(lens) - abi.NET_HDR_SIZE * len(lens)

    def _post(self) -> None:
        t0 = time.perf_counter()
        with self.lock:
            if not self.rx_enabled:
                return
            taken = max(0, min(self.post_rx(self._first, self._held), self._held))
            # the stub found no buffers for the rest: it will say NET_RXBUF (rx_wanted, under
            # this lock too); set here, so that one said right after the lock went is not lost
            self._starved = taken < self._held
        self.stats["rx_seconds"] += time.perf_counter() - t0
        self.stats["rx_batches"] += 1
        self.stats["rx_packets"] += taken
        self._first = (self._first + taken) % abi.NET_SLOTS
        self._held -= taken

    def _apply_offload(self) -> None:
        """Partial checksums from the TAP device only while the driver takes them."""
        want = TUN_F_CSUM if struct.unpack_from("<I", self.mem, abi.NET_RING + 4)[0] == 1 else 0
        if want != self._offload:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, want)
            self._offload = want

    # -- announce ---------------------------------------------------------------------
    def announce(self) -> None:
        """Tell the network where the NIC is now (after a restore or a relocation): RARP
        frames from its MAC, five times at growing intervals, from a thread of its own."""
        def send() -> None:
            frame = rarp_frame(self.mac)
            for delay in ANNOUNCE_DELAYS:
                time.sleep(delay)
                with self._fd_lock:
                    if self._closed or self.fd < 0:
                        return
                    try:
                        os.write(self.fd, frame)
                        self.stats["announces"] += 1
                    except OSError as exc:
                        log.warning("%s: announce on %s failed: %s", self.name, self.ifname, exc.strerror)
        threading.Thread(target=send, daemon=True, name=f"announce-{self.name}").start()
