"""Capture a running guest's full state and memory, apply them to a
brand-new VM, resume: it carries on as if nothing happened."""
import re
import time

import pytest

from migrate.domain import Domain, DomainConfig
from migrate.guest import check

pytestmark = pytest.mark.kvm


def _capture(dom):
    dom.pause()
    return dom.capture(), bytes(dom.memory), bytes(dom.stub_memory) if dom.stub else None


@pytest.mark.parametrize("fresh_stub", [False, True], ids=["stub-image", "fresh-stub"])
def test_ledger_continues_after_round_trip(domains, tmp_path, fresh_stub):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    src = Domain.boot(DomainConfig("ledger", "ledger", 64 << 20, args=[7, 0], disk=str(disk)))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"ledger ok gen=3 ", 20)
    state, memory, stub_memory = _capture(src)
    hdr = check.ledger_header(memory)
    last = [ln for ln in src.console.lines() if ln.startswith("ledger ok")][-1]
    last_gen, last_ticks = (int(x) for x in re.search(r"gen=(\d+) .* ticks=(\d+)", last).groups())
    src.destroy()

    dst = Domain.restore(state, memory, stub_memory, fresh_stub=fresh_stub)
    domains.append(dst)
    assert check.ledger_verify(dst.memory)[0] == -1
    dst.resume()
    m = dst.console.wait_for(r"ledger ok gen=(\d+) sum=([0-9a-f]+) ticks=(\d+)", 20)
    gen, ticks = int(m.group(1)), int(m.group(3))
    assert gen == last_gen + 1 or (gen == hdr.gen and hdr.phase == 0)
    assert int(m.group(2), 16) == check.ledger_sum(hdr.seed, gen, hdr.npages)
    assert ticks > last_ticks, "timer ticks did not carry on"
    assert m.string.endswith(" journal=ok"), m.string
    dst.console.wait_for(rf"ledger ok gen={gen + 2} .* journal=ok$", 20)
    assert not any("CORRUPT" in ln or "JOURNAL BAD" in ln for ln in dst.console.lines())
    # the console's input path survived too
    dst.send_input(b"still here\n")
    dst.console.wait_for(r"^ledger input: still here$", 10)


def test_pagetouch_continues_after_round_trip(domains):
    src = Domain.boot(DomainConfig("pt", "pagetouch", 64 << 20))
    domains.append(src)
    src.resume()
    src.console.wait_for(r"pagetouch pass=\d+", 20)
    time.sleep(0.3)
    state, memory, stub_memory = _capture(src)
    assert check.pagetouch_check(memory) == []
    last = src.console.lines()[-1]
    last_pass, last_ticks = (int(x) for x in re.search(r"pass=(\d+) ticks=(\d+)", last).groups())
    src.destroy()

    dst = Domain.restore(state, memory, stub_memory)
    domains.append(dst)
    dst.resume()
    m = dst.console.wait_for(r"pagetouch pass=(\d+) ticks=(\d+)", 10)
    assert int(m.group(1)) > last_pass and int(m.group(2)) > last_ticks
    time.sleep(0.3)
    dst.pause()
    assert check.pagetouch_check(dst.memory) == []


def test_state_is_plain_data(domains):
    dom = Domain.boot(DomainConfig("plain", "idle", 16 << 20))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for("idle start", 10)
    dom.pause()
    state = dom.capture()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return isinstance(x, (int, bytes, str))

    vcpu = state.vcpus[0]
    assert all(plain(v) for v in vars(vcpu).values())
    assert all(plain(v) for v in vars(state.platform).values())
    assert len(vcpu.xsave) == 4096 and len(vcpu.lapic) == 1024
    assert 0x10 in vcpu.msrs and len(vcpu.msrs) >= 10   # the TSC and friends
    assert vcpu.sregs["efer"] & 0x500 == 0x500          # long mode active


def test_restore_refuses_wrong_memory_size(domains):
    dom = Domain.boot(DomainConfig("sz", "idle", 16 << 20))
    domains.append(dom)
    state = dom.capture()
    with pytest.raises(Exception, match="memory image is"):
        Domain.restore(state, bytes(8 << 20), bytes(dom.stub_memory))
