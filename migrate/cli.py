"""The `hvm` command: thin click commands over migrate.host and migrate.domain.

Errors leave through migrate.exits (one line, or JSON with --json; exit 1 for a failure,
2 for usage, 3 for an unknown outcome, 130 for an interrupt); a bug is a traceback.
Sizes, rates and durations are read by the option types of migrate.units.
"""
from __future__ import annotations

import json
import sys
import time

import click

from . import exits
from .config import (
    DEFAULT_COMPRESSION, DEFAULT_MODEL, MODELS, WORKLOADS, Compression, DomainConfig, DomainError, DomainStatus,
    memory_ok, memory_problem, parse_disk_map, parse_net_map,
)
from .host import control, protocol
from .host.control import ControlError
from .text import one_line
from .units import Duration, Rate, Size, parse_size  # noqa: F401  (parse_size: for callers)

_fail_cleanly = exits.handled       # every command: errors to exit statuses (migrate.exits)

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output (errors too: {\"error\", \"outcome\", \"exit\", \"guest\"}).")
version_option = click.version_option(package_name="hvm-migrate", message="%(prog)s %(version)s")
SIZE = Size()                       # a guest memory size: 256M, 1G, 1T; a bare number is MiB


@click.group(cls=exits.Group, context_settings=exits.HELP_OPTIONS, epilog=exits.EPILOG)
@version_option
def hvm():
    """Run, save, restore and relocate HVM guests on KVM.

    Domains live under $HVM_STATE_DIR (default /run/hvm for root). Sizes take units
    (256M, 1G), rates too (100M = 100 MB/s, 800Mbit/s) and durations (30s, 500ms).

    \b
    Example:
      hvm create --workload ledger --memory 256M --name web1
      hvm console web1 --follow
    """


@hvm.command()
@click.option("--workload", "-w", type=click.Choice(sorted(WORKLOADS)), required=True,
              help="Guest image workload to run.")
@click.option("--memory", "-m", type=SIZE, default="256M", show_default=True,
              help="Guest RAM (16M to 240G, 2 MiB steps): up to 3G below the 32-bit MMIO hole, "
                   "the rest from 4 GiB.")
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True,
              help="vCPUs, each a thread of the domain's process (LAPIC ids 0..N-1).")
@click.option("--name", "-n", help="Domain name (default: the workload plus a number).")
@click.option("--arg", "args", multiple=True, type=int,
              help="Workload argument (repeatable, up to 8; see specs/guest-boot.md).")
@click.option("--timer-hz", default=100, show_default=True, type=click.IntRange(0, 1000),
              help="Guest LAPIC timer rate (0: none).")
@click.option("--disk", type=click.Path(exists=True, dir_okay=False, writable=True, resolve_path=True),
              help="Raw disk image for the guest's virtio block device.")
@click.option("--net", metavar="tap=NAME|bridge=BR[,mac=MAC][,mtu=N]",
              help="A virtio network card on TAP device NAME, or on a new TAP device added to "
                   "bridge BR (default MAC: random 52:54:00:xx:xx:xx, MTU 1500, at most 9000).")
@click.option("--no-stub", is_flag=True,
              help="No device-model stub: console on debug port 0xE9, no UART, disk or NIC.")
@click.option("--cpu", type=click.Choice(MODELS), default=DEFAULT_MODEL, show_default=True,
              help="CPU model: baseline restores on any x86-64 KVM host (Intel or AMD); host "
                   "gives everything this host has, restorable only where a host offers as much "
                   "(specs/cpu-models.md; hvm host cpu).")
@click.option("--hugepages", is_flag=True,
              help="Guest RAM of 2 MiB huge pages (reserved with sysctl vm.nr_hugepages): faster "
                   "to touch, to restore and to receive; refused if too few are free.")
@json_option
@_fail_cleanly
def create(workload, memory, vcpus, name, args, timer_hz, disk, net, no_stub, cpu, hugepages, as_json):
    """Create and start a domain (HVM guest + device-model stub) in its own process.

    \b
    Example:
      hvm create --workload ledger --memory 256M --disk /var/lib/hvm/l1.img --arg 42
      hvm create --workload idle --cpu host
      hvm create --workload netecho --arg 167772162 --net bridge=br0,mtu=9000
      hvm create --workload smp --vcpus 4 --memory 8G
    """
    net = _parse_net(net)
    _check_memory(memory)
    if name is None:
        taken = {d["name"] for d in control.list_domains()}
        name = next(f"{workload}{i}" for i in range(1, 10000) if f"{workload}{i}" not in taken)
    config = DomainConfig(name=name, workload=workload, memory=memory,
                          args=list(args) + [0] * (8 - len(args)), timer_hz=timer_hz,
                          stub=not no_stub, disk=disk, cpu=cpu, net=net, vcpus=vcpus, hugepages=hugepages)
    try:
        info = control.create_domain(config)        # checks the configuration before anything else
    except DomainError as exc:  # options that do not go together (a disk without the stub): nothing done
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"created {info['name']} ({workload}, {info['memory'] >> 20} MiB, "
                   f"{info.get('vcpus', 1)} vCPU{'s' if info.get('vcpus', 1) != 1 else ''}, pid {info['pid']})")


