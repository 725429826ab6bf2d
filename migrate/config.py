"""What a domain is and how it moves, as plain data: the configuration shared by the
client (``hvm``), the domain processes and the engine.

This module imports nothing but the standard library, so that a client command that only
talks to domain processes (``hvm list``, ``hvm console``) loads no KVM binding, no stub, no
data plane and no zstd. Everything here is data and its validation: the domain's
configuration (:class:`DomainConfig`, with its NIC's), the names of workloads and CPU
models, the domain's status (:class:`DomainStatus`), how pages are compressed
(:class:`Compression`) and when live pre-copy stops (:class:`Convergence`). The modules
that act on them (``migrate.domain``, ``migrate.stub.netback``, ``migrate.engine``) import
them from here.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from enum import StrEnum

DEV_KVM = "/dev/kvm"
PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 240 * GIB          # 3 GiB below the 32-bit MMIO hole, the rest from 4 GiB
MAX_VCPUS = 64

# workload name -> the id the guest image knows it by (specs/guest-boot.md)
WORKLOADS = {"idle": 1, "pagetouch": 2, "dirtier": 3, "ledger": 4, "pageset": 5, "bench": 6,
             "iobench": 8, "netecho": 9, "smp": 10}

# CPU models (specs/cpu-models.md; migrate.cpu makes them)
MODELS = ("baseline", "host")
DEFAULT_MODEL = "baseline"
STUB_MODEL = "baseline"            # the stub runs our own image: it needs nothing more
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,14}\Z")


class DomainError(Exception):
    """A domain cannot be built or operated; the message says why."""


class DomainStatus(StrEnum):
    """Where a domain is in its life (``Domain.status``; ``hvm list`` shows the value)."""
    PAUSED = "paused"           # built, not running
    RUNNING = "running"
    SHUTDOWN = "shutdown"       # the guest stopped itself with status 0
    CRASHED = "crashed"         # a non-zero status, KVM refused to run it, or its process is gone
    DESTROYED = "destroyed"
    MOVED = "moved"             # a destroy found it relocated past the handoff (control replies only)

    @property
    def live(self) -> bool:
        """Running or paused: there is something to save, pause or resume."""
        return self in (DomainStatus.RUNNING, DomainStatus.PAUSED)

    @property
    def stopped(self) -> bool:
        """It will not run again."""
        return self in (DomainStatus.CRASHED, DomainStatus.SHUTDOWN, DomainStatus.DESTROYED)


def memory_ok(memory: int) -> bool:
    """A guest memory size this build runs: MIN_MEMORY to MAX_MEMORY in 2 MiB steps."""
    return MIN_MEMORY <= memory <= MAX_MEMORY and memory % (2 * MIB) == 0


def memory_problem(memory: int) -> str:
    """What is wrong with a guest memory size memory_ok refuses, in one line."""
    size = f"{memory // MIB} MiB" if memory % MIB == 0 else f"{memory / MIB:.2f} MiB"
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        return f"memory size {size} out of range: {MIN_MEMORY // MIB} MiB to {MAX_MEMORY >> 30} GiB"
    below = memory // (2 * MIB) * 2
    return (f"memory size {size} is not a multiple of 2 MiB (the guest maps its memory in 2 MiB "
            f"pages): try {below} MiB or {below + 2} MiB")


# -- the NIC's configuration (it travels in DOMAIN_CONFIG; migrate.stub.netback runs it) ------
MTU_MIN, MTU_MAX, MTU_DEFAULT = 68, 9000, 1500
LINKS = ("tap", "bridge")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")


class NetError(ValueError):
    """A NIC configuration or TAP device this host cannot use; the message says why."""


def random_mac() -> str:
    """A locally administered unicast address in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def parse_net(text: str) -> dict:
    """``tap=NAME[,mac=MAC][,mtu=N]`` or ``bridge=NAME[,...]`` -> a NIC config (a random
    MAC if none is given)."""
    net = {"mac": None, "mtu": MTU_DEFAULT}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not value:
            raise NetError(f"--net {text!r}: {part!r} is not KEY=VALUE (tap=NAME or bridge=NAME, "
                           "then mac=MAC, mtu=N)")
        if key in LINKS:
            if "link" in net:
                raise NetError(f"--net {text!r}: give tap= or bridge= once")
            net["link"], net["name"] = key, value
        elif key == "mac":
            net["mac"] = value.lower()
        elif key == "mtu":
            if not value.isdigit():
                raise NetError(f"--net {text!r}: mtu must be a number")
            net["mtu"] = int(value)
        else:
            raise NetError(f"--net {text!r}: unknown key {key!r} (tap, bridge, mac, mtu)")
    if "link" not in net:
        raise NetError(f"--net {text!r}: say tap=NAME or bridge=NAME")
    net["mac"] = net["mac"] or random_mac()
    net = {k: net[k] for k in ("link", "name", "mac", "mtu")}
    check_net(net)
    return net


