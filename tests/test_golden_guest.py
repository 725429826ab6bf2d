"""A stream written by this version (tests/fixtures/idle-v1.hvm, a real
16 MiB idle guest with its stub, recorded by tools/make_guest_fixture.py at
100 timer ticks) must restore and run on every later build."""
from pathlib import Path

import pytest

from migrate.engine import restore
from migrate.engine.files import file_chunks

FIXTURE = Path(__file__).parent / "fixtures" / "idle-v1.hvm"


@pytest.mark.kvm
@pytest.mark.parametrize("fresh_stub", [None, True], ids=["as-saved", "fresh-stub"])
def test_golden_guest_stream_restores_and_runs(domains, fresh_stub):
    dom, stats = restore(file_chunks(FIXTURE), fresh_stub=fresh_stub)
    domains.append(dom)
    assert dom.config.workload == "idle" and dom.config.memory == 16 << 20
    dom.resume()
    m = dom.console.wait_for(r"^idle ticks=(\d+)$", 10)
    assert int(m.group(1)) >= 200          # the tick count carried on from 100
    dom.send_input(b"golden\n")
    dom.console.wait_for(r"^idle input: golden$", 10)
