"""CPU models and host compatibility (specs/cpu-models.md).

Without KVM: the models, the compatibility rules and the CPU records against synthetic
hosts of both vendors. With KVM: a host-model stream given one CPUID feature this host
lacks is refused by `hvm stream check`, by `hvm restore` and at a relocation's HELLO, with
the same reason and nothing left behind; the baseline model's guest runs here whatever
this host's vendor."""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from migrate import cpu
from migrate.cpu import (
    BIT, CpuidEntry, CpuModelError, HostCpu, MsrEntry, baseline_cpuid, compatibility,
    msrs_to_apply, policy_for,
)
from migrate.engine.state import cpu_bodies, cpu_records, policies_from_bodies
from migrate.stream import (
    CpuidPolicy, CpuModel, MemoryLayout, MsrPolicy, RecordType, StreamError, StreamWriter, Vm,
    decode_stream, encode_stream,
)
from migrate.stream import DomainConfig as ConfigRecord
from migrate.stream.hvm import HvmState

FIXTURES = Path(__file__).parent / "fixtures"


# -- synthetic hosts ------------------------------------------------------------------------

def vendor_leaf(vendor: str) -> CpuidEntry:
    ebx, edx, ecx = struct.unpack("<3I", vendor.encode())
    return CpuidEntry(0, 0, 0, 0x10, ebx, ecx, edx)


def synthetic_host(vendor: str, *, drop: tuple = (), msrs=None, tsc_khz=2_000_000,
                   scaling=False, xsave=None) -> HostCpu:
    """A host offering the baseline's features (less ``drop``: (leaf, sub, reg, name)) and
    a vendor's worth of MSRs."""
    leaves = {(e.function, e.index): e for e in baseline_cpuid()}
    leaves[(0, 0)] = vendor_leaf(vendor)
    leaves[(0x80000008, 0)] = CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0, 0)
    for leaf, sub, reg, name in drop:
        e = leaves[(leaf, sub)]
        leaves[(leaf, sub)] = e._replace(**{reg: getattr(e, reg) & ~BIT[((leaf, sub, reg), name)]})
    if xsave:
        for entry in xsave:
            leaves[(entry.function, entry.index)] = entry
    default = set(cpu.BASELINE_MSRS) | {0x10A} | ({0x3A} if vendor == "GenuineIntel" else {0xC0010117})
    return HostCpu(cpuid=tuple(sorted(leaves.values())), msrs=frozenset(default if msrs is None else msrs),
                   feature_msrs={0x10A: 0x29}, feature_defaults={0x10A: 0x29}, tsc_khz=tsc_khz,
                   tsc_scaling=scaling)


INTEL, AMD = synthetic_host("GenuineIntel"), synthetic_host("AuthenticAMD")


def test_a_kvm_that_says_tsc_deadline_by_its_capability_alone_can_run_the_baseline():
    """KVM before early 2025 left TSC_DEADLINE out of KVM_GET_SUPPORTED_CPUID and said it by
    KVM_CAP_TSC_DEADLINE_TIMER: the host's CPUID then has it (else every baseline domain
    was refused there); without the capability it stays out."""
    tsc_deadline = BIT[((1, 0, "ecx"), "TSC_DEADLINE")]
    leaves = [e._replace(ecx=e.ecx & ~tsc_deadline) if e.function == 1 else e for e in INTEL.cpuid]

    class OldKvm:
        def __init__(self, cap):
            self.cap = cap

        def get_supported_cpuid(self):
            return [tuple(e) for e in leaves]

        def check_extension(self, cap):
            return int(cap == cpu.KVM_CAP_TSC_DEADLINE_TIMER and self.cap)

    for cap in (True, False):
        entries = cpu.supported_cpuid(OldKvm(cap))
        host = dataclasses.replace(INTEL, cpuid=tuple(entries))
        assert bool(host.reg(1, 0, "ecx") & tsc_deadline) is cap
        assert [e for e in entries if e.function != 1] == [e for e in leaves if e.function != 1]
        if cap:
            assert policy_for("baseline", host).cpuid == baseline_cpuid()
        else:
            with pytest.raises(CpuModelError, match="TSC_DEADLINE"):
                policy_for("baseline", host)


