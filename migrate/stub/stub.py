"""The stub VM, host side: boots the device-model image, turns guest exits
into ioreqs (specs/ioreq.md), serves the stub's hypercalls (doorbell, IRQ
lines, block ring, net ring, console), and saves/loads its device state.

Every ioreq is made under ``Stub.lock``: each of the guest's vCPU threads makes them for
its own exits (the stub has one vCPU and one ioreq slot), and a NIC's receive thread
(migrate/stub/netback.py) for NET_RX while the guest runs."""
from __future__ import annotations

import functools
import hashlib
import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..capture import StateApply, StateCapture
from ..console import MAX_LINE
from ..text import Sparse
from ..guest import boot as gboot
from ..kvm import DirtyLog, KvmError, PlatformState, VcpuState
from ..stream.hvm import HvmBodies
from ..stream.records import DeviceBodies, Vm
from . import abi, devstate
from .blockback import BlockBackend
from .netback import NetBackend, NetError

log = logging.getLogger(__name__)

RAM_SLOT, WINDOW_SLOT = gboot.RAM_SLOT, 1     # the window: slots 1.., one per slot of guest RAM
ANSWER_TIMEOUT = 5.0            # seconds the stub may take for one ioreq (while this process runs)
WATCH_EVERY = 0.5               # seconds between two looks of its watchdog
STUB_LOG_LINES = 200
REFUSED_LOG_PERIOD = 1.0        # seconds between two lines about refused guest accesses


@functools.cache
def stub_image() -> bytes:
    """The stub image this process boots, read once."""
    return gboot.image_path("stub").read_bytes()


@functools.cache
def stub_build_id() -> str:
    """Identifies the stub image this host runs (of the very bytes it boots): a restore
    whose stream came from another build boots a fresh stub and loads the device state."""
    return hashlib.sha256(stub_image()).hexdigest()[:16]


class StubError(Exception):
    """The stub misbehaved or refused a request; the message says how."""


@dataclass
class StubState:
    """The stub's vCPU and platform state and its devices' records."""
    vcpus: list[VcpuState]
    platform: PlatformState
    devices: list[dict]


