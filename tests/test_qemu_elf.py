"""The PVH ELF the QEMU comparison tools boot (tools/bench_net_qemu.py ``build_elf``, also
used by tools/bench_relocation_qemu.py). QEMU is not needed: the file's layout is checked.
Once the guest's .bss grew past 3 MiB it covered the boot-info page and page tables the
tool loaded at 0x300000, and the guest overwrote its own page tables (a triple fault
after 44 echoes); nothing had checked that layout against the image's footprint."""
import struct
import subprocess
import sys
from pathlib import Path

from migrate.guest import boot as gboot

TOOLS = Path(__file__).resolve().parent.parent / "tools"
PT_LOAD = 1


def guest_symbol(name: str) -> int:
    """The address of a symbol of the guest image (binutils' nm, which its build uses), e.g.
    the link symbol ``image_end``: where the image's .bss ends (specs/guest-boot.md)."""
    out = subprocess.run(["nm", str(gboot.image_path().with_suffix(".elf"))], check=True,
                         capture_output=True, text=True).stdout
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.split()[-1] == name)


def test_the_pvh_elf_keeps_clear_of_the_guest_image(tmp_path):
    sys.path.insert(0, str(TOOLS))
    import bench_net_qemu
    elf = bench_net_qemu.build_elf(tmp_path, bench_net_qemu.netecho_info(2_000_000, 0), "t.elf").read_bytes()
    entry, phoff = struct.unpack_from("<QQ", elf, 24)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    loads = []
    for i in range(phnum):
        kind, _, _, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if kind == PT_LOAD:
            loads.append((vaddr, filesz, memsz))
    end = guest_symbol("image_end")
    assert gboot.IMAGE_BASE < end <= gboot.WORKLOAD_BASE
    image = [load for load in loads if load[0] == gboot.IMAGE_BASE]
    assert len(image) == 1 and image[0][2] >= end - gboot.IMAGE_BASE      # a reset zeroes the .bss too
    others = [load for load in loads if load[0] != gboot.IMAGE_BASE]
    assert others
    for vaddr, filesz, memsz in others:      # the boot page, page tables and shim: below or above it
        assert vaddr + max(filesz, memsz) <= gboot.IMAGE_BASE or vaddr >= end, hex(vaddr)
    assert any(vaddr <= entry < vaddr + filesz for vaddr, filesz, _ in others)      # the shim
