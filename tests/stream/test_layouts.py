"""Pin every struct's size to specs/stream-format.md, and every HVM layout to the kernel's
field names."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from migrate.stream import cpu, framing, hvm, pages, records
from migrate.stream.records import RecordType

SPEC = (Path(__file__).resolve().parents[2] / "specs" / "stream-format.md").read_text()


def spec_type_table() -> dict[str, tuple[int, str]]:
    rows = re.findall(r"^\| (0x[0-9a-f]{8}) \| (\w+) \| ([^|]+?) \|", SPEC, re.M)
    return {name: (int(value, 16), size) for value, name, size in rows}


def spec_totals() -> dict[str, int]:
    """'#### NAME ...' headings followed by 'Total: N bytes.'"""
    found = re.findall(r"^#### `?(\w+)`?[^\n]*\n(?:(?!####).*\n)*?Total: (\d+) bytes?\.", SPEC, re.M)
    return {name: int(total) for name, total in found}


def test_every_record_type_is_in_the_spec_table() -> None:
    table = spec_type_table()
    assert {t.name for t in RecordType} == set(table)
    for t in RecordType:
        assert table[t.name][0] == t.value


FIXED_BODIES = {
    RecordType.END: records.END,
    RecordType.CPU_MODEL: cpu.CPU_MODEL,
    **{t: codec.struct for t, codec in hvm.CODECS.items() if t is not RecordType.VCPU_MSRS},
}


@pytest.mark.parametrize("record_type", list(FIXED_BODIES), ids=lambda t: t.name)
def test_fixed_body_size_matches_spec(record_type: RecordType) -> None:
    assert int(spec_type_table()[record_type.name][1]) == FIXED_BODIES[record_type].size


def test_variable_bodies_are_variable_in_spec() -> None:
    table = spec_type_table()
    for name in ("DOMAIN_CONFIG", "PAGE_DATA", "PAGE_DATA_ZSTD", "DEVICE_STATE", "CREATOR"):
        assert table[name][1] == "variable"
    assert table["VCPU_MSRS"][1] == "16 + 16 × count"
    assert hvm.MSR_HEADER.size == 16 and hvm.MSR_ENTRY.size == 16
    assert table["MEMORY_LAYOUT"][1] == "16 + 16 × nr_ranges"
    assert records.MEMORY_LAYOUT.size == 16 and records.MEMORY_RANGE.size == 16
    assert table["CPUID_POLICY"][1] == "8 + 28 × count"
    assert cpu.COUNT_HEADER.size == 8 and cpu.CPUID_ENTRY.size == 28
    assert table["MSR_POLICY"][1] == "8 + 16 × count" and cpu.MSR_POLICY_ENTRY.size == 16


SUB_LAYOUTS = {"segment": hvm.SEGMENT, "dtable": hvm.DTABLE, "xcr": hvm.XCR,
               "pic_chip": hvm.PIC_CHIP, "pit_channel": hvm.PIT_CHANNEL}


def test_layout_totals_match_spec() -> None:
    totals = spec_totals()
    for name, layout in SUB_LAYOUTS.items():
        assert totals[name] == struct.calcsize("<" + layout.format), name
    for t, codec in hvm.CODECS.items():
        if t.name in totals:
            assert totals[t.name] == codec.struct.size, t.name
    assert {t.name for t, c in hvm.CODECS.items() if type(c) is hvm.StructCodec} <= set(totals)


def test_framing_sizes() -> None:
    assert records.HEADER.size == 24
    assert records.RECORD_HEADER.size == 16
    assert pages.BATCH_HEADER.size == 8 and pages.PAGE_ENTRY.size == 16
    assert "| 24 | (extension) |" in SPEC and "| 16 | body |" in SPEC
    assert framing.record_crc(0, b"") == __import__("zlib").crc32(bytes(12))


def test_caps_match_spec() -> None:
    assert f"| MAX_RECORD_BODY | {records.MAX_RECORD_BODY} (128 MiB) |" in SPEC
    assert f"| MAX_PAGES_PER_BATCH | {records.MAX_PAGES_PER_BATCH} |" in SPEC
    assert f"| MAX_HEADER_LENGTH | {records.MAX_HEADER_LENGTH} |" in SPEC
    assert f"| MAX_VCPU_ID | {records.MAX_VCPU_ID} |" in SPEC
    assert f"| MAX_MSRS | {records.MAX_MSRS} |" in SPEC
    assert records.MAX_SPACE_PAGES == 2 ** 36 and "| MAX_SPACE_PAGES | 2^36 |" in SPEC


KVM_H = next((p for p in (Path("/usr/include/x86_64-linux-gnu/asm/kvm.h"), Path("/usr/include/asm/kvm.h"))
              if p.exists()), Path("/usr/include/asm/kvm.h"))      # Debian's multiarch path, or the plain one
KVM_STRUCTS = {
    "kvm_regs": hvm.REGS, "kvm_sregs": hvm.SREGS, "kvm_segment": hvm.SEGMENT,
    "kvm_dtable": hvm.DTABLE, "kvm_xcr": hvm.XCR, "kvm_xcrs": hvm.XCRS,
    "kvm_vcpu_events": hvm.EVENTS, "kvm_debugregs": hvm.DEBUGREGS,
    "kvm_pic_state": hvm.PIC_CHIP, "kvm_ioapic_state": hvm.IOAPIC,
    "kvm_pit_channel_state": hvm.PIT_CHANNEL, "kvm_pit_state2": hvm.PIT,
}


@pytest.mark.skipif(not KVM_H.exists(), reason="no <asm/kvm.h> on this machine")
@pytest.mark.parametrize("name", sorted(KVM_STRUCTS))
def test_layout_names_follow_kernel_struct(name: str) -> None:
    """Every top-level field name of the kernel struct, in order, is in the layout."""
    text = KVM_H.read_text()
    body = re.search(rf"^struct {name} {{\n(.*?)^}};", text, re.M | re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    depth, names = 0, []
    for line in body.splitlines():
        line = line.strip()
        if depth == 0 and line.endswith(";") and not line.startswith("}"):
            decl = line.rstrip(";").split(None, 2)[-1] if line.startswith("struct") else line.rstrip(";").split(None, 1)[1]
            names += [re.sub(r"\[.*", "", n.strip()) for n in decl.split(",")]
        if line.startswith("}") and depth == 1 and line != "};":
            names.append(re.sub(r"[}\s;]|\[.*", "", line))
        depth += line.count("{") - line.count("}")
    names = [n for n in names if n]
    assert [f.name for f in KVM_STRUCTS[name].fields] == names
