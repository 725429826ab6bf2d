"""A short run of the fault-injection tool (tools/chaos.py): a few relocations and saves of
a ledger guest with a disk, each with one fault (kill -9 of a process involved, the link
cut, the disk full), and the host checked after each. The full run is `make chaos`
(200 trials; figures in the README)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "chaos.py"


@pytest.mark.kvm
def test_a_short_chaos_run_breaks_no_rule():
    out = subprocess.run([sys.executable, str(TOOL), "--trials", "8", "--seed", "12", "--memory", "16",
                          "--json"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 8 and summary["violations"] == 0, out.stdout
    assert len(summary["faults"]) >= 6, summary          # the rotation reaches most kinds
    assert "chaos: seed 12 " in out.stdout
