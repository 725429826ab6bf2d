"""The device-model stub: console through the UART, input, the virtio disk,
DMA dirty tracking, and hostile traffic (bad ioreqs, bad descriptors, bad
device state), none of which may hurt the host."""
import struct
import time

import pytest

from migrate.domain import Domain, DomainConfig, DomainError
from migrate.guest.boot import PAGE_SIZE
from migrate.stub import abi

pytestmark = pytest.mark.kvm

VIRTIO = abi.VIRTIO_BASE


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(2 << 20))
    return path


def boot(domains, workload="idle", memory=32 << 20, **kw):
    dom = Domain.boot(DomainConfig(workload, workload, memory, **kw))
    domains.append(dom)
    return dom


def mmio(stub, offset, value=None, size=4):
    """Act as a guest driver: one MMIO access to the virtio registers."""
    if value is None:
        result, data, _ = stub.request(abi.TYPE_MMIO, VIRTIO + offset, size, abi.DIR_READ)
        assert result == 0
        return data
    result, _, _ = stub.request(abi.TYPE_MMIO, VIRTIO + offset, size, abi.DIR_WRITE, value)
    assert result == 0


def uart(stub, reg, value=None):
    if value is None:
        result, data, _ = stub.request(abi.TYPE_PIO, abi.UART_BASE + reg, 1, abi.DIR_READ)
        assert result == 0
        return data
    assert stub.request(abi.TYPE_PIO, abi.UART_BASE + reg, 1, abi.DIR_WRITE, value)[0] == 0


def test_console_goes_through_the_stub_uart(domains):
    dom = boot(domains)
    dom.resume()
    dom.console.wait_for(r"^idle ticks=100$", 10)
    assert dom.stub.requests > 10            # LSR polls and FIFO writes
    assert "stub: ready" in dom.stub.log_lines[0]


def test_domain_without_stub_uses_the_debug_port(domains):
    dom = boot(domains, stub=False)
    dom.resume()
    dom.console.wait_for(r"^idle ticks=100$", 10)
    assert dom.stub is None
    with pytest.raises(DomainError, match="no UART"):
        dom.send_input(b"x")


def test_typed_input_reaches_the_guest(domains):
    dom = boot(domains)
    dom.resume()
    dom.console.wait_for("idle start", 10)
    dom.send_input(b"first line\r")
    dom.console.wait_for(r"^idle input: first line$", 10)
    long = b"x" * 100 + b"\n"                # more than the 16-byte FIFO at once
    dom.send_input(long)
    dom.console.wait_for(r"^idle input: x{100}$", 10)


def test_input_while_paused_arrives_on_resume(domains):
    dom = boot(domains)
    dom.resume()
    dom.console.wait_for("idle start", 10)
    dom.pause()
    dom.send_input(b"later\n")
    time.sleep(0.3)
    assert not any("input" in ln for ln in dom.console.lines())
    dom.resume()
    dom.console.wait_for(r"^idle input: later$", 10)


def test_ledger_journal_on_the_virtio_disk(domains, disk):
    dom = boot(domains, "ledger", 32 << 20, args=[11, 512], disk=str(disk))
    dom.resume()
    dom.console.wait_for(r"ledger ok gen=40 .* journal=ok$", 30)
    dom.pause()
    blocks = disk.read_bytes()
    magic = struct.pack("<Q", 0x4C4E524A52474C48)
    seed = struct.pack("<Q", 11)
    for gen in range(0, 40):        # every generation's block is on the disk file
        block = blocks[512 * gen:512 * gen + 32]
        assert block[:16] == magic + seed and struct.unpack_from("<Q", block, 16)[0] == gen
    assert dom.stub.backend.requests >= 3 * 40


