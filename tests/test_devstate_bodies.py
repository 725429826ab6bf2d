"""The stub's device state straight to DEVICE_STATE bodies in C (devstate.Encoder, a save's
pause runs it) against the slow way (devstate.parse, then DeviceState.pack: the writer's
own check as a reader decodes): the same bytes for every buffer both take, and a refusal
with the slow way's reason for every buffer either refuses."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.stream import DeviceBodies, DeviceState, StreamWriter, Vm
from migrate.stream.records import MemoryLayout
from migrate.stream.sample import sample_config
from migrate.stream import DomainConfig as ConfigRecord
from migrate.stub import abi, devstate
from migrate.stub.devstate import DeviceStateError, Encoder

ENCODER = Encoder()

names = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=23)
values = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1]),
    st.binary(max_size=300),
    st.sampled_from([b"", bytes(255), bytes(256), bytes(4000)]),
)


@st.composite
def device(draw):
    version = draw(st.integers(1, (1 << 32) - 1))
    return {"device": draw(names), "instance": draw(st.integers(0, (1 << 32) - 1)), "version": version,
            "min_version": draw(st.integers(1, version)),
            "fields": draw(st.dictionaries(names, values, max_size=20))}


def padded(blob: bytes) -> bytes:
    return blob + bytes(abi.STATE_SIZE - len(blob))


def slow(buf: bytes):
    """DeviceBodies the slow way, or the error it raises (as the encoder words it)."""
    try:
        return DeviceBodies.of(devstate.parse(buf))
    except DeviceStateError as exc:
        return str(exc)
    except ValueError as exc:
        return str(exc)


def fast(buf: bytes):
    try:
        return ENCODER.bodies(buf)
    except DeviceStateError as exc:
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(device(), max_size=6))
def test_the_same_bodies_as_the_slow_way(devices):
    try:
        blob = devstate.build(devices)
    except DeviceStateError:
        return                              # does not fit the buffer
    ours = ENCODER.bodies(padded(blob))
    assert ours == DeviceBodies.of(devstate.parse(blob))
    assert [r.fields for r in ours.records()] == [d["fields"] for d in devices]


@settings(max_examples=500, deadline=None)
@given(st.lists(device(), min_size=1, max_size=3), st.data())
def test_the_same_verdict_on_damaged_buffers(devices, data):
    """Bytes overwritten, a length cut, a version rule broken, a name repeated: either
    both take the buffer and give the same bodies, or both refuse it with one reason."""
    try:
        blob = bytearray(devstate.build(devices))
    except DeviceStateError:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, blob[at] ^ 1, blob[at] + 8 & 0xFF]))
    buf = padded(bytes(blob))
    assert fast(buf) == slow(buf)


@pytest.mark.parametrize("version, min_version", [(3, 0), (3, 4)])
def test_a_version_rule_broken_is_refused_with_the_writers_reason(version, min_version):
    blob = devstate.build([{"device": "uart16550a", "instance": 0, "version": version,
                            "min_version": min_version, "fields": {"lcr": 3}}])
    with pytest.raises(DeviceStateError, match="writer refuses: DEVICE_STATE versions must satisfy"):
        ENCODER.bodies(padded(blob))


def test_a_repeated_field_name_is_refused():
    blob = bytearray(devstate.build([{"device": "d", "instance": 0, "version": 1, "min_version": 1,
                                      "fields": {"a": 1, "b": 2}}]))
    second = devstate.HEADER.size + devstate.REC.size + devstate.FIELD.size + 8
    blob[second:second + 2] = b"a\0"
    with pytest.raises(DeviceStateError, match="duplicate"):
        ENCODER.bodies(padded(bytes(blob)))


def test_the_writer_frames_them_as_it_frames_records():
    """StreamWriter.device_bodies: the bytes writer.record gives each DeviceState, and the
    same ordering rules (after the stub's layout, each device.instance once)."""
    devices = [{"device": "uart16550a", "instance": i, "version": 2, "min_version": 1,
                "fields": {"lcr": 3, "fifo": bytes(range(16))}} for i in range(2)]
    config = sample_config()

    def writer():
        w = StreamWriter()
        w.start()
        w.record(ConfigRecord(config))
        w.record(MemoryLayout.flat(Vm.GUEST, config["memory"] >> 12))
        w.record(MemoryLayout.flat(Vm.STUB, 2048))
        return w
    bodies = ENCODER.bodies(padded(devstate.build(devices)))
    one, other = writer(), writer()
    assert one.device_bodies(bodies) == b"".join(other.record(DeviceState(**d)) for d in devices)
    assert one.finish() == other.finish()                 # the same counts and digest
    again = writer()
    again.device_bodies(bodies)
    with pytest.raises(ValueError, match=r"DEVICE_STATE uart16550a.0 appears twice"):
        again.device_bodies(DeviceBodies(bodies.keys[:1], bodies.bodies[:1]))
    early = StreamWriter()
    early.start()
    early.record(ConfigRecord(config))
    with pytest.raises(ValueError, match="writer refuses"):
        early.device_bodies(bodies)                     # before the stub's MEMORY_LAYOUT


def test_a_buffer_longer_than_the_state_buffer_is_read_as_parse_reads_it():
    blob = devstate.build([{"device": "d", "instance": 0, "version": 1, "min_version": 1, "fields": {}}])
    assert ENCODER.bodies(padded(blob) + b"\xff" * 64) == DeviceBodies.of(devstate.parse(blob))
    header = struct.pack("<IIII", devstate.MAGIC, abi.STATE_SIZE + 8, 0, devstate.VERSION)
    assert fast(header + bytes(abi.STATE_SIZE)) == slow(header + bytes(abi.STATE_SIZE))