def check_net(net) -> None:
    """NetError unless ``net`` is a NIC config this build runs (it may come from a stream)."""
    if not isinstance(net, dict) or set(net) != {"link", "name", "mac", "mtu"}:
        raise NetError("a NIC config is a map of link, name, mac and mtu")
    if net["link"] not in LINKS:
        raise NetError(f"NIC link {net['link']!r} is not tap or bridge")
    check_ifname(net["name"])
    mac = net["mac"]
    if not isinstance(mac, str) or not _MAC.match(mac):
        raise NetError(f"MAC address {mac!r} is not six hex bytes separated by colons")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise NetError(f"MAC address {mac} is not a unicast address")
    mtu = net["mtu"]
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MTU_MIN <= mtu <= MTU_MAX:
        raise NetError(f"MTU {mtu!r} out of range: {MTU_MIN} to {MTU_MAX}")


def check_ifname(name) -> None:
    if not isinstance(name, str) or not _IFNAME.match(name) or name in (".", ".."):
        raise NetError(f"interface name {name!r} is not 1 to 15 letters, digits, '_', '.' or '-'")


def parse_disk_map(items) -> dict[str, str]:
    """['SRC=DST', ...] -> {SRC: DST}; DST must be an existing file here."""
    out = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise ValueError(f"--disk-map {item!r}: use SRC=DST")
        if not os.path.isfile(dst):
            raise ValueError(f"--disk-map {item!r}: {dst} is not a file on this host")
        out[src] = os.path.abspath(dst)
    return out


def parse_net_map(items) -> dict[str, str]:
    """['SRC=DST', ...] -> {SRC: DST}: a NIC on bridge (or TAP device) SRC on the source
    hangs on bridge (or TAP device) DST here."""
    out = {}
    for item in items:
        src, sep, dst = item.partition("=")
        try:
            if not sep:
                raise NetError("use SRC=DST")
            check_ifname(src)
            check_ifname(dst)
        except NetError as exc:
            raise ValueError(f"--net-map {item!r}: {exc}") from None
        out[src] = dst
    return out


# -- the domain ----------------------------------------------------------------------------
@dataclass
class DomainConfig:
    """What a domain is, as plain data (it travels in the stream)."""
    name: str
    workload: str
    memory: int
    args: list[int] = field(default_factory=lambda: [0] * 8)
    timer_hz: int = 100
    stub: bool = True           # devices in a stub VM; False: debug port 0xE9 only
    disk: str | None = None     # raw disk image behind the virtio block device
    cpu: str = DEFAULT_MODEL    # the guest's CPU model (specs/cpu-models.md)
    net: dict | None = None     # the NIC: {"link": "tap"|"bridge", "name", "mac", "mtu"} (check_net)
    vcpus: int = 1              # vCPUs, 1..MAX_VCPUS (LAPIC ids 0..vcpus-1)
    hugepages: bool = False     # guest RAM of 2 MiB huge pages (a host choice: not in the stream)

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise DomainError(f"unknown workload {self.workload!r} "
                              f"(one of: {', '.join(WORKLOADS)})")
        if not memory_ok(self.memory):
            raise DomainError(memory_problem(self.memory))
        if len(self.args) > 8:
            raise DomainError("at most 8 workload arguments")
        if not 0 <= self.timer_hz <= 1000:
            raise DomainError("timer_hz must be 0 to 1000")
        if self.disk is not None and not self.stub:
            raise DomainError("a disk needs the device-model stub")
        if not isinstance(self.cpu, str) or not MODEL_NAME.match(self.cpu):
            raise DomainError(f"{self.cpu!r} is not a CPU model name")
        if self.net is not None:
            if not self.stub:
                raise DomainError("a NIC needs the device-model stub")
            try:
                check_net(self.net)
            except NetError as exc:
                raise DomainError(str(exc)) from None
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool) or not 1 <= self.vcpus <= MAX_VCPUS:
            raise DomainError(f"vcpus must be 1 to {MAX_VCPUS}")
        if not isinstance(self.hugepages, bool):
            raise DomainError("hugepages must be true or false")