def test_a_kvm_that_does_not_list_debugctl_runs_the_baseline_without_it():
    """KVM before recent kernels left IA32_DEBUGCTL (0x1d9) out of KVM_GET_MSR_INDEX_LIST:
    the baseline, which carries it, still runs there without it (it is droppable at 0),
    and a baseline stream holding 0 there restores, one holding anything else does not."""
    old = synthetic_host("AuthenticAMD", msrs=(set(cpu.BASELINE_MSRS) - {0x1D9}) | {0xC0010117, 0x10A})
    policy = policy_for("baseline", old)
    found = compatibility(policy, old)
    assert found.ok and found.dropped_msrs == [0x1D9] and any("IA32_DEBUGCTL" in n for n in found.notes)
    msrs, notes = msrs_to_apply(policy, {0x10: 5, 0x1D9: 0}, old)
    assert msrs == {0x10: 5} and "dropped MSR 0x1d9 (IA32_DEBUGCTL)" in notes[0]
    with pytest.raises(CpuModelError, match="holds 0x1 and this host lacks it"):
        msrs_to_apply(policy, {0x10: 5, 0x1D9: 1}, old)


def test_baseline_is_the_same_on_every_host():
    a, b = policy_for("baseline", INTEL), policy_for("baseline", AMD)
    assert a.cpuid == b.cpuid == baseline_cpuid()
    assert a.msr_indices == b.msr_indices == list(cpu.BASELINE_MSRS)
    assert a.vendor == "GenuineIntel" and not a.strict_tsc
    assert a.host_vendor == "GenuineIntel" and b.host_vendor == "AuthenticAMD"
    for other in (INTEL, AMD):      # made on either, runs on either
        assert compatibility(a, other).ok and compatibility(b, other).ok


def test_a_host_lacking_a_baseline_feature_cannot_run_it():
    host = synthetic_host("AuthenticAMD", drop=[(1, 0, "edx", "SSE2"), (0x80000001, 0, "edx", "NX")])
    with pytest.raises(CpuModelError, match=r"cannot run the baseline CPU model: lacks SSE2 \(CPUID "
                                            r"0x1.0 EDX bit 26\); lacks NX \(CPUID 0x80000001.0 EDX bit 20\)"):
        policy_for("baseline", host)
    assert "baseline" in host.runnable_models()["baseline"]     # the reason, for hvm host cpu


def test_host_model_needs_every_feature_and_msr_on_the_other_host():
    rich = synthetic_host("GenuineIntel", msrs=set(cpu.BASELINE_MSRS) | {0x3A, 0x140, 0x1234})
    leaves = {(e.function, e.index): e for e in rich.cpuid}
    leaves[(7, 0)] = leaves[(7, 0)]._replace(ebx=leaves[(7, 0)].ebx | BIT[((7, 0, "ebx"), "AVX2")])
    rich = dataclasses.replace(rich, cpuid=tuple(sorted(leaves.values())))
    policy = policy_for("host", rich)
    assert policy.strict_tsc and policy.model == "host"
    found = compatibility(policy, INTEL)
    assert "lacks AVX2 (CPUID 0x7.0 EBX bit 5)" in found.problems
    assert "lacks MSR 0x1234" in found.problems
    assert 0x140 in found.dropped_msrs and any("0x140" in n for n in found.notes)   # droppable
    assert compatibility(policy, rich).ok


def test_feature_msrs_and_xsave_layout():
    policy = dataclasses.replace(policy_for("baseline", INTEL), msrs=(MsrEntry(0x10A, True, 0x2B),))
    assert compatibility(policy, INTEL).problems == [
        "MSR 0x10a (IA32_ARCH_CAPABILITIES) 0x2b needs bits 0x2 this host does not offer (0x29)"]
    avx = (CpuidEntry(0xD, 0, 1, 0x7, 0x340, 0x340, 0), CpuidEntry(0xD, 2, 1, 0x100, 0x240, 0, 0))
    with_avx = synthetic_host("GenuineIntel", xsave=avx)
    moved = synthetic_host("AuthenticAMD", xsave=(avx[0], avx[1]._replace(ebx=0x280)))
    policy = dataclasses.replace(policy_for("baseline", with_avx), cpuid=with_avx.cpuid)
    assert compatibility(policy, with_avx).ok
    assert compatibility(policy, moved).problems == [
        "XSAVE component 2 (AVX) is 256 bytes at offset 576 in the stream, 256 at 640 here"]
    assert compatibility(policy, INTEL).problems == ["lacks XSAVE component 2 (AVX)"]


