"""Can this host restore a stream? (``hvm stream check``, ``hvm restore`` before it builds
anything; specs/cpu-models.md, "Compatibility").

:func:`read_head` reads a stream file up to its first MEMORY_LAYOUT: the configuration and
the CPU records, which version 2 puts before any memory. :func:`check` compares them with
this host and says what stops a restore here and what the guest would notice. A version-1
stream describes no CPU: it restores with this host's (``migrate.cpu.legacy_policy``), and
only its saved MSRs and XSAVE state, at its end, can stop that; :func:`check` reads them
there when it must.

It also decides which disk a restore may open (specs/stream-format.md, "DOMAIN_CONFIG",
``disk_id``): the saved path only if the file there is the image the stream was saved with,
and whether this host has the RAM the guest is given (:func:`check_memory`). Whatever a
stream says goes into a message one line long and bounded (``migrate.text.one_line``).
"""
from __future__ import annotations

import ctypes
import os
import socket
import stat
import struct
from dataclasses import dataclass, field

from ..cpu import (
    CpuModelError, CpuPolicy, HostCpu, compatibility, implied_vendor, legacy_policy, msrs_to_apply,
)
from ..stream import (
    DONE, NEED_DATA, CpuidPolicy, CpuModel, HvmState, MemoryLayout, MsrPolicy, RecordType,
    StreamReader, Vm,
)
from ..stream import DomainConfig as ConfigRecord
from ..text import SHOWN, one_line
from .files import file_chunks
from .state import CpuCollector, RestoreError, config_from_record

XSTATE_BV_OFFSET = 512          # the XSAVE header's first field, in the XSAVE area
MAX_NOTES = 40                  # notes kept (the rest counted)


@dataclass
class StreamHead:
    """What a stream says before its memory."""
    version: int
    config: ConfigRecord
    cpus: dict[Vm, CpuPolicy]            # empty for version 1


def read_head(path: str | os.PathLike | bytes) -> StreamHead:
    """The header, DOMAIN_CONFIG and CPU records of a stream file (or of the bytes a
    stream from a pipe began with), read (and checked) up to its first MEMORY_LAYOUT."""
    reader, config, cpus = StreamReader(), None, CpuCollector()
    for data in [path] if isinstance(path, bytes) else file_chunks(path, 64 << 10):
        reader.feed(data)
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            if isinstance(record, ConfigRecord):
                config = record
            elif isinstance(record, (CpuModel, CpuidPolicy, MsrPolicy)):
                cpus.add(record)
            elif isinstance(record, MemoryLayout):
                if config is None:       # the reader refuses this; kept for the type checker
                    break
                return StreamHead(reader.header.version, config,
                                  {vm: p for vm in Vm if (p := cpus.policy(vm)) is not None})
    reader.eof()
    raise RestoreError(f"{'the stream' if isinstance(path, bytes) else one_line(path, SHOWN)}: stream ends "
                       "before its first MEMORY_LAYOUT")