def test_dma_writes_show_only_in_the_merged_dirty_log(domains, disk):
    """The used ring is written only by the device (the stub, through its
    window onto guest RAM): KVM logs it in the stub VM, not the guest VM."""
    dom = boot(domains, "ledger", 32 << 20, args=[3, 64], disk=str(disk))
    dom.resume()
    dom.console.wait_for(r"ledger ok gen=2 ", 20)
    dom.pause()
    used_pfn = next(r for r in dom.capture().stub.devices if r["device"] == "virtio-blk")["fields"]["used"] // PAGE_SIZE
    dom.set_dirty_logging(True)
    dom.fetch_dirty()
    for merged in (True, False):
        dom.resume()
        start = dom.console.next_index
        dom.console.wait_for(r"ledger ok gen=\d+ ", 10, start=start)
        dom.pause()
        if merged:
            dirty = dom.fetch_dirty()
        else:                       # the guest VM's own log, as KVM keeps it
            dirty = dom.vm.get_dirty_log(0)
            assert used_pfn in dom.stub.fetch_window_dirty()
        assert (used_pfn in dirty) is merged, (merged, dirty)


def test_the_block_rings_answer_is_in_the_stub_dirty_log(domains, disk):
    """The host answers a block request by writing the ring's rsp_prod through its own
    mapping of stub RAM, which no dirty log sees. A pre-copy round that read the ring page
    while the host served a request sent it with that request still in flight; unless the
    page is logged again after the answer, the destination's stub resumes with it and the
    host serves it a second time there, over the bounce buffer of the guest's next request
    (a write that was answered OK lost). The stub writes the page after each answer."""
    dom = boot(domains, "idle", disk=str(disk))     # idle never touches the disk
    stub, mem = dom.stub, dom.memory
    desc, avail, used, hdr, data, status = 0x500000, 0x501000, 0x502000, 0x503000, 0x504000, 0x505000
    for off, value in ((0x070, 0), (0x070, 3), (0x024, 1), (0x020, 1), (0x070, 11), (0x030, 0), (0x038, 8),
                       (0x080, desc), (0x084, 0), (0x090, avail), (0x094, 0), (0x0A0, used), (0x0A4, 0),
                       (0x044, 1), (0x070, 15)):
        mmio(stub, off, value)
    mem[avail:avail + 4096] = bytes(4096)
    mem[used:used + 4096] = bytes(4096)
    ring_pfn = abi.BLK_RING // PAGE_SIZE
    stub.ram.set_dirty_logging(True)
    stub.fetch_ram_dirty()
    seen = {}
    serve_one = stub.backend._one

    def round_sweeps_now(*args):        # a pre-copy round: fetch (and clear), then read the page
        seen["dirty"] = ring_pfn in set(stub.fetch_ram_dirty().pfns())
        seen["ring"] = struct.unpack_from("<II", stub.ram.mem, abi.BLK_RING)
        return serve_one(*args)

    stub.backend._one = round_sweeps_now
    struct.pack_into("<IIQ", mem, hdr, 1, 0, 10)          # write sector 10
    mem[data:data + 512] = b"A" * 512
    for i, d in enumerate([(hdr, 16, 1, 1), (data, 512, 1, 2), (status, 1, 2, 0)]):
        struct.pack_into("<QIHH", mem, desc + 16 * i, *d)
    struct.pack_into("<H", mem, avail + 4, 0)
    struct.pack_into("<H", mem, avail + 2, 1)
    mmio(stub, 0x050, 0)                                  # QueueNotify
    stub.backend._one = serve_one
    assert mem[status] == 0 and disk.read_bytes()[10 * 512:11 * 512] == b"A" * 512
    req_prod, rsp_prod = seen["ring"]
    assert seen["dirty"] and req_prod == rsp_prod + 1     # what that round sent: the request in flight
    assert struct.unpack_from("<II", stub.ram.mem, abi.BLK_RING) == (req_prod, req_prod)
    assert ring_pfn in set(stub.fetch_ram_dirty().pfns()), "the answered ring is not sent again"