def test_tsc_frequency_rules():
    slow = synthetic_host("GenuineIntel", tsc_khz=1_000_000)
    baseline, host_model = policy_for("baseline", INTEL), policy_for("host", INTEL)
    assert compatibility(host_model, synthetic_host("GenuineIntel", tsc_khz=2_000_400)).ok   # 200 ppm
    assert compatibility(host_model, slow).problems == [
        "the guest's TSC runs at 2000000 kHz, this host's at 1000000 kHz and KVM cannot scale it "
        "(no KVM_CAP_TSC_CONTROL)"]
    notes = compatibility(baseline, slow).notes
    assert compatibility(baseline, slow).ok and "instead of 2000000 kHz (-50.0%)" in notes[0]
    scaled = compatibility(host_model, dataclasses.replace(slow, tsc_scaling=True))
    assert scaled.ok and "KVM scales the guest's TSC" in scaled.notes[0]


def test_saved_msrs_as_a_host_takes_them():
    policy = policy_for("host", synthetic_host("GenuineIntel", msrs={0x10, 0x3A, 0x140}))
    msrs, notes = msrs_to_apply(policy, {0x10: 5, 0x3A: 0, 0x140: 0}, AMD)
    assert msrs == {0x10: 5} and len(notes) == 2 and "IA32_FEATURE_CONTROL" in notes[0]
    with pytest.raises(CpuModelError, match=r"MSR 0x3a \(IA32_FEATURE_CONTROL\) holds 0x5 and this host lacks it"):
        msrs_to_apply(policy, {0x3A: 5}, AMD)
    legacy = cpu.legacy_policy(AMD)
    msrs, notes = msrs_to_apply(legacy, {0x10: 5, 0x10A: 0xFF}, dataclasses.replace(AMD, msrs=AMD.msrs | {0x10A}))
    assert msrs == {0x10: 5} and "the guest reads this host's 0x29" in notes[0]


def test_implied_vendor_of_version_1_msrs():
    assert cpu.implied_vendor([0x10, 0x3A, 0xC0010015]) == "GenuineIntel"
    assert cpu.implied_vendor([0x10, 0xC0010015]) == "AuthenticAMD"
    assert cpu.implied_vendor([0x10]) == ""


# -- the CPU records --------------------------------------------------------------------------

def test_cpu_records_round_trip_through_bodies_and_streams():
    policies = {Vm.GUEST: policy_for("host", INTEL), Vm.STUB: policy_for("baseline", AMD)}
    assert policies_from_bodies(cpu_bodies(policies)) == policies
    records = [ConfigRecord({"name": "x"})] + cpu_records(policies[Vm.GUEST], Vm.GUEST) + \
        [MemoryLayout.flat(Vm.GUEST, 4), MemoryLayout.flat(Vm.STUB, 0)]
    decoded = decode_stream(encode_stream(records))
    assert decoded[1:4] == records[1:4]


@pytest.mark.parametrize("value,msg", [
    ({}, "not a non-empty map"),
    ({"guest": [b"", b"", b""]}, "CPU_MODEL body is 0 bytes"),
    ({"host": []}, "is not three record bodies"),
    ({"stub": cpu_bodies({Vm.GUEST: policy_for("baseline", INTEL)})["guest"]}, "holds a CPU_MODEL of GUEST"),
])
def test_bad_cpu_descriptions(value, msg):
    with pytest.raises(StreamError, match=msg):
        policies_from_bodies(value)


def _model_body(**change) -> bytes:
    fields = dict(vm=0, tsc_khz=1000, model=b"baseline", flags=0, vendor=b"GenuineIntel", sig=0, reserved=0)
    fields.update(change)
    return struct.pack("<II16sI12sII", *fields.values())


