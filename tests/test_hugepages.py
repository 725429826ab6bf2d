"""Guest RAM of 2 MiB huge pages (`hvm create --hugepages`, `hvm host serve --hugepages`):
a ledger guest on huge pages saved live and restored onto huge pages and onto 4 KiB pages
(the backing is each host's choice, not in the stream), byte-equal to the source at its
pause and self-checking after; holes found by residency; a relocation onto a destination
that gives huge pages; refusals when the host has too few free.

The host's pool of huge pages is a sysctl (vm.nr_hugepages): the tests raise it by what
they need for their duration and put it back."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from migrate.cli import hvm
from migrate.domain import Domain, DomainConfig, DomainError
from migrate.engine import restore, save_to_file
from migrate.engine.files import file_chunks
from migrate.guest import check
from migrate.host import control, destination
from migrate.kvm import huge_pages_free
from migrate.kvm.vm import HUGE_POOL
from test_relocation import hosts, pki, wait_console  # noqa: F401 (fixtures)
from test_smp import ledger_bytes

NR = HUGE_POOL / "nr_hugepages"       # the 2 MiB pool, whatever the default huge page size


@pytest.fixture()
def huge_pool():
    """A function making sure ``n`` 2 MiB huge pages are free (the pool is raised through
    the sysctl, as root, and lowered again after the test)."""
    before = int(NR.read_text())

    def ensure(n: int) -> None:
        free, total = huge_pages_free()
        if free < n:
            try:
                NR.write_text(str(total + n - free))
            except OSError as exc:
                pytest.fail(f"cannot reserve {n} huge pages (vm.nr_hugepages): {exc}")
            free, total = huge_pages_free()
            assert free >= n, f"the kernel gave {free} free huge pages of the {n} asked for"
    yield ensure
    NR.write_text(str(before))


@pytest.mark.kvm
@pytest.mark.parametrize("onto_huge", [True, False], ids=["onto-huge", "onto-4k"])
def test_a_huge_page_guest_saves_live_and_restores(tmp_path, huge_pool, onto_huge):
    huge_pool(2 * 64 // 2)
    src = Domain.boot(DomainConfig("h1", "ledger", 64 << 20, args=[9, 2000], hugepages=True))
    dom = None
    try:
        assert src.ram.huge and all(r.fd == -1 for r in src.memory_ranges())
        src.resume()
        src.console.wait_for(r"^ledger ok gen=3 ", timeout=30)
        # residency: the pages the ledger and the kernel touched, not the untouched rest
        data = sum(end - first for first, end in src.data_ranges())
        assert 2000 <= data < (64 << 20) // 4096, data
        path = tmp_path / "h1.hvm"
        stats = save_to_file(src, path, live=True)
        assert stats.pages_holes > 0
        at_pause = ledger_bytes(src)
        assert all(bad == -1 for bad, _ in check.verify_ledgers(src))
        src.destroy()
        dom, _ = restore(file_chunks(path), make_domain=lambda cfg, **cpu: Domain(
            DomainConfig(**{**cfg.__dict__, "hugepages": onto_huge}), **cpu))
        assert dom.ram.huge is onto_huge and dom.config.hugepages is onto_huge
        assert ledger_bytes(dom) == at_pause          # every page, to the last round's
        mark = dom.console.next_index
        dom.resume()
        dom.console.wait_for(r"^ledger ok gen=\d+ ", timeout=30, start=mark)
        assert not any("CORRUPT" in line for line in dom.console.lines(mark))
    finally:
        for d in (src, dom):
            if d is not None and d.status != "destroyed":
                d.destroy()


@pytest.mark.kvm
def test_too_few_huge_pages_is_one_line(huge_pool, state_dir):
    huge_pool(0)
    free, total = huge_pages_free()
    want = (free + 8) * 2                               # MiB: more than the free pages hold
    with pytest.raises(DomainError, match=r"huge pages are not available here .*vm\.nr_hugepages"):
        Domain.boot(DomainConfig("h2", "idle", want << 20, hugepages=True))
    res = CliRunner().invoke(hvm, ["create", "-w", "idle", "-m", f"{want}M", "--hugepages", "-n", "h2"])
    assert res.exit_code == 1 and "vm.nr_hugepages" in res.output and len(res.output.splitlines()) == 1, \
        res.output
    assert control.list_domains(state_dir) == []


@pytest.mark.kvm
def test_relocation_onto_huge_pages(hosts, pki, huge_pool):
    src, dst, _ = hosts
    huge_pool(64 // 2 + 4)
    server = destination.RelocationServer(destination.ServeConfig(
        "127.0.0.1", 0, str(pki / "ca" / "127.0.0.1"), {}, dst, hugepages=True))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        control.create_domain(DomainConfig("h3", "ledger", 64 << 20, args=[5, 2000]))
        wait_console("h3", src, r"^ledger ok gen=2 ")
        res = CliRunner().invoke(hvm, ["migrate", "h3", f"127.0.0.1:{server.address[1]}",
                                       "--tls-dir", str(pki / "ca" / "src"), "--downtime-ms", "1000"])
        assert res.exit_code == 0, res.output
        [info] = control.list_domains(dst)
        with control.DomainClient("h3", dst) as c:
            assert c.call("info")["hugepages"] is True
        _, text = wait_console("h3", dst, r"^ledger ok gen=\d+ ")
        assert "CORRUPT" not in text
        # a guest the free huge pages cannot hold is refused at HELLO, and stays where it is
        free, _ = huge_pages_free()
        control.create_domain(DomainConfig("h4", "idle", (free + 8) * 2 << 20))
        res = CliRunner().invoke(hvm, ["migrate", "h4", f"127.0.0.1:{server.address[1]}",
                                       "--tls-dir", str(pki / "ca" / "src")])
        assert res.exit_code == 1 and "no room for domain h4 in huge pages" in res.output, res.output
        assert [d["name"] for d in control.list_domains(src)] == ["h4"]
    finally:
        server.stop()