def test_bad_descriptor_chains_fail_the_device_not_the_host(domains, disk):
    dom = boot(domains, "idle", disk=str(disk))   # idle never touches the disk
    stub = dom.stub
    mem = dom.memory
    desc, avail, used = 0x500000, 0x501000, 0x502000

    def setup_queue():
        mmio(stub, 0x070, 0)
        mmio(stub, 0x070, 1 | 2)
        mmio(stub, 0x024, 1)
        mmio(stub, 0x020, 1)
        mmio(stub, 0x070, 1 | 2 | 8)
        mmio(stub, 0x030, 0)
        mmio(stub, 0x038, 8)
        for off, addr in ((0x080, desc), (0x090, avail), (0x0A0, used)):
            mmio(stub, off, addr)
            mmio(stub, off + 4, 0)
        mmio(stub, 0x044, 1)
        mmio(stub, 0x070, 1 | 2 | 8 | 4)
        mem[avail:avail + 4096] = bytes(4096)
        mem[used:used + 4096] = bytes(4096)

    def submit(descs):
        for i, (addr, length, flags, nxt) in enumerate(descs):
            struct.pack_into("<QIHH", mem, desc + 16 * i, addr, length, flags, nxt)
        idx = struct.unpack_from("<H", mem, avail + 2)[0]
        struct.pack_into("<H", mem, avail + 4 + 2 * (idx % 8), 0)
        struct.pack_into("<H", mem, avail + 2, idx + 1)
        mmio(stub, 0x050, 0)
        return mmio(stub, 0x070)

    hdr, data, status = 0x503000, 0x504000, 0x505000
    good = [(hdr, 16, 1, 1), (data, 512, 1 | 2, 2), (status, 1, 2, 0)]
    setup_queue()
    struct.pack_into("<IIQ", mem, hdr, 0, 0, 3)           # read sector 3
    assert submit(good) & 0x40 == 0 and mem[status] == 0

    bad_chains = {
        "loop": [(hdr, 16, 1, 1), (data, 512, 1 | 2, 0)],
        "outside RAM": [(hdr, 16, 1, 1), ((64 << 20), 512, 1 | 2, 2), (status, 1, 2, 0)],
        "next out of range": [(hdr, 16, 1, 9)],
        "indirect": [(hdr, 16, 4, 0)],
        "status not writable": [(hdr, 16, 1, 1), (data, 512, 1 | 2, 2), (status, 1, 0, 0)],
        "short header": [(hdr, 8, 1, 1), (status, 1, 2, 0)],
    }
    for name, chain in bad_chains.items():
        setup_queue()
        assert submit(chain) & 0x40, f"{name}: device did not flag NEEDS_RESET"
        assert mmio(stub, 0x060) & 2, name                 # config-change interrupt
        assert "needs reset" in stub.log_lines[-1], name
        assert submit(good) & 0x40                         # stays failed until reset
    setup_queue()                                          # reset brings it back
    assert submit(good) & 0x40 == 0 and mem[status] == 0
    # an unknown request type is a per-request failure, not a device failure
    struct.pack_into("<IIQ", mem, hdr, 77, 0, 0)
    assert submit(good) & 0x40 == 0 and mem[status] == 2   # VIRTIO_BLK_S_UNSUPP
    struct.pack_into("<IIQ", mem, hdr, 0, 0, 1 << 40)      # beyond the disk
    assert submit(good) & 0x40 == 0 and mem[status] == 1   # VIRTIO_BLK_S_IOERR
    # and the guest was never harmed: it still runs
    dom.resume()
    dom.console.wait_for(r"^idle ticks=100$", 10)


def test_malformed_ioreqs_are_refused(domains):
    dom = boot(domains)
    stub = dom.stub
    assert stub.request(9)[0] == 1                                   # unknown type
    assert stub.request(abi.TYPE_PIO, abi.UART_BASE, 3, abi.DIR_READ)[0] == 1   # size 3
    assert stub.request(abi.TYPE_PIO, 0x60, 1, abi.DIR_READ)[0] == 2   # not the stub's port
    assert stub.request(abi.TYPE_MMIO, 0x1000, 4, abi.DIR_READ)[0] == 2
    assert stub.request(abi.TYPE_PIO, abi.UART_BASE, 1, abi.DIR_READ, count=0)[0] == 1
    uart(stub, 7, 0x5A)                                               # still serving
    assert uart(stub, 7) == 0x5A