@pytest.mark.parametrize("kind,body,msg", [
    (CpuModel, _model_body(reserved=1), "reserved field is 0x1"),
    (CpuModel, _model_body(flags=2), "flags 0x2 has unknown bits"),
    (CpuModel, _model_body(tsc_khz=0), "tsc_khz is 0"),
    (CpuModel, _model_body(model=b"Base line"), "is not a model name"),
    (CpuModel, _model_body(model=b"a\0b"), "is not a model name"),
    (CpuModel, _model_body(vendor=b"Genuine\nntel"), "not 12 printable ASCII"),
    (CpuModel, _model_body(vm=2), "unknown VM"),
    (CpuidPolicy, struct.pack("<II", 0, 0), "has no entries"),
    (CpuidPolicy, struct.pack("<II", 0, 257), "count 257 exceeds 256"),
    (CpuidPolicy, struct.pack("<II7I", 0, 1, 7, 1, 0, 0, 0, 0, 0), "index 1 without SIGNIFICANT_INDEX"),
    (CpuidPolicy, struct.pack("<II7I", 0, 1, 7, 0, 2, 0, 0, 0, 0), "unknown flags 0x2"),
    (CpuidPolicy, struct.pack("<II7I7I", 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), "not strictly ascending"),
    (CpuidPolicy, struct.pack("<II", 0, 1) + bytes(27), "1 entries need 36"),
    (MsrPolicy, struct.pack("<IIIIQ", 0, 1, 0x10, 0, 5), "carries a value but is not a feature MSR"),
    (MsrPolicy, struct.pack("<IIIIQ", 0, 1, 0x10, 4, 0), "unknown flags 0x4"),
    (MsrPolicy, struct.pack("<IIIIQIIQ", 0, 2, 0x10, 0, 0, 0x10, 0, 0), "not strictly ascending"),
    (MsrPolicy, struct.pack("<II", 0, 1025), "count 1025 exceeds 1024"),
])
def test_bad_cpu_record_bodies(kind, body, msg):
    with pytest.raises(StreamError, match=msg):
        kind.unpack(body)


def _stream(*records) -> bytes:
    """Records framed as they are, without the writer's ordering checks (the reader must
    catch what is wrong before END, which is left zero)."""
    writer = StreamWriter()
    out = [writer.start(), writer.record(ConfigRecord({"name": "x"}))]
    out += [writer.raw(r.TYPE, r.pack()) for r in records]
    return b"".join(out) + writer.raw(RecordType.END, bytes(40))


def test_cpu_record_ordering_rules():
    guest = cpu_records(policy_for("baseline", INTEL), Vm.GUEST)
    layouts = [MemoryLayout.flat(Vm.GUEST, 4), MemoryLayout.flat(Vm.STUB, 0)]
    with pytest.raises(StreamError, match="CPU_MODEL after a MEMORY_LAYOUT"):
        decode_stream(_stream(*layouts, *guest))
    with pytest.raises(StreamError, match="CPU_MODEL for GUEST appears twice"):
        decode_stream(_stream(guest[0], *guest, *layouts))
    stub = cpu_records(policy_for("baseline", INTEL), Vm.STUB)
    with pytest.raises(StreamError, match="CPU records for STUB, whose MEMORY_LAYOUT is empty"):
        decode_stream(_stream(*guest, *stub, *layouts))
    msrs = {i: 0 for i in cpu.BASELINE_MSRS}
    decode_stream(encode_stream([ConfigRecord({"name": "x"}), *guest, *layouts,
                                 HvmState(RecordType.VCPU_MSRS, Vm.GUEST, 0, msrs)]))
    with pytest.raises(StreamError, match="VCPU_MSRS of GUEST vcpu 0 carries other MSRs than its MSR_POLICY"):
        decode_stream(_stream(*guest, *layouts, HvmState(RecordType.VCPU_MSRS, Vm.GUEST, 0, {0x10: 1})))
    featured = cpu_records(dataclasses.replace(policy_for("baseline", INTEL),
                                               msrs=(MsrEntry(0x10A, True, 0x29),)), Vm.GUEST)
    with pytest.raises(StreamError, match="feature MSR 0x10a is 0x28, its MSR_POLICY says 0x29"):
        decode_stream(_stream(*featured, *layouts, HvmState(RecordType.VCPU_MSRS, Vm.GUEST, 0, {0x10A: 0x28})))