class Stub:
    def __init__(self, kvm, guest_vm, guest_ram, console, disk: str | None, name: str, cpu,
                 scale_tsc: bool = False, net: dict | None = None, direct_msrs: list[int] | None = None):
        self.guest_vm = guest_vm
        self.console = console
        self.name = name
        self.log_lines: deque[str] = deque(maxlen=STUB_LOG_LINES)
        self.logged = 0                 # lines the stub has logged in all
        self.failed = ""                # why the last request that failed unanswered failed
        self._log_partial = b""
        self.refused = 0                    # guest accesses the stub refused
        self._refusals = Sparse(REFUSED_LOG_PERIOD)    # their log lines
        self._seq = 0
        self._busy_since = 0.0
        self._watch_lock = threading.Lock()
        self._stopped = threading.Event()
        self.lock = threading.RLock()       # one ioreq (or capture) at a time, whatever the thread
        self.requests = 0
        self.cpu = cpu                  # the stub VM's CPU policy (migrate.cpu)
        self.hypercalls = 0
        self.backend = BlockBackend(disk) if disk else None
        self.net: NetBackend | None = None
        try:
            if net is not None:
                self.net = NetBackend(net, name)
            self.vm, self.ram, (self.vcpu,) = gboot.new_machine(
                kvm, [(0, abi.STUB_RAM)], f"stub-{name}", cpu, console_port=abi.PORT_CONSOLE,
                scale_tsc=scale_tsc)
            self.window = guest_ram.mirror(self.vm, abi.WINDOW_BASE, WINDOW_SLOT)
            # made now, not at the first capture or apply, which may be inside a downtime
            self._capture = StateCapture(Vm.STUB, self.vm, [self.vcpu], cpu.msr_indices)
            self.applier = StateApply(self.vm, [self.vcpu], direct_msrs)     # see StateApply
            self._encoder = devstate.Encoder()
        except NetError as exc:
            self.close()
            raise StubError(str(exc)) from None
        except BaseException:
            self.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name=f"stub-watch-{name}")
        self._watchdog.start()

    # -- lifecycle ------------------------------------------------------------
    def window_sizes(self) -> tuple[int, int]:
        """Bytes of guest RAM the window shows from guest address 0 and from 4 GiB."""
        low = sum(s.size for s in self.window.slots if s.guest_phys_addr < abi.WINDOW_BASE + gboot.HIGH_RAM_BASE)
        return low, self.window.size - low

    def boot(self) -> None:
        """Load the stub image and run it until it serves requests."""
        low, high = self.window_sizes()
        info = gboot.BootInfo(
            workload=gboot.WL_STUB, timer_hz=0, mem_size=abi.STUB_RAM,
            wl_base=abi.IOREQ_PAGE, wl_size=abi.STUB_RAM - abi.IOREQ_PAGE,
            tsc_khz=self.vcpu.get_tsc_khz(),
            args=[0, low, abi.VIRTIO_BASE, abi.VIRTIO_IRQ,
                  abi.NET_BASE if self.net else 0, abi.NET_IRQ if self.net else 0, high])
        top = max(s.guest_phys_addr + s.size for s in self.window.slots)
        with self.lock:
            gboot.boot_vcpus([self.vcpu], self.ram.mem, info, stub_image(), map_top=top)
            struct.pack_into("<Q", self.ram.mem, abi.BLK_RING + 8,
                             self.backend.capacity if self.backend else 0)
            if self.net:
                abi.NET_HEADER.pack_into(self.ram.mem, abi.NET_RING, 0, 0, self.net.mac, self.net.net["mtu"])
            self._run_until_doorbell()
        magic, version, nr_vcpus, ready = abi.PAGE_HEADER.unpack_from(self.ram.mem, abi.IOREQ_PAGE)
        if (magic, version, ready) != (abi.IOREQ_MAGIC, abi.IOREQ_VERSION, 1):
            raise StubError(f"stub did not come up (ioreq page magic {magic:#x} version {version})")
        self._start_net()

    def _start_net(self) -> None:
        if self.net is not None:
            self.net.start(self.ram.mem, self.net_rx, self.lock)

    def close(self) -> None:
        self._stopped.set()
        vm, net = getattr(self, "vm", None), getattr(self, "net", None)
        if net is not None:
            net.stop()              # first: its request the kick ends is then no failure
        if vm is not None:
            self.vcpu.kick()        # a request under way (a thread in KVM_RUN on it) ends now
        stuck = False
        if net is not None:
            net.close()             # its receive thread first: it makes ioreqs
            stuck = net.running()
            self.net = None
        if vm is not None:
            if stuck:               # unmapping its kvm_run page under it would crash the process
                log.error("%s: the stub's receive thread did not end: its VM is left open", self.name)
            else:
                vm.close()
            self.vm = None
        if self.backend is not None:
            self.backend.close()

    # -- ioreqs ---------------------------------------------------------------
    def request(self, type_: int, addr: int = 0, size: int = 1, direction: int = abi.DIR_WRITE,
                data: int = 0, count: int = 1, payload: bytes | None = None) -> tuple[int, int, bytes]:
        """Post one ioreq, run the stub until it answers: (result, data, payload).

        ``payload`` (string I/O, console input) travels in the ioreq data
        page with data_is_ptr set; a read returns count*size bytes there.
        """
        with self.lock:
            return self._request(type_, addr, size, direction, data, count, payload)

    def _request(self, type_, addr, size, direction, data, count, payload) -> tuple[int, int, bytes]:
        mem = self.ram.mem
        if mem[abi.STATE_OFFSET] != abi.NONE:       # a request failed before it was answered
            raise StubError(f"ioreq slot busy (state {mem[abi.STATE_OFFSET]})"
                            + (f": a request failed before: {self.failed}" if self.failed else ""))
        is_ptr = payload is not None or (type_ == abi.TYPE_PIO and count > 1)
        if is_ptr:
            nbytes = len(payload) if payload is not None else size * count
            if nbytes > abi.IOREQ_DATA_SIZE:
                raise StubError(f"ioreq payload of {nbytes} bytes exceeds {abi.IOREQ_DATA_SIZE}")
            if payload is not None:
                mem[abi.IOREQ_DATA:abi.IOREQ_DATA + len(payload)] = payload
            data = abi.IOREQ_DATA
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        abi.IOREQ.pack_into(mem, abi.IOREQ_OFFSET, addr, data, count, size, direction, type_,
                            int(is_ptr), abi.NONE, 0, 0, self._seq, 0)
        mem[abi.STATE_OFFSET] = abi.READY           # last: hands the slot to the stub
        self.requests += 1
        try:
            self._run_until_doorbell()
            (_, out, _, _, _, _, _, state, result, _, _, done_seq) = abi.IOREQ.unpack_from(mem, abi.IOREQ_OFFSET)
            if state != abi.RESP_READY or done_seq != self._seq:
                raise StubError(f"stub rang the doorbell without answering (state {state}, seq {done_seq})")
        except Exception as exc:    # kept for the next request, which finds the slot busy: a
            # failure on another thread (the NIC's receive) is named there
            self.failed = str(exc) if isinstance(exc, StubError) else f"{type(exc).__name__}: {exc}"
            raise
        mem[abi.STATE_OFFSET] = abi.NONE
        self.failed = ""
        reply = b""
        if is_ptr and direction == abi.DIR_READ:
            reply = bytes(mem[abi.IOREQ_DATA:abi.IOREQ_DATA + size * count])
        return result, out, reply

    def _run_until_doorbell(self) -> None:
        with self._watch_lock:
            self._busy_since = time.monotonic()
        try:
            while True:
                ex = self.vcpu.run()
                if ex.reason == "console":
                    self.console.feed(ex.data)
                elif ex.reason == "io" and ex.is_write:
                    if ex.port == abi.PORT_DOORBELL:
                        return
                    self._hypercall(ex)
                elif ex.reason == "stopped":
                    raise StubError(f"stub did not answer within {ANSWER_TIMEOUT:g}s")
                else:
                    raise StubError(f"stub VM exit {ex.reason} (port {ex.port:#x}, "
                                    f"address {ex.address:#x}, detail {ex.detail:#x})")
        finally:
            with self._watch_lock:      # no watchdog kick can outlive this request
                self._busy_since = 0.0
                self.vcpu.unkick()

    def _hypercall(self, ex) -> None:
        self.hypercalls += 1
        if ex.port == abi.PORT_IRQ:
            value = int.from_bytes(ex.data[:4], "little")
            irq = value & 0x7FFFFFFF
            if irq not in (abi.UART_IRQ, abi.VIRTIO_IRQ) and not (irq == abi.NET_IRQ and self.net):
                raise StubError(f"stub asked for guest IRQ {irq}, which it does not own")
            self.guest_vm.irq_line(irq, value >> 31)
        elif ex.port in (abi.PORT_NET_TX, abi.PORT_NET_RXBUF):
            if self.net is None:
                raise StubError("stub used the net ring but the domain has no NIC")
            if ex.port == abi.PORT_NET_TX:
                self.net.serve_tx(self.ram.mem)
            else:
                self.net.rx_wanted()
        elif ex.port == abi.PORT_BLK:
            if self.backend is None:
                raise StubError("stub kicked the block ring but the domain has no disk")
            self.backend.serve(self.ram.mem)
        elif ex.port == 0xE9:
            self._stub_log(ex.data)
        else:
            raise StubError(f"stub wrote unknown hypercall port {ex.port:#x}")

    def _stub_log(self, data: bytes) -> None:
        *lines, partial = (self._log_partial + data).split(b"\n")
        cut = len(partial) - len(partial) % MAX_LINE      # a line that does not end is cut
        self._log_partial = partial[cut:]
        if cut:
            lines += [partial[at:at + MAX_LINE] for at in range(0, cut, MAX_LINE)]
        for line in lines:
            text = line.decode("utf-8", "replace")
            self.log_lines.append(text)
            self.logged += 1
            log.info("%s: %s", self.name, text)

    def _watch(self) -> None:
        last, seen, busy = time.monotonic(), 0.0, 0.0
        while not self._stopped.wait(WATCH_EVERY):
            now = time.monotonic()
            seen, busy = self._watch_step(now, now - last, seen, busy)
            last = now

    def _watch_step(self, now: float, step: float, seen: float, busy: float) -> tuple[float, float]:
        """One look of the watchdog, ``step`` seconds after its last one: how long the
        request in flight (``_busy_since``; the one seen last time: ``seen``) has been seen
        busy, and a kick of the stub's vCPU once that passes ANSWER_TIMEOUT. A look counts
        at most half of that, so a process that was stopped (SIGSTOP, a frozen host) does
        not find its stub overdue for the time nothing of it ran, while a watchdog that gets
        a core only now and then still kicks within about that time."""
        step = min(step, ANSWER_TIMEOUT / 2)
        with self._watch_lock:
            since = self._busy_since
            if since != seen:               # another request, or none: counted from its start
                seen, busy = since, (min(now - since, step) if since else 0.0)
            elif since:
                busy += step
            if since and busy > ANSWER_TIMEOUT and self.vm is not None:
                self.vcpu.kick()
        return seen, busy

    # -- guest exits ----------------------------------------------------------
    def port_io(self, ex) -> bytes | None:
        """Serve a guest port exit; returns the data for a read."""
        direction = abi.DIR_WRITE if ex.is_write else abi.DIR_READ
        if ex.count > 1:
            result, _, reply = self.request(abi.TYPE_PIO, ex.port, ex.size, direction, count=ex.count,
                                            payload=ex.data if ex.is_write else None)
        else:
            value = int.from_bytes(ex.data, "little") if ex.is_write else 0
            result, out, _ = self.request(abi.TYPE_PIO, ex.port, ex.size, direction, value)
            reply = out.to_bytes(8, "little")[:ex.size]
        if result != 0:
            self._refused(f"port {ex.port:#x} access", result)
            reply = b"\xff" * (ex.size * ex.count)
        return None if ex.is_write else reply

    def mmio(self, ex) -> bytes | None:
        direction = abi.DIR_WRITE if ex.is_write else abi.DIR_READ
        value = int.from_bytes(ex.data, "little") if ex.is_write else 0
        result, out, _ = self.request(abi.TYPE_MMIO, ex.address, ex.size, direction, value)
        if result != 0:
            self._refused(f"MMIO {ex.address:#x}", result)
            out = (1 << 64) - 1
        return None if ex.is_write else out.to_bytes(8, "little")[:ex.size]

    def _refused(self, what: str, result: int) -> None:
        """Log an access the stub refused: at most one line every REFUSED_LOG_PERIOD seconds,
        with the count of those not logged (a guest can refuse-loop at thousands a second)."""
        self.refused += 1
        if (due := self._refusals.due()) is not None:
            more = due[0]
            log.error("%s: stub refused %s: %s%s", self.name, what, abi.RESULTS.get(result),
                      f" ({more} more refused since the last line)" if more else "")

    def net_rx(self, first: int, count: int) -> int:
        """NET_RX: ``count`` packets in the RX slots from ``first``; how many it took."""
        result, taken, _ = self.request(abi.TYPE_NET_RX, first, 1, abi.DIR_WRITE, 0, count)
        if result != 0:
            raise StubError(f"stub refused received packets: {abi.RESULTS.get(result)}")
        return taken

    def input(self, data: bytes) -> int:
        """Offer console input to the UART; returns how many bytes it took."""
        result, taken, _ = self.request(abi.TYPE_INPUT, count=len(data), payload=data)
        if result != 0:
            raise StubError(f"stub refused console input: {abi.RESULTS.get(result)}")
        return min(taken, len(data))

    # -- device state -----------------------------------------------------------
    def save_devices(self) -> list[dict]:
        """The devices' state (SAVE), as plain records."""
        return self._save(devstate.parse)

    def warm_capture(self) -> None:
        """A SAVE and the encoding of its buffer as capture_records does them, the result
        dropped: what a capture soon will touch, faulted in (Domain.prepare_capture)."""
        self._save(self._encoder.bodies)

    def _save(self, decode):
        """SAVE, then ``decode(state buffer)`` (a DeviceStateError: the stub wrote it wrong)."""
        result, _, _ = self.request(abi.TYPE_SAVE)
        if result != 0:
            raise StubError(f"stub could not save device state: {abi.RESULTS.get(result)}")
        try:
            return decode(self.ram.view(abi.STATE_BUF, abi.STATE_SIZE))
        except devstate.DeviceStateError as exc:
            raise StubError(f"stub wrote malformed device state: {exc}") from None

    def load_devices(self, records: list[dict]) -> None:
        try:
            blob = devstate.build(records)
        except devstate.DeviceStateError as exc:
            raise StubError(f"device state cannot be loaded: {exc}") from None
        self.ram.mem[abi.STATE_BUF:abi.STATE_BUF + len(blob)] = blob
        before = self.logged
        result, _, _ = self.request(abi.TYPE_LOAD)
        if result != 0:         # why, in the stub's words: the lines it logged for this LOAD
            said = list(self.log_lines)[len(self.log_lines) - min(self.logged - before, len(self.log_lines)):]
            raise StubError(f"stub refused the device state: {abi.RESULTS.get(result)}"
                            + (f" ({'; '.join(said[-3:])})" if said else ""))

    def capture(self) -> StubState:
        with self.lock:
            devices = self._quiesce(devstate.parse)
            return StubState(vcpus=[VcpuState.capture(self.vcpu, self.cpu.msr_indices)],
                             platform=PlatformState.capture(self.vm), devices=devices)

    def capture_records(self) -> tuple[HvmBodies, DeviceBodies]:
        """The stub's HVM context records (captured in C: migrate/capture.py) and its
        DEVICE_STATE records' bodies (encoded in C: devstate.Encoder), as :meth:`capture`
        has them."""
        with self.lock:
            devices = self._quiesce(self._encoder.bodies)
            return self._capture.capture(), devices

    def _quiesce(self, decode):
        """The devices' state (SAVE, given as ``decode`` gives it), the doorbell exit
        completed before the vCPU's state is read, and its partial console line passed on."""
        devices = self._save(decode)
        self.vcpu.settle()
        partial = self.vcpu.take_console()
        if partial:
            self.console.feed(partial)
        return devices

    def apply(self, state: StubState) -> None:
        """Resume from the stub's memory image as it is (filled separately)."""
        self._check_image()
        state.platform.apply(self.vm)
        state.vcpus[0].apply(self.vcpu)
        self._start_net()

    def apply_records(self, platform: dict, vcpu: dict, msrs: dict[int, int] | None, pdptrs_valid: bool) -> None:
        """The KVM half of :meth:`apply`, from record bodies (by type: the platform's, the
        vCPU's) and the MSRs to set (None: from the VCPU_MSRS body as it is), in C
        (migrate/capture.py); :meth:`resume_image` is the other half, once every page is in.
        Reads no stub memory, so it may run while the last pages are on their way."""
        try:
            self.applier.apply_platform(platform)
            self.applier.apply_vcpu(0, vcpu, msrs, pdptrs_valid)
        except (KvmError, ValueError) as exc:
            raise StubError(f"applying the stub's state: {exc}") from None

    def resume_image(self) -> None:
        """The memory half of :meth:`apply`: the image (all of its pages in) fits this
        domain, and its NIC starts."""
        self._check_image()
        self._start_net()

    def _check_image(self) -> None:
        """The stub's memory image fits this domain: its disk, its NIC."""
        capacity = struct.unpack_from("<Q", self.ram.mem, abi.BLK_RING + 8)[0]
        here = self.backend.capacity if self.backend else 0
        if capacity != here:
            raise StubError(f"the stub image was saved with a disk of {capacity} sectors; "
                            f"the disk here has {here}")
        net_base = struct.unpack_from("<Q", self.ram.mem, gboot.BOOT_INFO_ADDR + 48 + 8 * 4)[0]
        if net_base != (abi.NET_BASE if self.net else 0):
            raise StubError("the stub image and this domain disagree on having a NIC")
        if self.net:
            _, _, mac, mtu = abi.NET_HEADER.unpack_from(self.ram.mem, abi.NET_RING)
            if (mac, mtu) != (self.net.mac, self.net.net["mtu"]):
                raise StubError(f"the stub image's NIC has MAC {mac.hex(':')} and MTU {mtu}; this "
                                f"domain's has {self.net.net['mac']} and {self.net.net['mtu']}")

    # -- memory and dirty logs ------------------------------------------------
    @property
    def memory(self) -> memoryview:
        return self.ram.low.view()

    def set_dirty_logging(self, enabled: bool) -> None:
        self.ram.set_dirty_logging(enabled)
        self.window.set_dirty_logging(enabled)

    def fetch_window_dirty(self) -> DirtyLog:
        """Guest pages the stub wrote through its window, as guest pfns (one bitmap per slot
        of guest RAM, like the guest's own log)."""
        return self.window.fetch_dirty()

    def fetch_ram_dirty(self) -> DirtyLog:
        return self.ram.fetch_dirty()