def test_uart_registers_behave_like_a_16550a(domains):
    dom = boot(domains)
    stub = dom.stub
    assert uart(stub, 5) & 0x60 == 0x60             # THRE and TEMT
    uart(stub, 4, 0x10 | 0x0B)                      # loopback
    for c in b"ping":
        uart(stub, 0, c)
    assert uart(stub, 5) & 1                        # data ready
    assert bytes(uart(stub, 0) for _ in range(4)) == b"ping"
    assert uart(stub, 5) & 1 == 0
    assert uart(stub, 6) >> 4 == 0x0B               # MSR mirrors MCR in loopback
    uart(stub, 4, 0x0B)
    uart(stub, 1, 0x02)                             # enable THRE interrupt
    assert uart(stub, 2) & 0x0F == 0x02             # IIR: THR empty
    assert uart(stub, 2) & 0x0F == 0x01             # reading IIR cleared it
    uart(stub, 3, 0x80)                             # DLAB: divisor latch
    uart(stub, 0, 3)
    assert uart(stub, 0) == 3
    uart(stub, 3, 0x03)


def test_device_state_refuses_bad_records(domains):
    dom = boot(domains)
    stub = dom.stub
    good = stub.save_devices()
    future = [dict(r, version=2, min_version=2) for r in good]
    with pytest.raises(Exception, match=r"refused the device state: .*\(stub: uart16550a: record version 2 "
                                        r"\(min 2\) not loadable by version 1\)$"):
        stub.load_devices(future)
    missing = [r for r in good if r["device"] != "virtio-blk"]
    with pytest.raises(Exception, match="refused") as info:
        stub.load_devices(missing)
    assert "uart16550a" not in str(info.value)      # not the line of the LOAD before
    bad_field = [dict(r, fields={**r["fields"], "ier": 4096}) if r["device"] == "uart16550a" else r
                 for r in good]
    with pytest.raises(Exception, match="refused"):
        stub.load_devices(bad_field)
    stub.ram.mem[abi.STATE_BUF:abi.STATE_BUF + 64] = b"\xff" * 64   # garbage in the buffer
    result, _, _ = stub.request(abi.TYPE_LOAD)
    assert result == 3
    stub.load_devices(good)                          # the good state still loads
    assert stub.save_devices() == good
    dom.resume()
    dom.console.wait_for(r"^idle ticks=100$", 10)


def test_stub_that_stops_answering_is_an_error_not_a_hang(domains, monkeypatch):
    from migrate.stub import stub as stub_mod
    monkeypatch.setattr(stub_mod, "ANSWER_TIMEOUT", 1.0)
    dom = boot(domains)
    stub = dom.stub
    # make the stub's request loop spin forever: it waits for READY, we never set it
    mem = stub.ram.mem
    t0 = time.monotonic()
    with pytest.raises(stub_mod.StubError, match="did not answer"):
        stub._run_until_doorbell()
    assert time.monotonic() - t0 < 5
    assert mem[abi.STATE_OFFSET] == abi.NONE


def test_the_request_after_a_failed_one_names_its_failure(domains, monkeypatch):
    """A request that failed unanswered (on the NIC's receive thread, say) leaves the slot
    busy, and the next one, from the guest's vCPU, fails on that: its error names the
    failure that left it so, not only "slot busy"."""
    from migrate.stub import stub as stub_mod
    dom = boot(domains)
    stub = dom.stub

    def overdue():
        raise stub_mod.StubError("stub did not answer within 5s")

    monkeypatch.setattr(stub, "_run_until_doorbell", overdue)
    with pytest.raises(stub_mod.StubError, match="did not answer"):
        stub.request(abi.TYPE_PIO, abi.UART_BASE + 7, 1, abi.DIR_READ)
    monkeypatch.undo()
    with pytest.raises(stub_mod.StubError, match=r"^ioreq slot busy \(state 1\): a request failed before: "
                                                 r"stub did not answer within 5s$"):
        stub.request(abi.TYPE_PIO, abi.UART_BASE + 7, 1, abi.DIR_READ)
    stub.ram.mem[abi.STATE_OFFSET] = abi.NONE       # let the domain be destroyed cleanly