# -- on this host (KVM) -----------------------------------------------------------------------

@pytest.mark.kvm
def test_the_baseline_guest_sees_the_baseline_cpu(domains, monkeypatch):
    """The guest's CPUID is the model's, not the host's: its vCPU was given exactly the
    baseline leaves (KVM_SET_CPUID2, seen as it is called: these hosts' PVM module reads
    back the host's leaves 1, 7 and 0xD through KVM_GET_CPUID2 whatever it was given) and
    carries exactly its MSRs."""
    from migrate.domain import Domain, DomainConfig
    from migrate.kvm.vcpu import Vcpu
    given, real = {}, Vcpu.set_cpuid2

    def set_cpuid2(vcpu, entries):
        given.setdefault(id(vcpu), list(entries))
        real(vcpu, entries)
    monkeypatch.setattr(Vcpu, "set_cpuid2", set_cpuid2)
    dom = Domain.boot(DomainConfig("cpu1", "idle", 16 << 20))
    domains.append(dom)
    assert dom.cpu.cpuid == baseline_cpuid() and dom.cpu.vendor == "GenuineIntel"
    assert given[id(dom.vcpus[0])] == list(cpu.cpuid_for_vcpu(baseline_cpuid(), 0))
    host = cpu.this_host()      # less a droppable one a KVM does not list (IA32_DEBUGCTL, older KVM)
    assert sorted(dom.capture().vcpus[0].msrs) == [m for m in cpu.BASELINE_MSRS
                                                   if m in host.msrs or m not in cpu.DROPPABLE_MSRS]
    dom.resume()
    dom.console.wait_for(r"^idle ticks=100$", 5)


def _lacking_bit(host: HostCpu) -> tuple[int, int, str, int]:
    """A feature bit of leaf 7.0 (in every host model) that KVM does not offer here: the
    first clear one, a named feature on a host that lacks it, else a reserved bit, which no
    host offers (a host whose KVM offers AVX2 to ERMS had none of the few named ones)."""
    for reg in ("ebx", "ecx", "edx"):
        offered = host.reg(7, 0, reg) | cpu.NOT_HOST_FEATURES.get((7, 0, reg), 0)
        for bit in range(32):
            if not offered >> bit & 1:
                return 7, 0, reg, bit
    pytest.fail("KVM here sets every bit of CPUID leaf 7.0")


def edited_stream(source: Path, target: Path, bit) -> str:
    """A copy of ``source`` whose guest CPUID_POLICY claims ``bit``, re-framed (CRCs, END)."""
    leaf, sub, reg, n = bit
    records = decode_stream(source.read_bytes())
    for i, record in enumerate(records):
        if isinstance(record, CpuidPolicy) and record.vm is Vm.GUEST:
            entries = []
            for e in record.entries:
                e = CpuidEntry(*e)
                if (e.function, e.index) == (leaf, sub):
                    e = e._replace(**{reg: getattr(e, reg) | 1 << n})
                entries.append(tuple(e))
            records[i] = CpuidPolicy(Vm.GUEST, tuple(entries))
    target.write_bytes(encode_stream(records))
    return cpu.bit_name(leaf, sub, reg, n)


@pytest.fixture
def host_model_stream(tmp_path, domains):
    """A host-model stream of an idle guest saved here, and a copy whose guest CPU claims
    a feature this host lacks; and that feature's name."""
    from migrate.domain import Domain, DomainConfig
    from migrate.engine import save_to_file
    dom = Domain.boot(DomainConfig("hm", "idle", 16 << 20, cpu="host"))
    domains.append(dom)
    dom.resume()
    dom.console.wait_for(r"^idle ticks=10", 5)
    good, bad = tmp_path / "host.hvm", tmp_path / "edited.hvm"
    save_to_file(dom, good)
    dom.destroy()
    return good, bad, edited_stream(good, bad, _lacking_bit(cpu.this_host()))


