"""The stub's virtio-net device (migrate/stub/src/netdev.c) in C programs of tests/c/,
built with the host's gcc against the device's source and run: cases a guest can cause
that the KVM tests cannot easily reach."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("program", ["netdev_rx_failure"])
def test_netdev_program(tmp_path, program):
    gcc = shutil.which("gcc")
    assert gcc, "gcc builds this project's C parts; it must be here"
    binary = tmp_path / program
    subprocess.run([gcc, "-O1", "-Wall", "-Werror", "-I", str(ROOT / "migrate/stub/src"),
                    str(ROOT / "tests/c" / f"{program}.c"), "-o", str(binary)], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
