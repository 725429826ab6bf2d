"""The host block back end's flushes (migrate/stub/blockback.py): a flush run on its own
thread for a pause keeps its error until a later flush or the pause's waiter takes it, and
closing waits for a flush under way. Not marked kvm: no VM is needed."""
import errno
import os
import threading
import time

import pytest

from migrate.stub.blockback import BlockBackend


@pytest.fixture
def backend(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(64 << 10))
    b = BlockBackend(str(image))
    yield b
    b.close()


def test_a_failed_background_flush_is_said_by_the_next_flush_once(backend, monkeypatch):
    """The kernel reports a writeback error to one fdatasync only: if that one ran on the
    flush thread and nobody waited for it, the next flush (a guest's FLUSH, a pause) says it."""
    real, calls = os.fdatasync, []

    def fdatasync(fd):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    backend.start_flush().result()          # it failed, and kept its error
    assert calls[0].startswith("disk-flush")
    with pytest.raises(OSError, match="Input/output error"):
        backend.flush()
    backend.flush()                         # said once
    backend.raise_flush_error()
    assert len(calls) == 3


def test_close_waits_for_a_flush_under_way(backend, monkeypatch):
    """The descriptor is closed only after the flush on it has ended (else a flush could
    reach whatever file took its number)."""
    real, events = os.fdatasync, []

    def slow(fd):
        time.sleep(0.2)
        real(fd)                            # fails with EBADF if the descriptor went first
        events.append("flushed")

    monkeypatch.setattr(os, "fdatasync", slow)
    backend.start_flush()
    backend.close()
    events.append("closed")
    assert events == ["flushed", "closed"]
    backend.raise_flush_error()             # and it did not fail


def test_a_guest_flush_that_fails_is_answered_eio(backend, monkeypatch):
    """A FLUSH request whose fdatasync fails, or that follows a pause's flush that failed
    unseen, is answered EIO (specs/ioreq.md, "Block ring"): the guest hears of its lost
    writes, and the host's run loop is not broken by the error."""
    from migrate.stub import abi

    mem = bytearray(abi.BOUNCE + abi.BOUNCE_SIZE)
    real, fail = os.fdatasync, [True]

    def fdatasync(fd):
        if fail[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    def flush_request(n: int) -> int:
        abi.BLK_REQ.pack_into(mem, abi.BLK_REQS + (n % abi.BLK_RING_SIZE) * abi.BLK_REQ.size,
                              n, 0, abi.BLK_OP_FLUSH, 0, abi.BOUNCE)
        abi.BLK_HEADER.pack_into(mem, abi.BLK_RING, n + 1, n, 0)
        backend.serve(mem)
        rid, status, _ = abi.BLK_RSP.unpack_from(mem, abi.BLK_RSPS + (n % abi.BLK_RING_SIZE) * abi.BLK_RSP.size)
        assert rid == n
        return status

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert flush_request(0) == abi.BLK_EIO              # its own fdatasync failed
    backend.start_flush().result()                      # a pause's, failed, unseen
    fail[0] = False
    assert flush_request(1) == abi.BLK_EIO              # said to the guest's next FLUSH
    assert flush_request(2) == abi.BLK_OK
