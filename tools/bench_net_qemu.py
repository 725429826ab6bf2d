"""QEMU's userspace virtio-net beside the stub's: the same netecho guest image, booted by
QEMU (machine microvm, KVM, virtio-mmio) on a TAP device and measured as
tools/bench_net.py measures the stub's NIC. A one-off comparison, not a dependency of the
project: it needs qemu-system-x86_64 (Debian's qemu-system-x86) and says so if missing.

    .venv/bin/python tools/bench_net_qemu.py [--seconds 2]

QEMU cannot load our image as it is (the host loader sets up long mode itself), so the
tool writes a PVH ELF for it: QEMU enters a 40-byte shim in 32-bit protected mode; the shim
finds the virtio-mmio transport holding the network device (0xfeb00000 + 0x200 i), puts
its address in the boot-info page, turns on long mode with the same identity page tables
our loader writes (specs/guest-boot.md) and jumps to the image. The guest then runs as it
does under our host, its console on QEMU's serial port. The CPU model is qemu64: with
`-cpu host` QEMU 7.2 aborts on this host's KVM (it cannot set MSR 0x10a). It runs in a network namespace
of its own (hvmqemu<pid>, removed at the end).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

HOST_IP, GUEST_IP = "10.88.0.1", "10.88.0.2"
BASE = 0x10000              # boot info; page tables from BASE + 0x1000; the shim at BASE + 0x7000
                            # (below the image, whose .bss reaches up to 4 MiB, and above QEMU's firmware stack)
MEMORY = 64 << 20
SHIM = r"""
    .code32
    .globl _start
_start:
    cli
    mov $0xfeb00000, %esi
    mov $24, %ecx
1:  cmpl $0x74726976, (%esi)
    jne 2f
    cmpl $1, 8(%esi)
    je 3f
2:  add $0x200, %esi
    loop 1b
    xor %esi, %esi
3:  mov %esi, BASE+128
    mov $0x620, %eax
    mov %eax, %cr4
    mov $BASE+0x1000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80010033, %eax
    mov %eax, %cr0
    lgdt gdtr
    ljmp $0x08, $long
    .code64
long:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %esp, %esp
    mov $BASE, %edi
    mov $0x100000, %eax
    jmp *%rax
    .align 8
gdt: .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF
gdtr: .word 23
    .long gdt
"""


def qemu_missing() -> bool:
    """Say so and return True when QEMU is not installed."""
    if shutil.which("qemu-system-x86_64") is not None:
        return False
    print("qemu-system-x86_64 is not installed: nothing to compare (apt-get install qemu-system-x86 "
          "for a one-off measurement; it is no dependency of this project)")
    return True


def qemu_command(elf: Path, memory_mib: int, console: Path) -> list[str]:
    """QEMU running the PVH ELF ``elf`` (build_elf) on KVM, one vCPU, its serial port into
    ``console``; the callers add their devices."""
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-enable-kvm",
            "-cpu", "qemu64", "-m", str(memory_mib), "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", f"file:{console}", "-kernel", str(elf)]


def boot_info(workload: str, memory: int, tsc_khz: int, args: list[int], flags: int = 0):
    """The boot-info page of ``workload`` in a guest of ``memory`` bytes booted through the
    shim, which maps the low 4 GiB only (at most 3 GiB of RAM); the UART always on."""
    from migrate.guest import boot as gboot
    layout = gboot.ram_layout(memory)
    if len(layout) != 1:
        raise SystemExit("the QEMU shim maps the low 4 GiB: at most 3 GiB of guest memory")
    wl_base, wl_size = gboot.workload_region(layout)
    return gboot.BootInfo(workload=gboot.WORKLOADS[workload], timer_hz=100, mem_size=memory, wl_base=wl_base,
                          wl_size=wl_size, tsc_khz=tsc_khz, args=args, flags=gboot.BOOT_F_UART | flags)


def netecho_info(tsc_khz: int, opts: int):
    """The boot-info page of the netecho guest on QEMU's virtio-net (the shim finds it)."""
    from migrate.guest import boot as gboot
    return boot_info("netecho", MEMORY, tsc_khz, [int.from_bytes(socket.inet_aton(GUEST_IP), "big"), opts],
                     gboot.BOOT_F_NET)


def build_elf(work: Path, info, name: str) -> Path:
    """A PVH ELF QEMU boots (``-kernel``): our guest image, the boot-info page ``info`` (a
    guest.boot.BootInfo) with identity page tables for the low 4 GiB, and the shim."""
    from migrate.guest import boot as gboot
    (work / "shim.S").write_text(SHIM.replace("BASE", str(BASE)))
    subprocess.run(["gcc", "-c", "-o", work / "shim.o", work / "shim.S"], check=True)
    subprocess.run(["ld", f"-Ttext={BASE + 0x7000:#x}", "--oformat", "binary", "-o", work / "shim.bin",
                    work / "shim.o"], check=True)
    low = bytearray(0x7000)
    low[:len(info.pack())] = info.pack()
    struct.pack_into("<Q", low, 0x1000, (BASE + 0x2000) | 0x27)
    for i in range(4):
        struct.pack_into("<Q", low, 0x2000 + 8 * i, (BASE + 0x3000 + i * 0x1000) | 0x27)
    for n in range(2048):
        struct.pack_into("<Q", low, 0x3000 + 8 * n, (n << 21) | 0xE7)
    low += (work / "shim.bin").read_bytes()
    image = gboot.image_path().read_bytes()
    segments = [(gboot.IMAGE_BASE, image, gboot.WORKLOAD_BASE - gboot.IMAGE_BASE), (BASE, bytes(low), len(low))]
    note = struct.pack("<III", 4, 8, 18) + b"Xen\0" + struct.pack("<Q", BASE + 0x7000)  # PHYS32_ENTRY
    phnum = len(segments) + 1
    offset = 64 + 56 * phnum
    headers, body = b"", b""
    for addr, data, memsz in segments:
        headers += struct.pack("<IIQQQQQQ", 1, 7, offset + len(body), addr, addr, len(data), memsz, 0x1000)
        body += data
    headers += struct.pack("<IIQQQQQQ", 4, 4, offset + len(body), 0, 0, len(note), len(note), 4)
    body += note
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, BASE + 0x7000, 64, 0,
                       0, 64, 56, phnum, 64, 0, 0)
    path = work / name
    path.write_bytes(ehdr + headers + body)
    return path


