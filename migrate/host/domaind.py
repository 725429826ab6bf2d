"""The domain process: owns one domain, serves its control socket.

Started by :func:`migrate.host.control.create_domain` as
``python -m migrate.host.domaind DIR CONFIG_MSGPACK_HEX READY_FD``.  It
boots the domain, reports ``ok`` or ``error: ...`` on the ready pipe, then
serves requests until it is told to destroy the domain or is signalled.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

import msgpack

from ..console import Console
from ..domain import Domain, DomainConfig, DomainError
from ..kvm import KvmError
from . import protocol, statedir

log = logging.getLogger("hvm.domaind")


class DomainServer:
    def __init__(self, directory: Path, domain: Domain, console_log):
        self.dir = directory
        self.domain = domain
        self.console_log = console_log
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(directory / statedir.SOCKET))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.running = True

    # -- requests ------------------------------------------------------------
    def op_info(self, req: dict) -> dict:
        dom, cfg = self.domain, self.domain.config
        return {"name": cfg.name, "workload": cfg.workload, "memory": cfg.memory,
                "vcpus": 1, "status": dom.status, "crash_reason": dom.crash_reason,
                "pid": os.getpid(), "uptime": round(time.time() - self.started, 3),
                "console_bytes": self.console_log.tell(), "args": list(cfg.args),
                "timer_hz": cfg.timer_hz}

    def op_pause(self, req: dict) -> dict:
        self.domain.pause()
        return {"status": self.domain.status}

    def op_unpause(self, req: dict) -> dict:
        self.domain.resume()
        return {"status": self.domain.status}

    def op_destroy(self, req: dict) -> dict:
        self.running = False
        return {"status": "destroyed"}

    def op_console(self, req: dict) -> dict:
        offset = req.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError("offset must be a non-negative integer")
        with open(self.dir / statedir.CONSOLE, "rb") as f:
            f.seek(offset)
            data = f.read(protocol.CONSOLE_CHUNK)
        return {"data": data, "next": offset + len(data), "status": self.domain.status}

    OPS = {"info": op_info, "pause": op_pause, "unpause": op_unpause,
           "destroy": op_destroy, "console": op_console}

    def handle(self, req: dict) -> dict:
        op = self.OPS.get(req.get("op"))
        if op is None:
            return {"ok": False, "error": f"unknown operation {req.get('op')!r}"}
        try:
            return {"ok": True, **op(self, req)}
        except (DomainError, KvmError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}

    # -- the loop ------------------------------------------------------------
    def serve(self) -> None:
        while self.running:
            for key, _ in self.sel.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                else:
                    self._serve_client(key.fileobj, key.data)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        conn.settimeout(5)
        self.sel.register(conn, selectors.EVENT_READ, protocol.unpacker())

    def _serve_client(self, conn: socket.socket, unpack) -> None:
        try:
            req = protocol.receive(conn, unpack)
            protocol.send(conn, self.handle(req))
        except (protocol.ProtocolError, OSError) as exc:
            if not isinstance(exc, protocol.ProtocolError) or str(exc) != "connection closed":
                log.warning("control connection dropped: %s", exc)
            self.sel.unregister(conn)
            conn.close()

    def close(self) -> None:
        self.domain.destroy()
        self.sel.close()
        self.listener.close()


def main(argv: list[str]) -> int:
    directory, config_hex, ready_fd = Path(argv[0]), argv[1], int(argv[2])
    # Double fork: the launcher reaps our parent at once and init adopts us,
    # so a domain never lingers as its launcher's zombie.
    if os.fork():
        os._exit(0)
    (directory / statedir.PIDFILE).write_text(f"{os.getpid()}\n")
    logging.basicConfig(filename=directory / statedir.LOGFILE, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ready = os.fdopen(ready_fd, "w")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    console_log = open(directory / statedir.CONSOLE, "ab", buffering=0)
    try:
        config = DomainConfig(**msgpack.unpackb(bytes.fromhex(config_hex), raw=False))
        domain = Domain.boot(config, Console(sink=console_log.write))
        server = DomainServer(directory, domain, console_log)
    except (DomainError, KvmError, OSError, ValueError) as exc:
        ready.write(f"error: {exc}\n")
        ready.close()
        return 1
    try:
        domain.resume()
        ready.write("ok\n")
        ready.close()
        log.info("domain %s running (%s, %d MiB)", config.name, config.workload, config.memory >> 20)
        server.serve()
    finally:
        server.close()
        for leaf in (statedir.SOCKET, statedir.PIDFILE, statedir.CONSOLE, statedir.LOGFILE):
            (directory / leaf).unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