def _check_memory(memory: int) -> None:
    if not memory_ok(memory):       # a command-line value this build cannot run: a usage error
        raise click.BadParameter(memory_problem(memory), param_hint="--memory")


def _parse_net(text: str | None) -> dict | None:
    from .config import NetError, parse_net
    try:
        return parse_net(text) if text is not None else None
    except NetError as exc:
        raise click.BadParameter(str(exc), param_hint="--net") from None


@hvm.command(name="list")
@json_option
@_fail_cleanly
def list_(as_json):
    """List domains. One whose process was killed is shown as crashed, its console and
    process logs kept, until 'hvm destroy NAME' clears it; one whose process lives but
    does not answer, as unresponsive.

    \b
    Example:
      hvm list --json
    """
    domains = control.list_domains()
    if as_json:
        click.echo(json.dumps(domains))
        return
    click.echo(f"{'NAME':<20} {'STATUS':<12} {'WORKLOAD':<10} {'MEM(MiB)':>8} {'PID':>8} {'UPTIME':>9}")
    for d in domains:
        click.echo(f"{d['name']:<20} {d['status']:<12} {d['workload']:<10} "
                   f"{d['memory'] >> 20:>8} {d['pid']:>8} {d['uptime']:>8.1f}s")


@hvm.command()
@click.argument("name")
@json_option
@_fail_cleanly
def info(name, as_json):
    """Show one domain.

    \b
    Example:
      hvm info web1
    """
    try:
        with control.DomainClient(name) as client:
            data = client.call("info")
    except ControlError as exc:
        if exc.kind != control.CRASHED:
            raise
        data = control.dead_info(control.statedir.domain_dir(name)) or {}
        if not data:
            raise
    if as_json:
        click.echo(json.dumps(data))
        return
    for key in ("name", "status", "workload", "memory", "memory_ranges", "hugepages", "vcpus", "cpu",
                "cpu_vendor", "tsc_khz", "pid", "uptime", "timer_hz", "console_bytes", "crash_reason", "nic",
                "logs", "note"):
        value = data.get(key)
        if key == "memory":
            value = f"{value >> 20} MiB"
        elif key == "memory_ranges" and value:
            value = ", ".join(f"{size >> 20} MiB at {base:#x}" for base, size in value)
        elif key == "nic" and value:
            net = data["net"]
            value = (f"{value['ifname']} ({net['link']} {net['name']}, {net['mac']}, MTU {net['mtu']}): "
                     f"rx {value['rx_packets']} tx {value['tx_packets']} packets")
        elif key == "logs" and value:
            value = " ".join(value)
        if value not in ("", None):
            click.echo(f"{key + ':':<15}{value}")
    for note in data.get("cpu_notes", []):
        click.echo(f"{'cpu note:':<15}{note}")


def _simple(op: str, verb: str, doc: str):
    @click.argument("name")
    @_fail_cleanly
    def command(name):
        if op == "destroy":
            done = control.destroy_domain(name)
            click.echo({"destroyed": f"{verb} {name}",
                        "cleared": f"cleared {name} (it had crashed; its logs are removed)",
                        "already": f"{name} was already being destroyed: it is gone now",
                        "crashed": f"{verb} {name}, but its domain process did not remove its directory: it is "
                                   f"listed crashed, its logs kept ('hvm destroy {name}' clears them)"}[done])
            return
        with control.DomainClient(name) as client:
            client.check_answers()      # one that does not answer is told at once, and nothing queued
            client.call(op)
        click.echo(f"{verb} {name}")
    command.__doc__ = doc
    return command


hvm.command(name="pause")(_simple("pause", "paused", "Pause a domain (its vCPU stops).\n\n"
                                  "\b\nExample:\n  hvm pause web1"))
hvm.command(name="unpause")(_simple("unpause", "unpaused", "Resume a paused domain.\n\n"
                                    "\b\nExample:\n  hvm unpause web1"))
hvm.command(name="destroy")(_simple("destroy", "destroyed", "Stop a domain and free it (a crashed "
                                    "one is cleared, its logs with it).\n\n"
                                    "\b\nExample:\n  hvm destroy web1"))


@hvm.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new output until the domain ends; lines typed on "
                   "standard input go to the guest's UART.")
@_fail_cleanly
def console(name, follow):
    """Print a domain's console output (and, following, send it input).

    \b
    Example:
      hvm console web1 --follow
    """
    out = sys.stdout.buffer
    typing = follow and sys.stdin is not None and not sys.stdin.closed
    try:
        client = control.DomainClient(name)
    except ControlError as exc:
        if exc.kind != control.CRASHED:
            raise
        try:        # a crashed domain: its console log, kept for a post-mortem
            out.write((control.statedir.domain_dir(name) / control.statedir.CONSOLE).read_bytes())
        except OSError:
            raise exc from None
        out.flush()
        return
    with client:
        try:
            _follow(client, out, follow, typing)
        except KeyboardInterrupt:
            if not follow:
                raise           # following, Ctrl-C is how one stops: the guest is untouched
    out.flush()