def tsc_khz() -> int:
    from migrate.domain import Domain, DomainConfig
    dom = Domain(DomainConfig("khz", "idle", 16 << 20, stub=False))
    try:
        return dom.vcpu.get_tsc_khz()
    finally:
        dom.destroy()


def wait_line(path: Path, pattern: str, timeout: float, start: int = 0) -> tuple[re.Match, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = re.search(pattern, text[start:], re.MULTILINE)
        if m:
            return m, len(text)
        time.sleep(0.05)
    raise SystemExit(f"no {pattern!r} on QEMU's console within {timeout}s:\n{text[-2000:]}")


def measure(console: Path, khz: int, mtu: int, seconds: float) -> dict:
    from bench_net import echo_rtt
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.settimeout(5)

    def ask() -> dict:
        status.sendto(b"", (GUEST_IP, 10))
        return {k: int(v) for k, v in (item.split("=") for item in status.recv(4096).decode().split())}

    echo_rtt(50)
    row = {"echo_rtt_us": echo_rtt()}
    for size in sorted({64, mtu - 28}):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        rx.bind((HOST_IP, 0))
        rx.settimeout(2.0)
        count = max(2000, int(seconds * 8000))
        _, at = wait_line(console, r"", 1)
        rx.sendto(struct.pack("<II", count, size), (GUEST_IP, 19))
        got = nbytes = 0
        first = last = None
        while got < count:
            try:
                data = rx.recv(65536)
            except socket.timeout:
                break
            last = time.perf_counter()
            first = first or last
            got += 1
            nbytes += len(data)
        m, _ = wait_line(console, r"^netecho blast n=\d+ size=\d+ cycles=(\d+) kicks=(\d+)", 30, at)
        span = (last - first) if got > 1 else 0.0
        row[f"tx_{size}"] = {"pps": got / span if span else 0.0, "MBps": nbytes / span / 1e6 if span else 0.0,
                             "kicks_per_packet": int(m.group(2)) / count,
                             "guest_us_per_packet": int(m.group(1)) / count / khz * 1000}
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        before = ask()
        payload, sent = bytes(size), 0
        t0 = time.perf_counter()
        while time.perf_counter() < t0 + seconds:
            for _ in range(64):
                try:
                    tx.sendto(payload, (GUEST_IP, 9))
                    sent += 1
                except OSError:
                    pass
        elapsed = time.perf_counter() - t0
        time.sleep(0.3)
        took = ask()["discard"] - before["discard"]
        row[f"rx_{size}"] = {"pps": took / elapsed, "MBps": took * (size + 42) / elapsed / 1e6, "sent": sent}
    return row


def inner(args) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    khz = tsc_khz()
    work = Path(tempfile.mkdtemp(prefix="hvm-qemu-"))
    try:
        for tag, (mtu, opts, name) in enumerate([(1500, 0, "suppressed"), (9000, 0, "suppressed"),
                                                 (1500, 14, "naive")]):
            elf = build_elf(work, netecho_info(khz, opts), "netecho-pvh.elf")
            console = work / f"console{tag}.txt"
            tap = f"hvq{os.getpid() % 10000}n{tag}"
            qemu = subprocess.Popen(
                qemu_command(elf, MEMORY >> 20, console) + [
                    "-global", "virtio-mmio.force-legacy=false",
                    "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                    "-device", f"virtio-net-device,netdev=n0,mac=52:54:00:00:00:02,host_mtu={mtu}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                m, _ = wait_line(console, r"^netecho start null_exit=(\d+)", 60)
                subprocess.run(["ip", "link", "set", tap, "mtu", str(mtu), "up"], check=True)
                subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
                row = measure(console, khz, mtu, args.seconds)
            finally:
                qemu.terminate()
                err = qemu.communicate(timeout=10)[1]
            print(f"QEMU virtio-net, MTU {mtu}, offload on, {name} driver: bare exit "
                  f"{int(m.group(1)) / khz * 1000:.1f} us, echo round trip {row['echo_rtt_us']:.0f} us")
            for size in sorted({64, mtu - 28}):
                tx, rx = row[f"tx_{size}"], row[f"rx_{size}"]
                print(f"  {size:>5} B  guest->host {tx['pps']:>8.0f} pkt/s {tx['MBps']:>7.1f} MB/s "
                      f"{tx['kicks_per_packet']:.2f} kicks/pkt {tx['guest_us_per_packet']:.1f} us/pkt in the guest;"
                      f"  host->guest {rx['pps']:>8.0f} pkt/s {rx['MBps']:>7.1f} MB/s [{rx['sent']} sent]")
            sys.stdout.flush()
            if err.strip():
                print("  qemu said:", err.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if qemu_missing():
        return 1
    if args.inner:
        return inner(args)
    ns = f"hvmqemu{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner",
                               *sys.argv[1:]]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    sys.exit(main())
