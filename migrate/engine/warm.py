"""The paths a pause runs in Python, run once before the pause on sample records.

A live save writes the state records (every HVM context record of the guest and the stub,
the stub's DEVICE_STATE, a relocation's CHANNELS, END) once per move, with the guest
paused; the receiving side reads and checks them once, inside the same downtime. A domain
process does that at most a few times in its life, so without this each pause paid
CPython's first-call costs: on the Intel hosts here the first DeviceState pack took 560 us
against 70 warm, the first framing of a VM's records 190 against 16-60, the first check of
their bodies 170 against 50-90 (lazy set-ups, caches and the interpreter's specialisation
of hot code, which comes after a code object's first runs). So a live save
(:func:`save_paths`, before its pre-copy) and a relocation's receiving process
(:func:`restore_paths`, once its domain is built) first run those paths on sample records
(:mod:`migrate.stream.sample`) through a writer and a reader of their own: nothing of it
reaches a stream or a domain. It costs 1-3 ms per call here, outside the downtime (an
offline move's receiver, whose source is paused before it sends anything, does not warm).
"""
from __future__ import annotations

import functools
import gc
import logging

from ..stream import DONE, Channels, Creator, DeviceState, HvmState, MemoryLayout, StreamReader, StreamWriter, Vm
from ..stream import DomainConfig as ConfigRecord
from ..stream.hvm import CODECS, PLATFORM_CODECS, HvmBodies
from ..stream.sample import sample_config, sample_cpu, sample_devices, sample_state
from ..stub import devstate
from .state import StateCollector

RUNS = 3        # the first run pays nearly all of it; two more let the interpreter specialise

log = logging.getLogger("hvm.warm")


@functools.cache
def _sample() -> tuple[list, dict, list[dict]]:
    """The records before the state, each VM's context records (one vCPU, every type)
    as bodies, and the stub's devices as a capture gives them (plain dicts)."""
    config = sample_config()
    head = [ConfigRecord(config), Creator("hvm-migrate warm-up"), *sample_cpu(Vm.GUEST), *sample_cpu(Vm.STUB),
            MemoryLayout.flat(Vm.GUEST, config["memory"] >> 12), MemoryLayout.flat(Vm.STUB, 2048)]
    bodies = {vm: HvmBodies.of(vm, [HvmState(t, vm, None if t in PLATFORM_CODECS else 0, sample_state(t, t + vm))
                                    for t in CODECS])
              for vm in (Vm.GUEST, Vm.STUB)}
    devices = [{"device": d.device, "instance": d.instance, "version": d.version,
                "min_version": d.min_version, "fields": d.fields} for d in sample_devices()]
    return head, bodies, devices


def _write() -> bytes:
    """A whole throwaway stream whose state is written as a save's pause writes it."""
    head, bodies, devices = _sample()
    encoded = _encoder().bodies(devstate.build(devices))       # the stub's share of a capture
    writer = StreamWriter()
    out = [writer.start(), *(writer.record(record) for record in head)]
    for vm in (Vm.GUEST, Vm.STUB):
        out.append(writer.hvm_bodies(bodies[vm]))
    out.append(writer.device_bodies(encoded))
    out.append(writer.record(Channels(((1, 1, 0, 0, bytes(16)), (1, 1, 0, 0, bytes(16))))))
    out.append(writer.finish())
    return b"".join(out)


@functools.cache
def _encoder() -> devstate.Encoder:
    return devstate.Encoder()


@functools.cache
def _stream() -> bytes:
    return _write()


def save_paths(runs: int = RUNS) -> None:
    """Run a save's state paths ``runs`` times (a writer of its own). Never raises: only
    an optimisation, which must not fail a save (it logs why it could not run)."""
    try:
        for _ in range(runs):
            _write()
    except Exception as exc:
        log.warning("warming a save's state paths failed: %s", exc)


def restore_paths(runs: int = RUNS) -> None:
    """Run a restore's state paths ``runs`` times (a reader and collectors of its own):
    the records read and checked as a restore reads them, collected, and given back as a
    domain would apply them. Never raises, as :func:`save_paths`."""
    try:
        _read(runs)
    except Exception as exc:
        log.warning("warming a restore's state paths failed: %s", exc)


def _read(runs: int) -> None:
    data = _stream()
    config = _Config()
    for _ in range(runs):
        reader = StreamReader(raw_pages="bodies", hvm_bodies=True)
        reader.feed(data)
        collectors = {Vm.GUEST: StateCollector(), Vm.STUB: StateCollector("stub")}
        while (record := reader.next_record()) is not DONE:
            if isinstance(record, HvmState):
                collectors[record.vm].add(record)
            elif isinstance(record, DeviceState):
                devstate.binary_size({"fields": record.fields})
        for vm, collector in collectors.items():
            collector.records(config, vm)


class _Config:
    """What StateCollector.records asks of a domain's configuration."""
    vcpus = 1


class GcHold:
    """Python's cyclic garbage collector held off through a downtime: a collection that
    falls in it stalls the pause for its length (a generation-0 collection inside a traced
    pause took 0.36 ms, in 1 of 10 pauses; AMD host, 2026-12-06). :meth:`hold` turns it
    off if it was on; :meth:`release` turns it back on (idempotent). Objects freed by
    their reference counts are freed as always; only cycles wait until the release."""

    def __init__(self) -> None:
        self.held = False

    def hold(self) -> None:
        if not self.held and gc.isenabled():
            gc.disable()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            gc.enable()