def _follow(client, out, follow: bool, typing: bool) -> None:
    """Print the console from its start; following, until the domain ends (or Ctrl-C)."""
    offset = 0
    while True:
        if typing:
            line = _stdin_readable()
            if line == b"":
                typing = False          # end of input: keep following
            elif line:
                client.call("input", data=line)
        try:
            part = client.call("console", offset=offset)
        except ControlError as exc:
            if follow and offset and exc.kind == control.LOST:
                return          # the domain went away while we followed it
            raise
        if part.get("interrupted"):
            return              # Ctrl-C while it was asked: following ends
        out.write(part["data"])
        out.flush()
        offset = part["next"]
        if part["data"]:
            continue
        if not follow or part["status"] in (DomainStatus.CRASHED, DomainStatus.SHUTDOWN, DomainStatus.DESTROYED):
            return
        time.sleep(0.2)


def _stdin_readable() -> bytes | None:
    """A line from standard input if one is ready, b"" at its end, None if
    there is nothing to read (or no standard input)."""
    import select
    try:
        ready, _, _ = select.select([sys.stdin], [], [], 0)
    except (ValueError, OSError):
        return None
    if not ready:
        return None
    return sys.stdin.buffer.readline()[:protocol.INPUT_CHUNK]


@hvm.command(name="input")
@click.argument("name")
@click.argument("text")
@click.option("--no-newline", "-n", is_flag=True, help="Do not end the text with a newline.")
@_fail_cleanly
def input_(name, text, no_newline):
    """Type TEXT on a domain's console (its UART), like a person at the keyboard.

    \b
    Example:
      hvm input web1 "hello"
    """
    data = (text if no_newline else text + "\n").encode()
    with control.DomainClient(name) as client:
        for i in range(0, len(data), protocol.INPUT_CHUNK):
            client.call("input", data=data[i:i + protocol.INPUT_CHUNK])
    click.echo(f"sent {len(data)} bytes to {name}")


@hvm.command()
@click.option("--workload", "-w", type=click.Choice(sorted(WORKLOADS)), default="ledger",
              show_default=True)
@click.option("--memory", "-m", type=SIZE, default="256M", show_default=True)
@_fail_cleanly
def demo(workload, memory):
    """Boot a demo guest, show its console, pause, resume and destroy it.

    \b
    Example:
      hvm demo --workload pagetouch
    """
    import os
    import signal
    import tempfile
    _check_memory(memory)
    name = f"demo-{os.getpid()}"
    workdir = tempfile.TemporaryDirectory(prefix="hvm-demo-")
    disk = os.path.join(workdir.name, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    config = DomainConfig(name=name, workload=workload, memory=memory, disk=disk,
                          args=[42, 0, 0, 0, 0, 0, 0, 0] if workload == "ledger" else [0] * 8)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))    # still clean up below
    t0 = time.monotonic()
    info = control.create_domain(config)
    click.echo(f"== created {name}: {workload}, {info['memory'] >> 20} MiB, 4 MiB disk, "
               f"pid {info['pid']} ({time.monotonic() - t0:.2f}s)")
    try:
        with control.DomainClient(name) as client:
            offset = _show_console(client, 0, 2.0)
            click.echo("== typing 'hello from the host' on its console")
            client.call("input", data=b"hello from the host\n")
            offset = _show_console(client, offset, 1.0)
            client.call("pause")
            offset = _show_console(client, offset, 0.0)
            before = client.call("info")
            click.echo(f"== paused: status {before['status']}")
            time.sleep(1.0)
            quiet = client.call("info")["console_bytes"] - before["console_bytes"]
            click.echo(f"== console output while paused for 1s: {quiet} bytes")
            client.call("unpause")
            click.echo(f"== unpaused: status {client.call('info')['status']}")
            _show_console(client, offset, 2.0)
            client.call("destroy")
    finally:
        try:
            with control.DomainClient(name) as client:
                client.call("destroy")
        except ControlError:
            pass
        control.wait_gone(name)
        workdir.cleanup()
    click.echo(f"== destroyed {name}")