def test_a_stopped_process_does_not_find_its_stub_overdue(domains):
    """The watchdog counts the time it saw a request busy, a look at most half its timeout: a
    domain process stopped (SIGSTOP) for longer than ANSWER_TIMEOUT in the middle of a
    request does not kick its stub when it goes on (that crashed the guest), while a stub
    that stays busy while the process runs is still kicked."""
    from migrate.stub import stub as stub_mod
    dom = boot(domains)
    stub = dom.stub
    stub._stopped.set()                         # its own watchdog thread looks no more
    stub._watchdog.join()
    kicks = []
    stub.vcpu.kick = lambda: kicks.append(1)
    every = stub_mod.WATCH_EVERY
    t0 = 1000.0
    stub._busy_since = t0
    seen, busy = stub._watch_step(t0 + every, every, 0.0, 0.0)
    assert busy == every and not kicks
    gap = stub_mod.ANSWER_TIMEOUT + 10          # the process was stopped this long
    seen, busy = stub._watch_step(t0 + every + gap, gap, seen, busy)
    assert busy == every + stub_mod.ANSWER_TIMEOUT / 2 and not kicks, "a stopped process's time counted"
    now = t0 + every + gap
    while not kicks:                            # busy while the process runs: kicked in time
        now += every
        seen, busy = stub._watch_step(now, every, seen, busy)
    assert stub_mod.ANSWER_TIMEOUT < busy <= stub_mod.ANSWER_TIMEOUT + every
    stub._busy_since = 0.0
    assert stub._watch_step(now + every, every, seen, busy) == (0.0, 0.0)


def test_newer_records_that_allow_this_loader_are_accepted(domains):
    dom = boot(domains)
    good = dom.stub.save_devices()
    newer = [dict(r, version=2, min_version=1, fields={**r["fields"], "added_in_v2": 7}) for r in good]
    dom.stub.load_devices(newer)            # unknown fields are ignored
    assert dom.stub.save_devices() == good
    with pytest.raises(Exception, match="cannot be loaded"):
        dom.stub.load_devices([dict(good[0], fields={"ier": "one"})])
    with pytest.raises(Exception, match="cannot be loaded"):
        dom.stub.load_devices("not a list")


@pytest.mark.parametrize("fresh_stub", [False, True], ids=["stub-image", "fresh-stub"])
def test_restore_refuses_a_disk_of_another_size(domains, disk, tmp_path, fresh_stub):
    dom = boot(domains, "ledger", args=[1, 16], disk=str(disk))
    dom.resume()
    dom.console.wait_for(r"ledger ok gen=1 ", 10)
    dom.pause()
    state, memory, stub_memory = dom.capture(), bytes(dom.memory), bytes(dom.stub_memory)
    dom.destroy()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    state.config.disk = str(other)
    with pytest.raises(DomainError, match="sectors"):
        Domain.restore(state, memory, stub_memory, fresh_stub=fresh_stub)


def test_capacity_is_required_and_checked(domains, disk):
    dom = boot(domains, disk=str(disk))
    good = dom.stub.save_devices()
    vblk = next(r for r in good if r["device"] == "virtio-blk")
    assert vblk["fields"]["capacity"] == (2 << 20) // 512
    without = [dict(r, fields={k: v for k, v in r["fields"].items() if k != "capacity"}) for r in good]
    with pytest.raises(Exception, match="refused"):     # specs/device-state.md: a required field
        dom.stub.load_devices(without)
    dom.stub.load_devices(good)
    assert dom.stub.save_devices() == good
    zero_min = [dict(r, min_version=0) for r in good]
    with pytest.raises(Exception, match="refused"):
        dom.stub.load_devices(zero_min)
    with pytest.raises(Exception, match="cannot be loaded"):
        dom.stub.load_devices([dict(good[0], device="ua\0rt")])