# -- how a save sends pages ----------------------------------------------------------------
COMPRESSION_MODES = {"none": 0, "zstd": 1, "auto": 2}      # the data plane's codes (dataplane.c)
DEFAULT_COMPRESSION = "auto"


@dataclass(frozen=True)
class Compression:
    """How page data is sent: ``none``, ``zstd`` at ``level``, or ``auto`` (zstd at
    ``level`` for the batches where that gets them out sooner: dataplane.c,
    ``auto_compress``)."""
    mode: str = "auto"
    level: int = 1

    def __post_init__(self):
        if self.mode not in COMPRESSION_MODES:
            raise ValueError(f"compression {self.mode!r}: one of {', '.join(COMPRESSION_MODES)}")
        if not (-7 <= self.level <= 22 and self.level != 0):
            raise ValueError(f"zstd level {self.level}: 1..22, or -7..-1 for fast")

    @property
    def code(self) -> int:
        return COMPRESSION_MODES[self.mode]

    @classmethod
    def of(cls, value) -> "Compression":
        """From what callers pass: a Compression, None (no compression), an int (zstd at
        that level) or text ("none", "auto", "zstd", "zstd:LEVEL")."""
        if isinstance(value, Compression):
            return value
        if value is None:
            return cls("none")
        if isinstance(value, int) and not isinstance(value, bool):
            return cls("zstd", value)
        if isinstance(value, str):
            mode, _, level = value.strip().lower().partition(":")
            if level and mode != "zstd" or level and not level.lstrip("-").isdigit():
                raise ValueError(f"compression {value!r}: none, auto, zstd or zstd:LEVEL")
            return cls(mode, int(level) if level else 1)
        raise ValueError(f"compression {value!r}: none, auto, zstd or zstd:LEVEL")

    def __str__(self) -> str:
        return self.mode if self.mode != "zstd" else f"zstd:{self.level}"


# -- when live pre-copy stops (migrate.engine.convergence holds the policy) ----------------
class OnTimeout(StrEnum):
    """What giving up on convergence does (``--on-timeout``)."""
    CANCEL = "cancel"
    FORCE = "force"


@dataclass
class Convergence:
    """When live pre-copy stops and pauses the guest for the last round."""
    max_rounds: int = 30            # pre-copy rounds in all, round 0 included (without a timeout): then give up
    small_pages: int = 64           # switch once the dirty set is at most this
    min_shrink: float = 0.9         # a round "stalls" when its dirty set is not below this share of the last
    downtime: float = 0.3           # target for the final round, seconds (--downtime-ms)
    headroom: float = 1.25          # switch on the target only when estimate * headroom fits under it
    min_gain: float = 0.67          # ... and no further round is expected to cut its page part to this share
    state_seconds: float = 0.007    # fixed cost of the downtime beyond the pages: state capture and
                                    # records, the receiver's apply, the handoff and resume
    max_bandwidth: float | None = None   # bytes per second of stream output (--max-bandwidth), None: unpaced
    timeout: float | None = None    # seconds of pre-copy before on_timeout applies
    on_timeout: OnTimeout = OnTimeout.CANCEL    # what giving up does (timeout, stall, round cap)
    throttle: bool = False          # duty-cycle the vCPU when dirtying outruns the link
    throttle_initial: int = 20      # percent of each period the vCPU is held paused
    throttle_step: int = 10
    throttle_max: int = 99

    def __post_init__(self):
        if self.on_timeout not in tuple(OnTimeout):
            raise ValueError(f"on_timeout must be cancel or force, not {self.on_timeout!r}")
        self.on_timeout = OnTimeout(self.on_timeout)
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise ValueError("max_bandwidth must be positive")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.downtime < 0:
            raise ValueError("downtime must not be negative")
        if not 0 <= self.min_gain <= 1:
            raise ValueError("min_gain must be between 0 and 1")
        if self.headroom < 1:
            raise ValueError("headroom must be at least 1")


__all__ = ["COMPRESSION_MODES", "Compression", "Convergence", "DEFAULT_COMPRESSION", "DEFAULT_MODEL",
           "DEV_KVM", "DomainConfig", "DomainError", "DomainStatus", "MAX_MEMORY", "MAX_VCPUS",
           "MIN_MEMORY", "MODELS", "MODEL_NAME", "NetError", "OnTimeout", "STUB_MODEL", "WORKLOADS",
           "check_ifname", "check_net", "memory_ok", "memory_problem", "parse_disk_map", "parse_net",
           "parse_net_map", "random_mac"]