def _show_console(client, offset: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        part = client.call("console", offset=offset)
        for line in part["data"].decode(errors="replace").splitlines(keepends=True):
            click.echo("   | " + line, nl=False)
        offset = part["next"]
        if time.monotonic() >= deadline:
            return offset
        time.sleep(0.2)




# -- save, restore, stream ----------------------------------------------------

def map_option(kind: str, text: str):
    """--disk-map or --net-map (``kind``: disk, net): SRC=DST, repeatable."""
    return click.option(f"--{kind}-map", f"{kind}_map", multiple=True, metavar="SRC=DST",
                        help=text + " Repeatable.")


def _map(kind: str, items) -> dict[str, str]:
    """--disk-map or --net-map values, checked as the relocation daemon checks its own."""
    parse = parse_disk_map if kind == "disk" else parse_net_map
    try:
        return parse(items)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{kind}-map") from None


def parse_compress(text: str) -> str:
    """'auto', 'none', 'zstd' or 'zstd:LEVEL', checked (engine.sinks.Compression)."""
    try:
        return str(Compression.of(text.strip().lower()))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use auto, none, zstd or zstd:LEVEL (LEVEL 1..22, "
                                 "or -7..-1 for fast)", param_hint="--compress") from None


class _Compression(click.ParamType):
    name = "compression"

    def convert(self, value, param, ctx):
        try:
            return parse_compress(value) if isinstance(value, str) else value
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


compress_option = click.option("--compress", "compress", type=_Compression(), default=DEFAULT_COMPRESSION,
                               show_default=True, metavar="auto|none|zstd[:LEVEL]",
                               help="Page compression; auto compresses the batches where that gets them "
                                    "out sooner.")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _over_target(s: dict) -> str:
    """A live downtime's words about its target: always said when it was exceeded."""
    target = s.get("downtime_target")
    if target is None:
        return ""
    if s.get("over_target"):
        return f", OVER the {target * 1000:g} ms target by {(s['downtime'] - target) * 1000:.1f} ms"
    return f", within the {target * 1000:g} ms target"


def _warn_over_target(s: dict, what: str) -> None:
    if s.get("over_target"):
        exits.warn(f"{what} downtime {s['downtime'] * 1000:.1f} ms exceeded the "
                   f"{s['downtime_target'] * 1000:g} ms target (switched over: {s.get('reason')})")


def _save_summary(name: str, path: str, reply: dict) -> str:
    s = reply["stats"]
    rounds = f"{s['rounds']} round{'s' if s['rounds'] != 1 else ''}"
    live = (f", downtime {s['downtime'] * 1000:.1f} ms{_over_target(s)} (switched over: {s['reason']})"
            if s["downtime"] else "")
    if s.get("vcpus", 1) > 1:
        live += f", {s['vcpus']} vCPUs stopped within {s['pause_skew'] * 1000:.2f} ms"
    synced = f", on disk after {s['synced']:.2f} s" if s.get("synced") else ""
    return (f"saved {name} to {path}: {_mb(s['stream_bytes'])}, {s['pages_total']} pages "
            f"({s['pages_sent']} sent, {s['pages_zero']} zero), {rounds}, {s['seconds']:.2f} s, "
            f"{s['throughput'] / 1e9:.2f} GB/s of guest RAM{live}{synced}; domain {reply['status']}")


class _ProgressLine:
    """A one-line progress display on a terminal (stderr), nothing otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False

    def __call__(self, s: dict) -> None:
        if not self.enabled:
            return
        total = s["guest_bytes"] // 4096
        done = s["pages_total"] + s.get("pages_holes", 0)
        pct = min(100, 100 * done // total) if total else 100
        bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
        click.echo(f"\r[{bar}] {s['phase']:<7} round {s['round']} {done} pages "
                   f"{_mb(s['stream_bytes'])} {s['seconds']:.1f}s"
                   + (f" throttle {s['throttle']}%" if s.get("throttle") else ""), nl=False, err=True)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            click.echo("", err=True)


def convergence_options(what: str):
    """The pre-copy options shared by ``save --live`` and ``migrate`` (specs/relocation.md,
    section 6); ``what`` says what a cancel leaves behind."""
    options = [
        click.option("--downtime-ms", type=Duration(1e-3, minimum=0, metavar="DURATION"), default=None,
                     help="Switch to the final pause once its estimated time is under this "
                          "(default 300; a bare number is milliseconds: 300, 300ms, 0.3s)."),
        click.option("--max-bandwidth", type=Rate(1e6, minimum=0, min_open=True, metavar="RATE"),
                     help="Pace the stream (a bare number is MB/s of 10^6 bytes: 100, 100M, "
                          "100MB/s, 800Mbit/s, 100MiB/s)."),
        click.option("--timeout", type=Duration(1.0, minimum=0, min_open=True, metavar="DURATION"),
                     help="Give pre-copy this long to converge (a bare number is seconds: 30, "
                          "30s, 2m); then --on-timeout applies."),
        click.option("--on-timeout", type=click.Choice(["cancel", "force"]), default=None,
                     help=f"When pre-copy gives up (at --timeout; without one, when it stalls with "
                          f"nothing left to try): cancel (default): stop, {what}, exit 1; force: "
                          f"pause and send the rest, over the downtime target (a warning says so)."),
        click.option("--throttle", is_flag=True, default=None,
                     help="Slow the guest's vCPU (paused 20%, 30%, ... 99% of the time) when it "
                          "dirties memory faster than the stream goes out."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _convergence(downtime_ms, max_bandwidth, timeout, on_timeout, throttle) -> dict:
    """The request keys of the convergence options given (None: not given); the option
    types gave seconds and bytes per second."""
    return {"downtime_ms": downtime_ms * 1000 if downtime_ms is not None else None,
            "max_bandwidth": max_bandwidth, "precopy_timeout": timeout, "on_timeout": on_timeout,
            "throttle": throttle or None}


@hvm.command(context_settings=exits.HELP_OPTIONS)
@version_option
@click.argument("name")
@click.argument("file", metavar="FILE|-")
@click.option("--checkpoint", is_flag=True, help="Keep the domain running after the save.")
@click.option("--live", is_flag=True, help="Pre-copy while the guest runs, pause for the last round.")
@compress_option
@convergence_options("no file, the domain keeps running")
@json_option
@_fail_cleanly
def save(name, file, checkpoint, live, compress, downtime_ms, max_bandwidth, timeout, on_timeout,
         throttle, as_json):
    """Save a domain to FILE (like xl save: the domain is destroyed afterwards unless
    --checkpoint). FILE appears only when complete; a failed save leaves no file and
    the domain as it was. FILE is a regular file the save creates (an existing one is
    replaced; a device, FIFO, symlink or directory is refused); '-' writes the stream to
    standard output (a pipe or a file, not a terminal) and the summary to standard error.
    The pre-copy options need --live; a downtime over the target is always reported
    (a warning line, and "over_target" with --json).

    \b
    Example:
      hvm save web1 /var/lib/hvm/web1.hvm --live --compress zstd:3
      hvm save web1 /var/lib/hvm/web1.hvm --live --max-bandwidth 200M --timeout 30s --throttle
      hvm save web1 - --checkpoint | ssh node2 hvm restore -
    """
    to_stdout = file == "-"
    if to_stdout:
        click.get_current_context().meta[exits.JSON_TO_STDERR] = True
        if sys.stdout.isatty():
            raise click.UsageError("refusing to write a stream to a terminal: redirect standard output "
                                   "(or name a FILE)")
    convergence = _convergence(downtime_ms, max_bandwidth, timeout, on_timeout, throttle)
    if not live and any(v is not None for v in convergence.values()):
        raise click.UsageError("--downtime-ms, --max-bandwidth, --timeout, --on-timeout and "
                               "--throttle need --live")
    mode = ("live-" if live else "") + ("checkpoint" if checkpoint else "stop")
    mode = {"live-stop": "live"}.get(mode, mode)
    bar = _ProgressLine(sys.stderr.isatty() and not as_json)
    try:
        if to_stdout:
            sys.stdout.flush()
        reply = control.save_domain(name, None if to_stdout else file, mode=mode, compress=compress,
                                    progress=bar, fd=sys.stdout.fileno() if to_stdout else None,
                                    **convergence)
    finally:
        bar.done()
    if reply["status"] == DomainStatus.DESTROYED and not control.wait_gone(name):
        exits.warn(f"the save is complete, but {name}'s domain process here has not ended yet: "
                   f"'hvm list' shows what is left of it")
    if reply.get("interrupted"):
        exits.warn("interrupted too late to cancel: the save had completed")
    if reply.get("input_left"):
        kept = " (they stay with the guest here)" if reply["status"] != DomainStatus.DESTROYED else ""
        exits.warn(f"{reply['input_left']} bytes of console input still waiting for {name}'s UART are not in "
                   f"the stream: a copy restored from it never sees them{kept}")
    _warn_over_target(reply["stats"], "save")
    if as_json:
        exits.echo_json({"name": name, **reply})
    else:
        click.echo(_save_summary(name, "standard output" if to_stdout else file, reply), err=to_stdout)


@hvm.command(context_settings=exits.HELP_OPTIONS)
@version_option
@click.argument("file", metavar="FILE|-")
@click.option("--name", "-n", help="Name of the restored domain (default: the saved name).")
@click.option("--paused", is_flag=True, help="Leave the restored domain paused.")
@click.option("--fresh-stub", is_flag=True,
              help="Boot a new device-model stub and load the saved device state, instead of "
                   "resuming the saved stub image (automatic when the stub build differs).")
@map_option("disk", "Use DST here for the disk the stream names SRC (a stream from another host).")
@map_option("net", "Attach the NIC the stream puts on bridge (or TAP device) SRC to bridge (or TAP "
            "device) DST here.")
@json_option
@_fail_cleanly
def restore(file, name, paused, fresh_stub, disk_map, net_map, as_json):
    """Restore a domain from a stream FILE ('-': standard input; a pipe is read once),
    checking the stream as it goes; any error destroys what was built and says why. What
    this host cannot give the saved domain (its CPU, its disk) is refused before anything
    starts (hvm stream check says it first).

    \b
    Example:
      hvm restore /var/lib/hvm/web1.hvm --name web1b --paused
      hvm restore web1.hvm --disk-map /srv/a/web1.img=/var/lib/hvm/web1.img --net-map br0=br1
      ssh node1 hvm save web1 - | hvm restore -
    """
    t0 = time.monotonic()
    if name is not None:
        control.statedir.check_name(name)       # a usage error, as for every command naming a domain
    info = control.restore_domain(file, name=name, paused=paused, fresh_stub=fresh_stub,
                                  disk_map=_map("disk", disk_map), net_map=_map("net", net_map))
    if as_json:
        click.echo(json.dumps({**info, "seconds": time.monotonic() - t0}))
        return
    click.echo(f"restored {info['name']} from {'standard input' if file == '-' else file} "
               f"({info['workload']}, {info['memory'] >> 20} MiB, {info['cpu']} CPU): {info['status']}, "
               f"pid {info['pid']} ({time.monotonic() - t0:.2f} s)")
    for note in info.get("cpu_notes", []):
        click.echo(f"note: {one_line(note)}")


@hvm.group()
def stream():
    """Look inside stream files: inspect, verify, dump.

    \b
    Example:
      hvm stream verify web1.hvm
    """


_stream_errors = _fail_cleanly


@stream.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_stream_errors
def inspect(file):
    """Header, record table (offsets, sizes) and memory statistics.

    \b
    Example:
      hvm stream inspect web1.hvm
    """
    from .engine import inspect as insp
    from .engine.compat import saved_disk_line
    from .stream import DomainConfig as ConfigRecord
    scan, rows, stats, vcpus, config = insp.Scan(file), insp.Spool(), {}, {}, {}
    for e in scan:          # all checked before anything is printed
        rows.append(f"{e.index:>6} {e.offset:>12} {e.size:>10}  {e.record.TYPE.name:<16} "
                    f"{insp.summary(e.record)}")
        insp.add_memory_stats(stats, e)
        insp.add_vcpu(vcpus, e)
        if isinstance(e.record, ConfigRecord):
            config = e.record.config
    h = scan.header
    click.echo(f"header: version {h.version}, length {h.header_length}, "
               f"incompat 0x{h.incompat_flags:x}, compat 0x{h.compat_flags:x}")
    click.echo(f"{'#':>6} {'offset':>12} {'size':>10}  {'type':<16} summary")
    for row in rows:
        click.echo(row)
    for space, memory in stats.items():
        click.echo(memory.line(space))
    click.echo(insp.vcpus_line(vcpus))
    if (disk := saved_disk_line(config)) is not None:     # as hvm restore without --disk-map decides
        click.echo(disk)
    click.echo(f"{len(rows)} records, {e.offset + e.size} bytes; END checked (counts and digest)")


@stream.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_stream_errors
def verify(file):
    """Check a stream completely; exit 1 with the first problem.

    \b
    Example:
      hvm stream verify web1.hvm && echo good
    """
    from .engine import inspect as insp
    count = 0
    for e in insp.Scan(file):
        count += 1
    click.echo(f"{file}: ok ({count} records, {e.record.page_count} page entries)")


@stream.command(name="check")
@click.argument("file", type=click.Path(dir_okay=False))
@map_option("disk", "Check with DST here for the disk the stream names SRC.")
@map_option("net", "Check with bridge (or TAP device) DST here for the NIC's SRC.")
@json_option
@_stream_errors
def check_(file, disk_map, net_map, as_json):
    """Can this host restore FILE? Compares the saved CPUs (specs/cpu-models.md), the
    configuration and the disk with this host, without building anything; exit 0 and what
    the guest would notice, or exit 1 with every reason. It reads the stream's beginning
    (the whole stream for a version-1 one): hvm stream verify checks all of it.

    \b
    Example:
      hvm stream check web1.hvm && hvm restore web1.hvm
    """
    from .cpu import this_host
    from .engine.compat import check
    report = check(file, this_host(), _map("disk", disk_map), _map("net", net_map))
    if as_json:
        click.echo(json.dumps({"file": file, "restorable": report.ok, "problems": report.problems,
                               "notes": report.notes, **report.facts}))
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        if report.ok:
            click.echo(f"{file}: this host can restore it")
    if not report.ok:
        if not as_json:
            click.echo(f"{file}: this host cannot restore it: {'; '.join(report.problems)}", err=True)
        sys.exit(1)


@stream.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_stream_errors
def dump(file):
    """Every record for a person: configuration and HVM context decoded, runs of page
    records collapsed into counts.

    \b
    Example:
      hvm stream dump web1.hvm | less
    """
    from .engine import inspect as insp
    from .stream import CpuidPolicy, HvmState, MsrPolicy
    from .stream.pages import RawPageBatch
    lines = insp.Spool()    # all checked before anything is printed
    for first, n, pages, zero in insp.collapse(insp.Scan(file)):
        record = first.record
        if isinstance(record, RawPageBatch):
            lines.append(f"@{first.offset} {record.TYPE.name} x{n}: {record.space.name} "
                         f"{pages} pages ({zero} zero)")
            continue
        lines.append(f"@{first.offset} {record.TYPE.name} {insp.summary(record)}")
        if isinstance(record, HvmState):
            lines += insp.describe_state(record.state)
        elif isinstance(record, CpuidPolicy):
            lines += [f"    {f:#010x}.{i}: eax={a:08x} ebx={b:08x} ecx={c:08x} edx={d:08x}"
                      for f, i, _, a, b, c, d in record.entries]
        elif isinstance(record, MsrPolicy):
            lines += [f"    {index:#x}" + (f" = {value:#x} (feature)" if flags else "")
                      for index, flags, value in record.entries]
    for line in lines:
        click.echo(line)


# -- relocation (specs/relocation.md) -------------------------------------------

INSECURE_HELP = ("Plain TCP: no encryption and no authentication (anyone who can reach the port "
                 "can plant or read a guest). Only on a trusted link.")
tls_dir_option = click.option("--tls-dir", type=click.Path(file_okay=False), envvar="HVM_TLS_DIR",
                              help="Directory with ca.pem, cert.pem, key.pem (hvm host keygen); "
                                   "default $HVM_TLS_DIR.")


@hvm.group()
def host():
    """This host: its CPU, and as a relocation destination, keys and the daemon."""


@host.command(name="cpu")
@json_option
@_fail_cleanly
def host_cpu(as_json):
    """This host's CPU as KVM offers it: vendor, model, TSC frequency and scaling, and
    which CPU models it can run (specs/cpu-models.md).

    \b
    Example:
      hvm host cpu --json
    """
    from .cpu import this_host
    here = this_host()
    sig = here.signature
    family = (sig >> 8 & 0xF) + (sig >> 20 & 0xFF if (sig >> 8 & 0xF) == 0xF else 0)
    model = (sig >> 4 & 0xF) | ((sig >> 16 & 0xF) << 4 if (sig >> 8 & 0xF) in (6, 0xF) else 0)
    runnable = here.runnable_models()
    data = {"vendor": here.vendor, "signature": sig, "family": family, "model": model,
            "stepping": sig & 0xF, "tsc_khz": here.tsc_khz, "tsc_scaling": here.tsc_scaling,
            "msrs": len(here.msrs), "cpuid_leaves": len(here.cpuid),
            "models": {m: {"runs": not why, "why_not": why} for m, why in runnable.items()}}
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"vendor:       {here.vendor} (family {family:#x}, model {model:#x}, stepping {sig & 0xF})")
    click.echo(f"TSC:          {here.tsc_khz} kHz, scaling {'yes' if here.tsc_scaling else 'no (KVM_CAP_TSC_CONTROL missing)'}")
    click.echo(f"offers:       {len(here.cpuid)} CPUID leaves, {len(here.msrs)} saveable MSRs")
    for m, why in runnable.items():
        click.echo(f"model {m + ':':<9}{'runs here' if not why else 'cannot run here: ' + why}")


@host.command()
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Where the CA (ca.pem, ca-key.pem) and one TLS directory per host go.")
@click.option("--hosts", default=None, help="Comma-separated host names or addresses "
              "(default: this host's name). Each becomes DIR/HOST.")
@_fail_cleanly
def keygen(directory, hosts):
    """Make a small CA (or reuse the one in DIR) and a certificate and key per host.

    \b
    Example:
      hvm host keygen --dir /etc/hvm/pki --hosts node1,node2,10.0.0.7
      scp -r /etc/hvm/pki/node2 node2:/etc/hvm/tls    # then --tls-dir /etc/hvm/tls there
    """
    import socket as _socket
    from .host import tls
    names = [h.strip() for h in (hosts or _socket.gethostname()).split(",") if h.strip()]
    try:
        made = tls.keygen(directory, names)
    except tls.TlsError as exc:
        raise click.ClickException(str(exc)) from None
    for path in made:
        click.echo(f"{path}: ca.pem cert.pem key.pem")


@host.command()
@click.option("--listen", required=True, metavar="ADDR:PORT", help="Address to accept relocations on.")
@tls_dir_option
@click.option("--insecure", is_flag=True, help=INSECURE_HELP)
@click.option("--disk-map", "disk_map", multiple=True, metavar="SRC=DST",
              help="Accept a domain whose disk is SRC on the source, using DST here (repeatable).")
@click.option("--net-map", "net_map", multiple=True, metavar="SRC=DST",
              help="Accept a domain whose NIC is on bridge (or TAP device) SRC on the source, "
                   "putting it on bridge (or TAP device) DST here (repeatable).")
@click.option("--max-memory", type=SIZE, metavar="SIZE",
              help="Guest memory all domains on this host may hold together (e.g. 16G); "
                   "a relocation that would exceed it is refused at HELLO.")
@click.option("--hugepages", is_flag=True,
              help="Give incoming guests RAM of 2 MiB huge pages (reserved with sysctl "
                   "vm.nr_hugepages); one that does not fit in the free ones is refused at HELLO.")
@_fail_cleanly
def serve(listen, tls_dir, insecure, disk_map, net_map, max_memory, hugepages):
    """Accept incoming relocations and run each as a local domain (runs until stopped).

    \b
    Example:
      hvm host serve --listen 0.0.0.0:7410 --tls-dir /etc/hvm/tls
    """
    import logging
    import signal
    from .host import destination, tls
    from .host.source import parse_target
    if not insecure and not tls_dir:
        raise click.UsageError("--tls-dir (or $HVM_TLS_DIR) is required unless --insecure")
    addr, port = parse_target(listen)
    disks, nets = _map("disk", disk_map), _map("net", net_map)        # usage errors: before anything
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = destination.RelocationServer(destination.ServeConfig(
            addr, port, None if insecure else tls_dir, disks, net_map=nets, max_memory=max_memory,
            hugepages=hugepages))
    except (tls.TlsError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    if insecure:
        click.echo("WARNING: --insecure: " + INSECURE_HELP, err=True)
    click.echo(f"listening on {server.address[0]}:{server.address[1]} "
               f"({'plain TCP' if insecure else 'TLS 1.3, client certificates required'})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def _migrate_summary(name: str, target: str, s: dict) -> str:
    rounds = f"{s['rounds']} round{'s' if s['rounds'] != 1 else ''}"
    converged = ""
    if s.get("reason") and s["reason"] != "offline":
        converged = f" (switched over: {s['reason']}, estimated {s['downtime_estimate'] * 1000:.1f} ms"
        converged += f", throttle up to {s['throttle']}%)" if s.get("throttle") else ")"
    from .host.source import DESTINATION_PARTS, SOURCE_PARTS
    parts = s.get("downtime_parts", {})
    here = sum(parts.get(k, 0.0) for k in SOURCE_PARTS)
    there = sum(parts.get(k, 0.0) for k in DESTINATION_PARTS)
    arrived = ", paused there" if s.get("arrived") == "paused" else ""
    return (f"migrated {name} to {target}{arrived}: {s['seconds']:.2f} s total, downtime "
            f"{s['downtime'] * 1000:.1f} ms{_over_target(s)} (here {here * 1000:.1f}, there "
            f"{there * 1000:.1f}, messages {parts.get('link', 0.0) * 1000:.1f}; --json has the parts), "
            f"{_mb(s['bytes'])}, {rounds}{converged}, setup {s['setup'] * 1000:.0f} ms"
            + (f", {s['vcpus']} vCPUs stopped within {s['pause_skew'] * 1000:.2f} ms"
               if s.get("vcpus", 1) > 1 else ""))


def _writable_file(ctx, param, value):
    """A file the command will write at its end: checked before anything starts (its
    directory exists and is writable, and it is not a directory)."""
    if value is None:
        return None
    import os
    path = os.path.abspath(value)
    if os.path.isdir(path):
        raise click.BadParameter(f"{value!r} is a directory", ctx, param)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise click.BadParameter(f"directory {parent} does not exist", ctx, param)
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{value!r} is not writable", ctx, param)
    return path


@hvm.command()
@click.argument("name")
@click.argument("target", metavar="HOST:PORT")
@click.option("--offline", is_flag=True, help="Pause first and copy once (no pre-copy).")
@click.option("--channels", type=click.IntRange(0, 8), default=2, show_default=True,
              help="Data channels for the pages, each its own TLS connection (plain TCP with "
                   "--insecure; 0: all on the main connection).")
@click.option("--paused", is_flag=True,
              help="Leave the guest paused on the destination (like xl migrate -p); a guest "
                   "paused here always arrives paused.")
@tls_dir_option
@click.option("--insecure", is_flag=True, help=INSECURE_HELP)
@click.option("--stats-out", callback=_writable_file, metavar="FILE",
              help="Write the statistics, with one entry per round, as JSON to this file.")
@convergence_options("the guest keeps running here")
@compress_option
@json_option
@_fail_cleanly
def migrate(name, target, offline, channels, paused, tls_dir, insecure, stats_out, downtime_ms,
            max_bandwidth, timeout, on_timeout, throttle, compress, as_json):
    """Relocate a domain to the host daemon at HOST:PORT (live pre-copy, then a two-phase
    handoff); the domain is gone here once it runs there. It arrives in the state it
    left (running, or paused). A downtime over the target is always reported (a warning
    line, and "over_target" with --json). Exit 3 when the outcome is unknown: the guest
    is then kept paused here, and the message says what to do.

    \b
    Example:
      hvm migrate web1 node2:7410 --tls-dir /etc/hvm/tls
      hvm migrate web1 node2:7410 --max-bandwidth 100M --timeout 60s --throttle
    """
    from .host.source import migrate_domain, parse_target
    if not insecure and not tls_dir:
        raise click.UsageError("--tls-dir (or $HVM_TLS_DIR) is required unless --insecure")
    try:
        parse_target(target)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="HOST:PORT") from None
    bar = _ProgressLine(sys.stderr.isatty() and not as_json)
    try:
        reply = migrate_domain(name, target, live=not offline, tls_dir=tls_dir, channels=channels,
                               paused=paused, insecure=insecure, progress=bar, compress=compress,
                               **_convergence(downtime_ms, max_bandwidth, timeout, on_timeout, throttle))
    finally:
        bar.done()
    if not control.wait_gone(name):
        exits.warn(f"{name} is on {target} now, but its domain process here has not ended yet: "
                   f"'hvm list' shows what is left of it")
    if reply.get("interrupted"):
        exits.warn(f"interrupted too late to cancel: {name} had moved to {target}")
    if reply.get("input_left"):
        exits.warn(f"{reply['input_left']} bytes of console input still waiting for {name}'s UART did not "
                   f"move with it: they are lost")
    _warn_over_target(reply["stats"], "migrate")
    if stats_out:
        try:
            with open(stats_out, "w") as f:
                json.dump({"name": name, "target": target, **reply["stats"]}, f, indent=1)
        except OSError as exc:      # the move is done: a statistics file does not undo it
            exits.warn(f"could not write the statistics to {stats_out}: {exc.strerror or exc}")
    if as_json:
        click.echo(json.dumps({"name": name, "target": target, **reply}))
    else:
        click.echo(_migrate_summary(name, target, reply["stats"]))


if __name__ == "__main__":     # python -m migrate.cli
    hvm()
