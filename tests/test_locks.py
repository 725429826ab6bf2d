"""The OFD locks of disk images and partial save files (migrate.locks). No KVM needed."""
import os
import subprocess
import sys
import time

import pytest

from migrate.locks import INCOMING, WRITER, DiskBusy, DiskLock, held_elsewhere, holders, try_lock


def image(tmp_path, name="d.img"):
    path = tmp_path / name
    path.write_bytes(bytes(4096))
    return str(path)


def test_disk_lock_one_writer_and_one_incoming(tmp_path):
    path = image(tmp_path)
    first = DiskLock.for_domain(path)
    with pytest.raises(DiskBusy, match=f"disk image {path}: it is in use by process"):
        DiskLock.for_domain(path)
    incoming = DiskLock.for_incoming(path)          # a relocation of the writer's own guest
    with pytest.raises(DiskBusy, match="a relocation is being received into it"):
        DiskLock.for_incoming(path)
    first.release_writer()                          # the source lets go just before GO
    with pytest.raises(DiskBusy, match="a relocation is being received into it"):
        DiskLock.for_domain(path)                   # a new domain must wait for the relocation
    incoming.take_writer()                          # GO
    incoming.release_incoming()
    with pytest.raises(DiskBusy, match="it is in use by"):
        first.take_writer()                         # the old source cannot take it back
    incoming.close()
    first.take_writer()
    first.close()
    DiskLock.for_domain(path).close()
    assert not held_elsewhere(os.open(path, os.O_RDWR), WRITER)


def test_a_killed_holder_leaves_no_lock_and_holders_are_named(tmp_path):
    """The lock belongs to the open file: a process holding it is named (pid and command)
    and, once killed, holds nothing."""
    path = image(tmp_path)
    code = ("import sys, time; from migrate.locks import DiskLock; DiskLock.for_domain(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert any(h.endswith(f"(pid {holder.pid})") for h in holders(path, WRITER))
        assert holders(path, INCOMING) == []
        with pytest.raises(DiskBusy, match=rf"in use by process .*\(pid {holder.pid}\)"):
            DiskLock.for_domain(path)
    finally:
        holder.kill()
        holder.wait()
    DiskLock.for_domain(path).close()


def test_take_writer_waits_briefly(tmp_path):
    path = image(tmp_path)
    other = os.open(path, os.O_RDWR)
    assert try_lock(other, WRITER)
    lock = DiskLock.for_incoming(path)
    t0 = time.monotonic()
    with pytest.raises(DiskBusy):
        lock.take_writer(wait=0.2)
    assert 0.2 <= time.monotonic() - t0 < 1.0
    os.close(other)
    lock.take_writer(wait=0.2)
    lock.close()


def test_only_a_partial_no_save_holds_is_dropped(tmp_path):
    """What a save that lost its domain process leaves (control.save_domain): the partial
    file is removed only if no save holds it; one a save (still) writes stays."""
    from migrate.engine import drop_stale_partial, partial_path
    from migrate.engine.files import _create_partial
    path = tmp_path / "s.hvm"
    partial = partial_path(path)
    fd = _create_partial(path, partial)         # as a save that still writes holds it
    try:
        drop_stale_partial(path)
        assert partial.exists()
    finally:
        os.close(fd)
    drop_stale_partial(path)                    # the save is gone: nobody holds it
    assert not partial.exists()
    drop_stale_partial(path)                    # nothing there: nothing to do
