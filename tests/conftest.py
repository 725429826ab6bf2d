"""KVM tests are marked ``kvm``; they skip with a visible reason where
/dev/kvm is missing.  At the end the session writes how many ran and how many
skipped to .kvm-test-status, which .ci/run reads (and fails on if /dev/kvm
exists but KVM tests skipped).

No test may leave a domain process behind: after each test (its fixtures torn down) any
``migrate.host.domaind`` process whose state directory is under this session's temporary
directory is killed, and the test errors naming it."""
import os
import signal
import time
from pathlib import Path

import pytest

from leftovers import domain_processes, kill_domain_processes

KVM_PRESENT = os.path.exists("/dev/kvm")
STATUS_FILE = Path(__file__).resolve().parent.parent / ".kvm-test-status"
_counts = {"ran": 0, "skipped": 0, "skipped_other": 0}
NO_KVM_REASON = "KVM test skipped: /dev/kvm is missing on this host"


def pytest_collection_modifyitems(config, items):
    if KVM_PRESENT:
        return
    skip = pytest.mark.skip(reason=NO_KVM_REASON)
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if "kvm" not in report.keywords:
        return
    if report.when == "call" and report.outcome in ("passed", "failed"):
        _counts["ran"] += 1
    elif report.skipped:
        # a KVM test may skip for another stated reason (no network namespaces here);
        # only skips for want of /dev/kvm count against .ci/run's check
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        _counts["skipped" if "/dev/kvm" in reason else "skipped_other"] += 1


def pytest_sessionfinish(session, exitstatus):
    STATUS_FILE.write_text(f"ran={_counts['ran']} skipped={_counts['skipped']} "
                           f"skipped_other={_counts['skipped_other']} "
                           f"dev_kvm={'yes' if KVM_PRESENT else 'no'}\n")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"KVM tests: {_counts['ran']} ran, {_counts['skipped']} skipped for want of /dev/kvm, "
        f"{_counts['skipped_other']} skipped for other stated reasons "
        f"(/dev/kvm {'present' if KVM_PRESENT else 'missing'})")


LEFT_GRACE = 10.0       # seconds a domain process told to end may take to be gone


@pytest.fixture(autouse=True)
def no_domain_process_left(tmp_path_factory):
    """Autouse, so set up first and torn down last: once a test and its fixtures are done,
    no domain process of this session may live on (a relocation's receiving process, say,
    that no teardown destroyed keeps its guest running after the suite)."""
    yield
    root = str(tmp_path_factory.getbasetemp())
    deadline = time.monotonic() + LEFT_GRACE
    while (left := domain_processes(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        pytest.fail("domain processes left behind (killed now): " +
                    ", ".join(f"pid {pid} in {d}" for pid, d in sorted(left.items())), pytrace=False)


@pytest.fixture
def domains():
    """Domains a test makes; destroyed however the test ends."""
    made = []
    yield made
    for dom in made:
        dom.destroy()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """$HVM_STATE_DIR for the test; any domain process left in it is killed afterwards
    (a failed test must not leave guests running)."""
    path = tmp_path / "hvm-state"
    monkeypatch.setenv("HVM_STATE_DIR", str(path))
    yield path
    kill_domain_processes(path)