@pytest.mark.kvm
def test_an_incompatible_stream_is_refused_before_anything_is_built(host_model_stream, state_dir):
    from migrate.cli import hvm
    from migrate.host import control
    good, bad, feature = host_model_stream
    reason = f"guest: lacks {feature}"
    runner = CliRunner()
    res = runner.invoke(hvm, ["stream", "check", str(good), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["restorable"], res.output
    res = runner.invoke(hvm, ["stream", "check", str(bad)])
    assert res.exit_code == 1 and reason in res.output, res.output
    res = runner.invoke(hvm, ["stream", "check", str(bad), "--json"])
    report = json.loads(res.stdout)
    assert res.exit_code == 1 and not report["restorable"] and reason in report["problems"]
    assert report["guest_cpu"]["model"] == "host"
    res = runner.invoke(hvm, ["restore", str(bad), "--name", "nope"])
    assert res.exit_code == 1 and reason in res.output, res.output
    assert control.list_domains() == [] and not (state_dir / "nope").exists()
    res = runner.invoke(hvm, ["restore", str(good), "--name", "yes"])
    assert res.exit_code == 0 and "host CPU" in res.output, res.output
    with control.DomainClient("yes") as c:
        assert c.call("info")["cpu"] == "host"
        c.call("destroy")


@pytest.mark.kvm
def test_relocation_refuses_an_incompatible_cpu_at_hello(tmp_path, pki_dir, domains):
    """The source's HELLO describes its CPUs; a destination that cannot run them says why
    before a single page is sent, and starts nothing."""
    import threading
    from migrate.domain import Domain, DomainConfig
    from migrate.host import control, destination
    from migrate.host.source import MigrateJob, RelocationError
    dst = tmp_path / "dst"
    server = destination.RelocationServer(destination.ServeConfig("127.0.0.1", 0, str(pki_dir / "127.0.0.1"), {}, dst))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = Domain.boot(DomainConfig("rc", "idle", 16 << 20, cpu="host"))
        domains.append(dom)
        dom.resume()
        leaf, sub, reg, n = _lacking_bit(cpu.this_host())
        entries = [e._replace(**{reg: getattr(e, reg) | 1 << n}) if (e.function, e.index) == (leaf, sub) else e
                   for e in dom.cpu.cpuid]
        dom.cpu = dataclasses.replace(dom.cpu, cpuid=tuple(entries))    # what HELLO will say
        job = MigrateJob("127.0.0.1", server.address[1], True, str(pki_dir / "src"), False)
        with pytest.raises(RelocationError) as info:
            job.run(dom)
        assert (f"refused: this host cannot run domain rc's CPU (host model): guest: lacks "
                f"{cpu.bit_name(leaf, sub, reg, n)}") in str(info.value)
        assert dom.status == "running"
        assert control.list_domains(dst) == [] and not (dst.exists() and any(dst.iterdir()))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    from migrate.host import tls
    root = tmp_path_factory.mktemp("pki")
    tls.keygen(root, ["127.0.0.1", "src"])
    return root


@pytest.mark.kvm
def test_restore_with_a_disk_map(tmp_path, state_dir, domains):
    """A stream names its disk by the path on the host that saved it: --disk-map says
    where that disk is here; a missing saved path is refused naming it and the option."""
    from migrate.cli import hvm
    from migrate.host import control
    disk = tmp_path / "a.img"
    disk.write_bytes(bytes(1 << 20))
    runner = CliRunner()
    assert runner.invoke(hvm, ["create", "-w", "idle", "-m", "16M", "-n", "dm", "--disk", str(disk)]).exit_code == 0
    path = tmp_path / "dm.hvm"
    res = runner.invoke(hvm, ["save", "dm", str(path)])
    assert res.exit_code == 0, res.output
    moved = tmp_path / "b.img"
    disk.rename(moved)
    res = runner.invoke(hvm, ["restore", str(path)])
    assert res.exit_code == 1 and f"the saved disk {disk} is not on this host: give --disk-map {disk}=DST" \
        in res.output, res.output
    res = runner.invoke(hvm, ["restore", str(path), "--disk-map", f"/elsewhere.img={moved}"])
    assert res.exit_code == 1 and f"--disk-map /elsewhere.img: the stream's disk is {disk}" in res.output
    res = runner.invoke(hvm, ["restore", str(path), "--disk-map", f"{disk}={moved}"])
    assert res.exit_code == 0, res.output
    with control.DomainClient("dm") as c:
        assert c.call("info")["disk"] == str(moved)
        c.call("destroy")