@dataclass
class Report:
    """``problems``: why this host cannot restore the stream (none: it can). ``notes``:
    what the guest will notice if it is restored here. ``facts``: what was compared."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    disk_file: tuple[int, int] | None = None     # (st_dev, st_ino) of the disk a restore opens

    @property
    def ok(self) -> bool:
        return not self.problems


def check(path: str | os.PathLike | bytes, host: HostCpu, disk_map: dict[str, str] | None = None,
          net_map: dict[str, str] | None = None) -> Report:
    """Everything this host can know about restoring ``path`` without building anything
    (``path`` bytes: a stream's head read from a pipe, which cannot be read again).
    ``disk_map``: {saved disk path: disk here}; ``net_map``: {saved bridge or TAP device:
    the one here}. Every problem and note is one line of at most ONE_LINE characters (text.py)."""
    report = _check(path, host, disk_map or {}, net_map or {})
    report.problems = [one_line(problem) for problem in report.problems]
    notes = [one_line(note) for note in report.notes[:MAX_NOTES]]
    if len(report.notes) > MAX_NOTES:
        notes.append(f"and {len(report.notes) - MAX_NOTES} more notes")
    report.notes = notes
    return report


def _check(path, host: HostCpu, disk_map: dict[str, str], net_map: dict[str, str]) -> Report:
    head = read_head(path)
    report = Report(facts={"version": head.version, "host_vendor": host.vendor,
                           "host_tsc_khz": host.tsc_khz, "tsc_scaling": host.tsc_scaling})
    try:
        config = config_from_record(head.config)
    except RestoreError as exc:
        report.problems.append(str(exc))
        return report
    report.facts.update(name=config.name, workload=config.workload, memory=config.memory,
                        stub=config.stub, disk=config.disk)
    check_memory(config.memory, report)
    check_disk(config.disk, disk_map, report, saved_disk_id(head.config.config))
    check_nic(config.net, net_map, report, head.config.config.get("net_id"))
    vms = {Vm.GUEST: "guest"} | ({Vm.STUB: "stub"} if config.stub else {})
    settled = True          # nothing depends on the saved MSR values
    if head.version >= 2:
        for vm, what in vms.items():
            policy = head.cpus.get(vm)
            if policy is None:
                report.problems.append(f"version-2 stream lacks the {what}'s CPU records")
                continue
            report.facts[f"{what}_cpu"] = _cpu_facts(policy)
            found = compatibility(policy, host, what)
            report.problems += found.problems
            report.notes += found.notes
            settled = settled and not found.dropped_msrs
    if (head.version < 2 or not settled) and isinstance(path, bytes):
        report.notes.append("read from a pipe: the saved MSRs (at its end) are checked as it is restored")
    elif head.version < 2 or not settled:
        _check_saved_msrs(path, head, config.vcpus, host, vms, report)
    return report


# -- memory ---------------------------------------------------------------------------------
def host_memory() -> int:
    """Bytes of RAM this host can give a guest restored here: MemTotal, or less if the
    cgroup (v2) of this process, or one above it, has a lower ``memory.max`` (the domain
    process starts in the same cgroup). Tests patch this function."""
    room = _meminfo("MemTotal")
    try:
        with open("/proc/self/cgroup") as f:
            group = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
    except OSError:
        group = None
    while group:
        try:
            with open(f"/sys/fs/cgroup{group.rstrip('/')}/memory.max") as f:
                limit = f.read().strip()
            if limit.isdigit():
                room = min(room, int(limit))
        except OSError:
            pass
        group = os.path.dirname(group) if group != "/" else ""
    return room


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    raise RestoreError(f"/proc/meminfo has no {key}")


def check_memory(memory: int, report: Report) -> None:
    """A guest of ``memory`` bytes of RAM fits this host only if it has that much at all
    (:func:`host_memory`; specs/stream-format.md, "Restore": why MemTotal, not MemAvailable)."""
    room = host_memory()
    report.facts["host_memory"] = room
    if memory > room:
        report.problems.append(f"the guest has {memory >> 20} MiB of RAM and this host can give at most "
                               f"{room >> 20} MiB (its MemTotal, or its cgroup's memory.max)")


# -- the disk -------------------------------------------------------------------------------
SECTOR = 512
DISK_ID_KEYS = ("dev", "ino", "birth_ns", "size")
IDENTITY_KEYS = ("ino", "birth_ns")     # not dev: device numbers may change at a reboot (btrfs, LVM, NFS)
_AT_FDCWD, _AT_EMPTY_PATH, _STATX_BASIC_STATS, _STATX_BTIME = -100, 0x1000, 0x7FF, 0x800

# kernel filesystems whose "regular files" are not files (linux/magic.h): never a disk here.
# tmpfs (also /dev's devtmpfs, whose devices are not regular files) and ramfs are real files.
KERNEL_FILESYSTEMS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0xF97CFF8C: "selinuxfs", 0x43415D53: "smackfs", 0x5A3C69F0: "apparmorfs",
    0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0xCAFE4A11: "bpf", 0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs", 0x62656570: "configfs", 0x1CD1: "devpts", 0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl", 0x958458F6: "hugetlbfs", 0x6E736673: "nsfs", 0x19800202: "mqueue",
    0x67596969: "rpc_pipefs", 0x6E667364: "nfsd", 0x9FA1: "openpromfs", 0x9FA2: "usbdevfs",
    0xABBA1974: "xenfs", 0x7655821: "resctrl", 0x6C6F6F70: "binderfs", 0x534F434B: "sockfs",
    0x50495045: "pipefs", 0x09041934: "anon_inodefs", 0x62646576: "bdev", 0x454D444D: "devmem",
    0x5345434D: "secretmem", 0x444D4142: "dmabuf",
}


class _Timestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):         # struct statx (linux/stat.h)
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _Timestamp), ("btime", _Timestamp), ("ctime", _Timestamp), ("mtime", _Timestamp),
                ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("_spare", ctypes.c_uint64 * 14)]


_libc = ctypes.CDLL(None, use_errno=True)


def _statx(target: str | int) -> _Statx:
    """statx(2) of a path (symlinks followed, as open follows them) or a descriptor; OSError."""
    buf = _Statx()
    if not hasattr(_libc, "statx"):         # glibc before 2.28: no birth time, so no disk_id
        raise OSError(38, "statx is not available")
    if isinstance(target, int):
        rc = _libc.statx(target, b"", _AT_EMPTY_PATH, _STATX_BASIC_STATS | _STATX_BTIME, ctypes.byref(buf))
    else:
        rc = _libc.statx(_AT_FDCWD, os.fsencode(target), 0, _STATX_BASIC_STATS | _STATX_BTIME,
                         ctypes.byref(buf))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf


def kernel_filesystem(target: str | int) -> str | None:
    """The name of the kernel filesystem (KERNEL_FILESYSTEMS) ``target`` (a path or a
    descriptor) is on, by its statfs f_type; None for any other filesystem; OSError."""
    buf = ctypes.create_string_buffer(256)          # struct statfs: f_type is its first long
    rc = _libc.fstatfs(target, buf) if isinstance(target, int) else _libc.statfs(os.fsencode(target), buf)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return KERNEL_FILESYSTEMS.get(struct.unpack_from("=q", buf)[0] & 0xFFFFFFFF)


def disk_identity(target: str | int) -> dict | None:
    """DOMAIN_CONFIG's ``disk_id`` of the file ``target`` (a path, symlinks followed, or an
    open descriptor): ``dev`` (st_dev), ``ino``, ``birth_ns`` (its birth time, statx
    STATX_BTIME, in ns) and ``size`` (bytes). None if it is not a regular file on a disk
    filesystem, cannot be looked at, or its filesystem gives no birth time: then no image
    is vouched for and a restore needs --disk-map."""
    try:
        st = _statx(target)
        if not stat.S_ISREG(st.mode) or kernel_filesystem(target) is not None:
            return None
    except OSError:
        return None
    birth = st.btime.tv_sec * 1_000_000_000 + st.btime.tv_nsec
    if not st.mask & _STATX_BTIME or birth <= 0:
        return None
    return {"dev": os.makedev(st.dev_major, st.dev_minor), "ino": st.ino, "birth_ns": birth, "size": st.size}


def saved_disk_id(raw: dict) -> dict | None:
    """The ``disk_id`` a DOMAIN_CONFIG map holds, if it is one (a map with at least
    DISK_ID_KEYS, each a non-negative int); None otherwise (absent, nil, or not that)."""
    value = raw.get("disk_id")
    if not isinstance(value, dict) or not all(
            isinstance(value.get(key), int) and not isinstance(value.get(key), bool) and value[key] >= 0
            for key in DISK_ID_KEYS):
        return None
    return value


def _not_a_disk(target: str) -> tuple[str | None, os.stat_result | None]:
    """Why the file ``target`` cannot be a disk image (not a regular file, on a kernel
    filesystem, not there), or None if it can; and its stat, if it could be taken."""
    try:
        st = os.stat(target)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file", st
        kind = kernel_filesystem(target)
    except OSError as exc:
        return exc.strerror or "cannot be looked at", None
    return (f"on {kind}, a kernel filesystem, not a disk image" if kind else None), st


def check_disk(disk: str | None, disk_map: dict[str, str], report: Report,
               disk_id: dict | None = None) -> str | None:
    """The disk a restore here would open, or None (no disk, or a problem said). With a
    --disk-map entry for the saved path, the file it names, if it is a regular file on a
    disk filesystem of the size the stream was saved with (when ``disk_id`` says it);
    without, the saved path only if the file there is the image ``disk_id`` (the stream's)
    identifies: the same st_dev, inode and birth time (specs/stream-format.md,
    "DOMAIN_CONFIG"). A file the operator did not name is never described (its size,
    its kind) beyond "not the image"."""
    unused = set(disk_map) - {disk}
    if unused:
        report.problems.append(f"--disk-map {', '.join(one_line(k, SHOWN) for k in sorted(unused))}: the stream's disk is "
                               f"{one_line(disk, SHOWN) if disk is not None else 'none'}")
    if disk is None:
        return None
    saved_sectors = disk_id["size"] // SECTOR if disk_id else None
    if disk in disk_map:
        target = disk_map[disk]
        entry = f"--disk-map {one_line(disk, SHOWN)}={one_line(target, SHOWN)}"
        problem, st = _not_a_disk(target)
        if problem:
            report.problems.append(f"{entry}: {one_line(target, SHOWN)} is {problem}")
            return None
        if saved_sectors is not None and st.st_size // SECTOR != saved_sectors:
            report.problems.append(f"{entry}: {one_line(target, SHOWN)} has {st.st_size // SECTOR} sectors; the "
                                   f"stream was saved with a disk of {saved_sectors}")
            return None
        file_id = (st.st_dev, st.st_ino)
    else:
        target = disk
        hint = f"name the disk to use with --disk-map {one_line(disk, SHOWN)}=DISK"
        try:
            os.stat(disk)
        except FileNotFoundError:
            report.problems.append(f"the saved disk {one_line(disk, SHOWN)} is not on this host: give "
                                   f"--disk-map {one_line(disk, SHOWN)}=DST")
            return None
        except OSError:
            pass            # refused below: no identity
        if disk_id is None:
            report.problems.append(f"the disk at {one_line(disk, SHOWN)} is not the image this stream was saved with "
                                   f"(the stream does not say which image that was): {hint}")
            return None
        here = disk_identity(disk)
        if here is None or any(here[key] != disk_id[key] for key in IDENTITY_KEYS):
            report.problems.append(f"the disk at {one_line(disk, SHOWN)} is not the image this stream was saved "
                                   f"with: {hint}")
            return None
        if here["size"] // SECTOR != saved_sectors:
            report.problems.append(f"the disk at {one_line(disk, SHOWN)} has changed size since this stream was saved "
                                   f"with it (it had {saved_sectors} sectors then): name a disk of that size with "
                                   f"--disk-map {one_line(disk, SHOWN)}=DISK")
            return None
        file_id = (here["dev"], here["ino"])
    report.facts["disk_here"] = target
    report.disk_file = file_id
    return target


def saved_disk_line(raw: dict) -> str | None:
    """What ``hvm stream inspect`` says of a DOMAIN_CONFIG map's disk: whether the file at
    its path is the image the stream was saved with (as a restore without --disk-map would
    decide), None for a stream without a disk."""
    disk = raw.get("disk")
    if not isinstance(disk, str):
        return None
    if "\0" in disk:               # the map is the stream's, unchecked: no path holds a NUL
        return "disk: the saved path holds a NUL byte (a restore refuses it)"
    report = Report()
    check_disk(disk, {}, report, saved_disk_id(raw))
    if report.problems:
        return f"disk: {one_line(report.problems[0])}"
    return f"disk: {one_line(disk, SHOWN)} is the image this stream was saved with"


def boot_id() -> str:
    """This boot of this host: the kernel's random boot id (a new one at every boot)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def interface_identity(name: str, ifindex: int | None = None) -> dict | None:
    """DOMAIN_CONFIG's ``net_id`` for a NIC on the interface ``name``: ``boot_id`` (this
    boot of this host, :func:`boot_id`) and ``ifindex`` (the interface's index, or nil if
    there is no such interface now; given, if the caller looked it up). None if the boot id
    cannot be read."""
    try:
        return {"boot_id": boot_id(), "ifindex": ifindex if ifindex is not None else _ifindex(name)}
    except OSError:
        return None


def _ifindex(name: str) -> int | None:
    """The index of the interface ``name``, or None if there is none (or no such name)."""
    try:
        return socket.if_nametoindex(name)
    except (OSError, ValueError):
        return None


def check_nic(net: dict | None, net_map: dict[str, str], report: Report, net_id=None) -> None:
    """``net_here``: the bridge or TAP device a restore here would attach the NIC to: the
    mapped one, else the saved name, but an interface of that name that exists here only if
    it is the one the stream was saved with (``net_id``: this boot of this host, and the
    same interface index; specs/stream-format.md, "The NIC"). One that does not exist is
    the NIC back end's to make (a TAP device) or refuse when it opens it."""
    saved = net["name"] if net else None
    unused = set(net_map) - {saved}
    if unused:
        nic = f"on {net['link']} {one_line(saved, SHOWN)}" if net else "none"
        report.problems.append(f"--net-map {', '.join(one_line(k, SHOWN) for k in sorted(unused))}: "
                               f"the stream's NIC is {nic}")
    if net is None:
        return
    # an interface of that name here must be the one saved on; with none here, a TAP device
    # is made (a bridge is refused later)
    if saved not in net_map and (ifindex := _ifindex(saved)) is not None:
        here = interface_identity(saved, ifindex)
        if not (isinstance(net_id, dict) and here is not None and net_id.get("boot_id") == here["boot_id"]
                and net_id.get("ifindex") == here["ifindex"]):
            report.problems.append(
                f"the {net['link']} {one_line(saved, SHOWN)} here is not the interface this stream's NIC "
                f"was saved on (saved on another host or boot, or the interface was made anew): name "
                f"the one to use with --net-map {one_line(saved, SHOWN)}=DEV")
            return
    report.facts["net_here"] = net_map.get(saved, saved)


def _cpu_facts(policy: CpuPolicy) -> dict:
    return {"model": policy.model, "vendor": policy.vendor, "tsc_khz": policy.tsc_khz,
            "strict_tsc": policy.strict_tsc, "saved_on": policy.host_vendor,
            "cpuid_leaves": len(policy.cpuid), "msrs": len(policy.msrs)}


def _check_saved_msrs(path, head: StreamHead, vcpus: int, host: HostCpu, vms: dict, report: Report) -> None:
    """Read the saved MSRs and XSAVE state (the stream's end) and check them as a restore
    here would apply them: needed for version 1, and for MSRs this host lacks. Only what
    a restore would keep is kept: a vCPU record of a vCPU the configuration does not have
    (the guest's ``vcpus``, the stub's one), or of a stub the domain does not have, is
    refused as it arrives, as the restore refuses it (engine.state.StateCollector)."""
    legacy = legacy_policy(host)
    limits = {Vm.GUEST: vcpus, Vm.STUB: 1}
    saved: dict[tuple[Vm, int], dict] = {}
    xstate: dict[tuple[Vm, int], int] = {}
    reader = StreamReader(raw_pages=True)
    for data in file_chunks(path):
        reader.feed(data)
        while (record := reader.next_record()) is not NEED_DATA and record is not DONE:
            if not isinstance(record, HvmState):
                continue
            what = vms.get(record.vm)
            if what is None:
                raise RestoreError(f"stream carries stub context ({record.type.name}) for a domain "
                                   "without a stub")
            if record.vcpu_id is None:
                continue
            if record.vcpu_id >= limits[record.vm]:
                n = limits[record.vm]
                raise RestoreError(f"stream has {record.type.name} of {what} vcpu {record.vcpu_id}; the "
                                   f"{what} has {n} (ids 0..{n - 1})")
            if record.type is RecordType.VCPU_MSRS:
                saved[(record.vm, record.vcpu_id)] = record.state
            elif record.type is RecordType.VCPU_XSAVE:
                xstate[(record.vm, record.vcpu_id)] = struct.unpack_from(
                    "<Q", record.state, XSTATE_BV_OFFSET)[0]
    reader.eof()
    if head.version < 2:
        vendor = implied_vendor({i for msrs in saved.values() for i in msrs})
        report.facts["guest_cpu"] = {"model": "none (version 1)", "implied_vendor": vendor or "unknown"}
        report.notes.append("a version-1 stream describes no CPU: it restores with this host's "
                            f"({host.vendor}, host model); its MSRs point at "
                            f"{vendor or 'no particular vendor'}")
        report.notes += compatibility(legacy, host).notes
    supported_xcr0 = host.reg(0xD, 0, "eax") | host.reg(0xD, 0, "edx") << 32 | 0x3
    problems: dict[tuple[Vm, str], list[int]] = {}      # one line per finding, naming its vCPUs
    notes: dict[tuple[Vm, str], list[int]] = {}
    for (vm, vcpu_id), msrs in sorted(saved.items()):
        try:
            for note in msrs_to_apply(head.cpus.get(vm, legacy), msrs, host)[1]:
                notes.setdefault((vm, note), []).append(vcpu_id)
        except CpuModelError as exc:
            problems.setdefault((vm, str(exc)), []).append(vcpu_id)
    for (vm, vcpu_id), bv in sorted(xstate.items()):
        extra = bv & ~supported_xcr0
        if extra:
            problems.setdefault((vm, f"its XSAVE state holds components {extra:#x} this host does not "
                                     "offer"), []).append(vcpu_id)
    report.notes += [f"{_vcpus(vms[vm], ids)}: {text}" for (vm, text), ids in notes.items()]
    report.problems += [f"{_vcpus(vms[vm], ids)}: {text}" for (vm, text), ids in problems.items()]


def _vcpus(what: str, ids: list[int]) -> str:
    """"guest vcpu 3", "guest vcpus 0..63", "guest vcpus 0, 2, 5" (at most 8 named)."""
    ids = sorted(set(ids))
    if len(ids) == 1:
        return f"{what} vcpu {ids[0]}"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{what} vcpus {ids[0]}..{ids[-1]}"
    named = ", ".join(map(str, ids[:8]))
    return f"{what} vcpus {named}" + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
