"""Streams written by earlier builds and on other hosts must restore and run here, on
whichever vendor this host is (specs/cpu-models.md): real 16 MiB guests with their stubs,
recorded by tools/make_guest_fixture.py and checked in under tests/fixtures/:

- idle-v1-intel.hvm, idle-v1-amd.hvm: version 1 (no CPU description), saved on an Intel
  and on an AMD host at 100 timer ticks;
- idle-v2-baseline-amd.hvm, ledger-v2-baseline-amd.hvm: version 2, baseline CPU model,
  saved on an AMD host (on an Intel host they cross vendors; on an AMD one the baseline
  model's GenuineIntel identity does).

Each restores both ways the stub can resume, and the guest's own checks go on: timer
ticks carry on from where they were, at the rate they were ticking; the ledger's sums
are what the host recomputes."""
import time
from pathlib import Path

import pytest

from migrate.engine import restore
from migrate.engine.files import file_chunks
from migrate.guest import check

FIXTURES = Path(__file__).parent / "fixtures"
IDLE = ["idle-v1-intel.hvm", "idle-v1-amd.hvm", "idle-v2-baseline-amd.hvm"]
STUB_PATHS = pytest.mark.parametrize("fresh_stub", [None, True], ids=["as-saved", "fresh-stub"])


def restored(domains, name, fresh_stub):
    dom, _ = restore(file_chunks(FIXTURES / name), fresh_stub=fresh_stub)
    domains.append(dom)
    dom.resume()
    return dom


@pytest.mark.kvm
@STUB_PATHS
@pytest.mark.parametrize("name", IDLE)
def test_idle_fixture_restores_and_ticks_on(domains, name, fresh_stub):
    dom = restored(domains, name, fresh_stub)
    assert dom.config.workload == "idle" and dom.config.memory == 16 << 20
    ticks = r"^idle ticks=(\d+)$"
    assert int(dom.console.wait_for(ticks, 10).group(1)) >= 200     # carried on from 100
    first = dom.console.wait_for(ticks, 10, start=dom.console.next_index)
    t0 = time.monotonic()
    for _ in range(2):
        later = dom.console.wait_for(ticks, 10, start=dom.console.next_index)
    rate = (int(later.group(1)) - int(first.group(1))) / (time.monotonic() - t0)
    assert 70 < rate < 130, f"{rate:.0f} ticks/s after the restore, the guest ticks at 100 Hz"
    dom.send_input(b"golden\n")
    dom.console.wait_for(r"^idle input: golden$", 10)


@pytest.mark.kvm
@STUB_PATHS
def test_ledger_fixture_restores_and_checks_itself(domains, fresh_stub):
    dom = restored(domains, "ledger-v2-baseline-amd.hvm", fresh_stub)
    seed, pages = dom.config.args[:2]
    m = dom.console.wait_for(r"ledger ok gen=(\d+) sum=([0-9a-f]{16})", 15)
    m = dom.console.wait_for(r"ledger ok gen=(\d+) sum=([0-9a-f]{16})", 15, start=dom.console.next_index)
    assert int(m.group(2), 16) == check.ledger_sum(seed, int(m.group(1)), pages)
    assert not any("CORRUPT" in line for line in dom.console.lines())
    dom.pause()
    assert check.ledger_verify(dom.memory)[0] == -1
