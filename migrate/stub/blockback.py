"""The host block back end: serves the stub's block ring with pread/pwrite
on a raw disk image (specs/ioreq.md, "Block ring").  Every request is
checked: a bad one gets BLK_EINVAL, never a host exception."""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

from . import abi

log = logging.getLogger(__name__)
SECTOR = 512


class BlockBackend:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        if size < SECTOR:
            os.close(self.fd)
            raise ValueError(f"disk image {path} is smaller than one sector")
        self.capacity = size // SECTOR
        self.requests = 0
        self._flusher: ThreadPoolExecutor | None = None
        self._last_flush: Future | None = None      # the last start_flush's
        self._flush_error: OSError | None = None    # the first a start_flush met, not yet taken

    def close(self) -> None:
        if self._flusher is not None:   # a flush under way keeps its descriptor till it ends
            self._flusher.shutdown(wait=True)
            self._flusher = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        """fdatasync the image; OSError if it fails, or if a flush start_flush began failed
        and nobody took its error (the kernel reports a writeback error to one fdatasync
        only: it must not be lost in a thread)."""
        os.fdatasync(self.fd)
        self.raise_flush_error()

    def start_flush(self) -> Future:
        """An fdatasync of the image on a thread of the back end's own (one at a time, in
        order); its error is kept for :meth:`raise_flush_error`. For a pause, whose downtime
        need not wait for the disk while the state is captured and sent (specs/ioreq.md)."""
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, thread_name_prefix="disk-flush")
        self._last_flush = self._flusher.submit(self._flush_kept)
        return self._last_flush

    def flushed(self) -> None:
        """Wait for every flush start_flush began (they run in order), then raise the
        first error one met, if nobody has taken it yet."""
        if self._last_flush is not None:
            self._last_flush.result()
        self.raise_flush_error()

    def _flush_kept(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self._flush_error = self._flush_error or exc

    def raise_flush_error(self) -> None:
        """Raise (once) the first error a start_flush met since the last call, if any."""
        error, self._flush_error = self._flush_error, None
        if error is not None:
            raise error

    def serve(self, mem) -> None:
        """Answer every request between rsp_prod and the stub's req_prod."""
        req_prod, rsp_prod, _ = abi.BLK_HEADER.unpack_from(mem, abi.BLK_RING)
        if (req_prod - rsp_prod) & 0xFFFFFFFF > abi.BLK_RING_SIZE:
            log.error("block ring: producer %d is %d ahead of %d: ignored",
                      req_prod, req_prod - rsp_prod, rsp_prod)
            return
        while rsp_prod != req_prod:
            slot = rsp_prod % abi.BLK_RING_SIZE
            rid, sector, op, length, buf = abi.BLK_REQ.unpack_from(mem, abi.BLK_REQS + slot * abi.BLK_REQ.size)
            status = self._one(mem, sector, op, length, buf)
            abi.BLK_RSP.pack_into(mem, abi.BLK_RSPS + slot * abi.BLK_RSP.size, rid, status, 0)
            rsp_prod = (rsp_prod + 1) & 0xFFFFFFFF
            self.requests += 1
        mem[abi.BLK_RING + 4:abi.BLK_RING + 8] = rsp_prod.to_bytes(4, "little")

    def _one(self, mem, sector: int, op: int, length: int, buf: int) -> int:
        if op == abi.BLK_OP_FLUSH:
            try:
                self.flush()
            except OSError as exc:
                log.error("block back end %s: flush: %s", self.path, exc)
                return abi.BLK_EIO
            return abi.BLK_OK
        if (op not in (abi.BLK_OP_READ, abi.BLK_OP_WRITE) or length % SECTOR
                or not abi.BOUNCE <= buf <= buf + length <= abi.BOUNCE + abi.BOUNCE_SIZE
                or sector + length // SECTOR > self.capacity):
            log.error("block ring: bad request op=%d sector=%d len=%d buf=%#x", op, sector, length, buf)
            return abi.BLK_EINVAL
        view = memoryview(mem)[buf:buf + length]
        try:
            if op == abi.BLK_OP_READ:
                n = os.preadv(self.fd, [view], sector * SECTOR)
                if n < length:
                    view[n:] = bytes(length - n)
            else:
                if os.pwritev(self.fd, [view], sector * SECTOR) != length:
                    log.error("block back end %s: short write at sector %d", self.path, sector)
                    return abi.BLK_EIO
        except OSError as exc:
            log.error("block back end %s: %s", self.path, exc)
            return abi.BLK_EIO
        finally:
            view.release()
        return abi.BLK_OK
