"""hvm restore with hostile but well-formed streams (specs/stream-format.md, "DOMAIN_CONFIG",
"The disk" and "Restore"): the saved disk path is opened only if it is the image the stream
was saved with, nothing a stream says makes a message longer than a line, the saved MSRs of
vCPUs the configuration lacks are refused at once, and a guest larger than the host's RAM is
refused before anything is built. Streams are the checked-in fixtures with one record
changed and framed again (tools/fuzz_stream.reframe)."""
import socket
import importlib.util
import os
import shutil
import struct
from pathlib import Path

import msgpack
import pytest
from click.testing import CliRunner

from migrate.cpu import this_host
from migrate.engine import compat
from migrate.engine.state import RestoreError
from migrate.text import ONE_LINE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SYSFS_KNOB = "/sys/kernel/mm/transparent_hugepage/enabled"
_spec = importlib.util.spec_from_file_location("fuzz_stream", ROOT / "tools" / "fuzz_stream.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def forged(path: Path, fixture: str = "idle-v2-baseline-amd.hvm", extra=(), **changes) -> Path:
    """``fixture`` with its DOMAIN_CONFIG changed (a value ``...`` removes the key) and the
    records ``extra`` added before END, written to ``path``."""
    header, records = fuzz.split((FIXTURES / fixture).read_bytes())
    records = [r for r in records if r[0] != 0]         # END: reframe writes it again
    i = next(n for n, r in enumerate(records) if r[0] == 1)
    config = msgpack.unpackb(records[i][1])
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    records[i][1] = msgpack.packb(config)
    path.write_bytes(fuzz.reframe(header, records + [list(r) for r in extra]))
    return path


def disk_problems(report) -> list[str]:
    return [p for p in report.problems if "disk" in p]


def image(path: Path, size: int = 1 << 20) -> Path:
    path.write_bytes(bytes(size))
    return path


@pytest.fixture
def btime(tmp_path):
    if compat.disk_identity(image(tmp_path / "probe.img", 4096)) is None:
        pytest.skip("this filesystem gives no birth time (statx STATX_BTIME)")


# -- 1. the disk -----------------------------------------------------------------------------
def test_disk_identity_is_device_inode_birth_time_and_size(tmp_path, btime):
    disk = image(tmp_path / "a.img")
    ident = compat.disk_identity(str(disk))
    st = os.stat(disk)
    assert (ident["dev"], ident["ino"], ident["size"]) == (st.st_dev, st.st_ino, 1 << 20)
    assert ident["birth_ns"] > 0
    with open(disk, "rb") as f:
        assert compat.disk_identity(f.fileno()) == ident
    copy = tmp_path / "b.img"
    shutil.copyfile(disk, copy)
    assert compat.disk_identity(str(copy))["ino"] != ident["ino"]
    for kernel_file in (SYSFS_KNOB, "/proc/self/status"):
        if os.path.exists(kernel_file):
            assert compat.disk_identity(kernel_file) is None


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_the_saved_path_is_used_only_if_it_is_the_saved_image(tmp_path, btime):
    """Without --disk-map, the file at the saved path must be the image disk_id names:
    another file of the same size, a sysfs knob, or a stream without disk_id is refused in
    one line that says nothing of the file there."""
    host = this_host()
    disk = image(tmp_path / "disk.img")
    other = image(tmp_path / "other.img")
    right = compat.disk_identity(str(disk))
    refusal = (f"the disk at {disk} is not the image this stream was saved with: name the disk to use "
               f"with --disk-map {disk}=DISK")

    report = compat.check(str(forged(tmp_path / "ok.hvm", disk=str(disk), disk_id=right)), host)
    assert disk_problems(report) == [] and report.facts["disk_here"] == str(disk)
    st = os.stat(disk)
    assert report.disk_file == (st.st_dev, st.st_ino)

    report = compat.check(str(forged(tmp_path / "other.hvm", disk=str(disk),
                                     disk_id=compat.disk_identity(str(other)))), host)
    assert disk_problems(report) == [refusal] and "disk_here" not in report.facts

    report = compat.check(str(forged(tmp_path / "old.hvm", disk=str(disk))), host)     # no disk_id
    assert disk_problems(report) == [refusal.replace(": name", " (the stream does not say which image "
                                                     "that was): name")]
    for bad in (None, "x", {"dev": right["dev"]}, dict(right, ino=-1), dict(right, birth_ns=True)):
        report = compat.check(str(forged(tmp_path / "bad.hvm", disk=str(disk), disk_id=bad)), host)
        assert len(disk_problems(report)) == 1 and "not the image" in report.problems[0], bad

    if os.path.exists(SYSFS_KNOB):      # 4096 bytes: a "disk" of 8 sectors
        st = os.stat(SYSFS_KNOB)
        knob = {"dev": st.st_dev, "ino": st.st_ino, "birth_ns": 1, "size": st.st_size}
        for disk_id in (knob, dict(knob, birth_ns=0)):
            report = compat.check(str(forged(tmp_path / "sysfs.hvm", disk=SYSFS_KNOB, disk_id=disk_id)), host)
            assert disk_problems(report) == [refusal.replace(str(disk), SYSFS_KNOB)]

    os.truncate(disk, 3 << 20)              # the image, grown since: say the saved size, not its own
    report = compat.check(str(tmp_path / "ok.hvm"), host)
    assert disk_problems(report) == [f"the disk at {disk} has changed size since this stream was saved "
                                     f"with it (it had 2048 sectors then): name a disk of that size with "
                                     f"--disk-map {disk}=DISK"]
    assert "6144" not in report.problems[0]


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_the_image_is_known_by_inode_and_birth_time_not_device_number(tmp_path, btime):
    """A device number may change at a reboot (btrfs, LVM, NFS): the saved image is still
    that image; another inode or birth time is not."""
    disk = image(tmp_path / "disk.img")
    ident = compat.disk_identity(str(disk))
    for disk_id, ok in ((dict(ident, dev=ident["dev"] + 1), True), (dict(ident, ino=ident["ino"] + 1), False),
                        (dict(ident, birth_ns=ident["birth_ns"] + 1), False)):
        report = compat.check(str(forged(tmp_path / "s.hvm", disk=str(disk), disk_id=disk_id)), this_host())
        assert (disk_problems(report) == []) == ok, (disk_id, report.problems)


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_a_disk_map_names_a_regular_file_of_the_saved_size(tmp_path, btime):
    """With --disk-map the operator chose the file: a regular file on a disk filesystem, of
    the size the stream was saved with (said with both sizes); a kernel file never."""
    host = this_host()
    disk = image(tmp_path / "disk.img")
    path = forged(tmp_path / "s.hvm", disk="/src/disk.img", disk_id=compat.disk_identity(str(disk)))
    mapped = image(tmp_path / "mapped.img")
    report = compat.check(str(path), host, {"/src/disk.img": str(mapped)})
    assert disk_problems(report) == [] and report.facts["disk_here"] == str(mapped)
    small = image(tmp_path / "small.img", 1519 * 512)
    report = compat.check(str(path), host, {"/src/disk.img": str(small)})
    assert disk_problems(report) == [f"--disk-map /src/disk.img={small}: {small} has 1519 sectors; the "
                                     "stream was saved with a disk of 2048"]
    if os.path.exists(SYSFS_KNOB):
        report = compat.check(str(path), host, {"/src/disk.img": SYSFS_KNOB})
        assert disk_problems(report) == [f"--disk-map /src/disk.img={SYSFS_KNOB}: {SYSFS_KNOB} is on sysfs, "
                                         "a kernel filesystem, not a disk image"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    report = compat.check(str(path), host, {"/src/disk.img": str(fifo)})
    assert disk_problems(report) == [f"--disk-map /src/disk.img={fifo}: {fifo} is not a regular file"]


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_stream_check_and_inspect_say_it_too(tmp_path, btime):
    disk = image(tmp_path / "disk.img")
    good = forged(tmp_path / "good.hvm", disk=str(disk), disk_id=compat.disk_identity(str(disk)))
    old = forged(tmp_path / "old.hvm", disk=str(disk))
    from migrate.cli import hvm
    run = CliRunner().invoke
    res = run(hvm, ["stream", "inspect", str(good)])
    assert res.exit_code == 0 and f"disk: {disk} is the image this stream was saved with\n" in res.output
    res = run(hvm, ["stream", "inspect", str(old)])
    assert res.exit_code == 0 and f"disk: the disk at {disk} is not the image this stream was saved with" \
        in res.output
    res = run(hvm, ["stream", "check", str(old)])
    assert res.exit_code == 1 and f"the disk at {disk} is not the image this stream was saved with" in res.output
    res = run(hvm, ["stream", "check", str(old), "--disk-map", f"{disk}={disk}"])
    assert "disk" not in res.output.replace(str(tmp_path), "")


@pytest.mark.kvm
def test_hvm_restore_refuses_a_forged_disk_before_building(tmp_path, state_dir, btime):
    """The review's case: a stream naming a host file of the saved size as its disk. Refused
    before any process or state is made; and the file checked is the file the lock opens."""
    from migrate.host import control
    victim = image(tmp_path / "victim.bin")
    before = victim.read_bytes()
    for name, disk_id in (("nokey", ...), ("forged", {"dev": 1, "ino": 2, "birth_ns": 3, "size": 1 << 20})):
        path = forged(tmp_path / f"{name}.hvm", disk=str(victim), disk_id=disk_id)
        with pytest.raises(control.ControlError, match="is not the image this stream was saved with"):
            control.restore_domain(path, name=name)
        assert not (state_dir / name).exists()
    assert victim.read_bytes() == before

    path = forged(tmp_path / "swap.hvm", disk=str(victim), disk_id=compat.disk_identity(str(victim)))
    real_lock = control._lock_disk

    def swapped(disk):              # the file is replaced after it was checked, before it is locked
        os.replace(image(tmp_path / "other.bin"), victim)
        return real_lock(disk)
    control._lock_disk = swapped
    try:
        with pytest.raises(control.ControlError, match=f"the disk at {victim} changed while it was checked"):
            control.restore_domain(path, name="swap")
    finally:
        control._lock_disk = real_lock
    assert not (state_dir / "swap").exists()


@pytest.mark.kvm
def test_same_host_save_restore_with_a_disk_and_a_copy_of_it(tmp_path, state_dir, btime):
    """A save records its image; the restore on the same host opens it; a copy of the
    image in its place (a new file) needs --disk-map."""
    from migrate.cli import hvm
    from migrate.host import control
    run = CliRunner().invoke
    disk = image(tmp_path / "d.img")
    assert run(hvm, ["create", "-w", "idle", "-m", "16M", "-n", "dd", "--disk", str(disk)]).exit_code == 0
    path = tmp_path / "dd.hvm"
    try:
        res = run(hvm, ["save", "dd", str(path)])
        assert res.exit_code == 0, res.output
        header, records = fuzz.split(path.read_bytes())
        saved = msgpack.unpackb(next(b for t, b in records if t == 1))
        assert saved["disk_id"] == compat.disk_identity(str(disk))
        res = run(hvm, ["restore", str(path)])
        assert res.exit_code == 0, res.output
        assert run(hvm, ["destroy", "dd"]).exit_code == 0
        control.wait_gone("dd")
        copy = tmp_path / "copy.img"
        shutil.copyfile(disk, copy)
        os.replace(copy, disk)
        res = run(hvm, ["restore", str(path)])
        assert res.exit_code == 1 and f"the disk at {disk} is not the image this stream was saved with: " \
            f"name the disk to use with --disk-map {disk}=DISK" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
        res = run(hvm, ["restore", str(path), "--disk-map", f"{disk}={disk}"])
        assert res.exit_code == 0, res.output
    finally:
        try:
            control.destroy_domain("dd")
        except control.ControlError:
            pass


@pytest.mark.kvm
def test_a_disk_replaced_after_it_was_locked_is_refused_by_the_domain_process(tmp_path, state_dir, btime,
                                                                             monkeypatch):
    """The launcher checks and locks the image, then the domain process opens it by its
    path: a file put there in between (here, just before the process starts) is not the
    locked one, and the restore is refused with nothing left behind."""
    from migrate.cli import hvm
    from migrate.host import control
    run = CliRunner().invoke
    disk = image(tmp_path / "r.img")
    assert run(hvm, ["create", "-w", "idle", "-m", "16M", "-n", "rr", "--disk", str(disk)]).exit_code == 0
    path = tmp_path / "rr.hvm"
    assert run(hvm, ["save", "rr", str(path)]).exit_code == 0
    control.wait_gone("rr")
    real_launch = control.launch

    def swap_then_launch(directory, spec):
        os.replace(image(tmp_path / "other.img"), disk)
        return real_launch(directory, spec)
    monkeypatch.setattr(control, "launch", swap_then_launch)
    with pytest.raises(control.ControlError, match="is not the file that was checked and locked"):
        control.restore_domain(path, name="rr")
    assert control.list_domains() == [] and not (state_dir / "rr").exists()


# -- 2. one bounded line ---------------------------------------------------------------------
def _one_bounded_line(text: str, limit: int) -> None:
    assert "\n" not in text and "\x1b" not in text and len(text) <= limit, text[:300]


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_what_a_stream_says_is_one_bounded_line_in_every_problem(tmp_path):
    host = this_host()
    lines = "/nonexistent\nrestored web1 from /x (idle, 16 MiB): running\n\x1b[2J"
    report = compat.check(str(forged(tmp_path / "nl.hvm", disk=lines)), host)
    assert len(report.problems) == 1
    _one_bounded_line(report.problems[0], ONE_LINE)
    assert "/nonexistent\\nrestored web1" in report.problems[0]
    report = compat.check(str(forged(tmp_path / "long.hvm", disk="/x" * 450_000)), host)
    _one_bounded_line(report.problems[0], ONE_LINE)
    report = compat.check(str(forged(tmp_path / "wl.hvm", workload="w\n" * 450_000)), host)
    assert len(report.problems) == 1
    _one_bounded_line(report.problems[0], ONE_LINE)
    report = compat.check(str(forged(tmp_path / "map.hvm", disk=None)), host,
                          {"/a\nb" * 1000: str(tmp_path / "x")})
    _one_bounded_line(report.problems[0], ONE_LINE)


def test_lock_messages_are_one_bounded_line(tmp_path):
    from migrate.locks import DiskBusy, DiskLock
    with pytest.raises(DiskBusy) as info:
        DiskLock.for_domain(str(tmp_path / ("x\ny" * 5000)))
    _one_bounded_line(str(info.value), 300)


@pytest.mark.kvm
def test_hvm_restore_says_a_stream_in_one_bounded_line(tmp_path, state_dir, monkeypatch):
    from migrate.cli import hvm
    from migrate.host import control
    from migrate.host.launch import Line, Say
    for name, path in (("nl", forged(tmp_path / "nl.hvm", disk="/none\nrestored x from y: running")),
                       ("wl", forged(tmp_path / "wl.hvm", workload="w" * 900_000)),
                       ("nm", forged(tmp_path / "nm.hvm", name="n\n" * 450_000))):
        res = CliRunner().invoke(hvm, ["restore", str(path)])
        assert res.exit_code == 1, res.output
        assert len(res.output.strip().splitlines()) == 1 and len(res.output) < 1200, (name, res.output[:300])
        assert not any(state_dir.iterdir()) if state_dir.exists() else True
    # the domain process's own error (it may quote the stream) is cut too
    monkeypatch.setattr(control, "launch", lambda directory, spec: None)
    monkeypatch.setattr(control, "_read_ready", lambda ready, directory: Line(Say.ERROR, text="e" * 900_000))
    with pytest.raises(control.ControlError) as info:
        control._spawn_process("sp", control.claim_directory("sp", None), None, what="restore")
    _one_bounded_line(str(info.value), 1100)
    assert not (state_dir / "sp").exists()


# -- 3. the saved MSRs of a version-1 stream -------------------------------------------------
def _msrs(vcpu_id: int, entries, vm: int = 0) -> list:
    body = struct.pack("<IIII", vm, vcpu_id, len(entries), 0) + b"".join(
        struct.pack("<IIQ", index, 0, value) for index, value in entries)
    return [0x14, body]


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_saved_msrs_of_a_vcpu_the_guest_lacks_are_refused_at_once(tmp_path):
    """A version-1 stream's MSRs are read at its end; a record of vCPU 1 of a one-vCPU
    guest is refused as the restore refuses it, before the next is read (the review's
    134 MB stream of 4095 vCPUs' MSRs drove the CLI to 920 MB)."""
    host = this_host()
    extra = [_msrs(vcpu, [(i, 1 << 63 | i) for i in range(1024)]) for vcpu in range(1, 40)]
    path = forged(tmp_path / "many.hvm", "idle-v1-amd.hvm", extra)
    with pytest.raises(RestoreError, match=r"stream has VCPU_MSRS of guest vcpu 1; the guest has 1 \(ids 0..0\)"):
        compat.check(str(path), host)
    path = forged(tmp_path / "stub.hvm", "idle-v1-amd.hvm", [_msrs(1, [(0x10, 0)], vm=1)])
    with pytest.raises(RestoreError, match="stub vcpu 1; the stub has 1"):
        compat.check(str(path), host)


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_the_same_finding_of_several_vcpus_is_one_line(tmp_path):
    host = this_host()
    lacking = next(i for i in range(0x40000100, 0x40001000) if i not in host.msrs)
    extra = [_msrs(vcpu, [(lacking, 0x1234)]) for vcpu in range(1, 4)]
    report = compat.check(str(forged(tmp_path / "v4.hvm", "idle-v1-amd.hvm", extra, vcpus=4)), host)
    mine = [p for p in report.problems if f"{lacking:#x}" in p.lower()]
    assert len(mine) == 1 and mine[0].startswith("guest vcpus 1..3: "), report.problems


# -- 4. memory admission ---------------------------------------------------------------------
@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_a_guest_larger_than_the_host_is_refused(tmp_path, monkeypatch):
    """The host's RAM is patched: nothing here depends on this machine's."""
    monkeypatch.setattr(compat, "host_memory", lambda: 64 << 20)
    host = this_host()
    report = compat.check(str(forged(tmp_path / "m.hvm", memory=64 << 20)), host)
    assert not [p for p in report.problems if "RAM" in p] and report.facts["host_memory"] == 64 << 20
    report = compat.check(str(forged(tmp_path / "big.hvm", memory=240 << 30)), host)
    assert [p for p in report.problems if "RAM" in p] == [
        "the guest has 245760 MiB of RAM and this host can give at most 64 MiB (its MemTotal, or its "
        "cgroup's memory.max)"]


def test_host_memory_is_memtotal_or_less():
    total = compat._meminfo("MemTotal")
    assert 0 < compat.host_memory() <= total


@pytest.mark.kvm
def test_hvm_restore_refuses_a_guest_larger_than_the_host_before_building(tmp_path, state_dir, monkeypatch):
    from migrate.host import control
    monkeypatch.setattr(compat, "host_memory", lambda: 8 << 20)
    path = forged(tmp_path / "m.hvm")           # 16 MiB
    with pytest.raises(control.ControlError, match="the guest has 16 MiB of RAM and this host can give at "
                                                    "most 8 MiB"):
        control.restore_domain(path, name="big")
    assert not (state_dir / "big").exists()


def test_a_nic_goes_on_an_existing_interface_only_if_it_is_the_one_saved():
    """Without --net-map, the saved interface name is used if nothing of that name is here
    (a TAP device is made), or if the one here is the interface the stream was saved on:
    this boot of this host, the same index. Anything else names the one to use."""
    lo = socket.if_nametoindex("lo")
    net = {"link": "bridge", "name": "lo", "mac": "02:00:00:00:00:01", "mtu": 1500}
    here = compat.interface_identity("lo")
    assert here == {"boot_id": compat.boot_id(), "ifindex": lo}
    for net_id, ok in ((here, True), (None, False), ({**here, "ifindex": lo + 1000}, False),
                       ({**here, "boot_id": "00000000-0000-0000-0000-000000000000"}, False), ("lo", False)):
        report = compat.Report()
        compat.check_nic(net, {}, report, net_id)
        assert (report.problems == [] and report.facts["net_here"] == "lo") if ok else \
            ("is not the interface this stream's NIC was saved on" in report.problems[0]
             and "net_here" not in report.facts), (net_id, report)
    report = compat.Report()
    compat.check_nic(net, {"lo": "br9"}, report, None)        # the operator named it
    assert report.problems == [] and report.facts["net_here"] == "br9"
    report = compat.Report()
    compat.check_nic(dict(net, link="tap", name="hvmnone0"), {}, report, None)   # nothing of that name
    assert report.problems == [] and report.facts["net_here"] == "hvmnone0"


@pytest.mark.kvm     # this_host(): what this host's KVM offers
def test_a_forged_stream_cannot_hang_its_nic_on_a_host_interface(tmp_path):
    from migrate.cpu import this_host
    path = forged(tmp_path / "nic.hvm", net={"link": "bridge", "name": "lo", "mac": "02:00:00:00:00:01",
                                             "mtu": 1500})
    report = compat.check(path, this_host())
    assert any("bridge lo here is not the interface" in p for p in report.problems), report.problems
