"""The handoff connection at the destination (specs/relocation.md, "Handoff connection"):
the receiving domain process's own link to the source, over which RESTORED, GO and
RUNNING pass without the daemon in between.

The daemon reads the connection's plain preamble and hands the socket, as it is, to the
receiving domain process on a unix socket (SCM_RIGHTS). :class:`HandoffIntake` takes it
there on a thread of its own while the stream is restored: TLS (the daemon's keys, a
client certificate from the CA required; none with ``--insecure``), then the source's
HANDOFF frame, whose token must be the relocation's. At the end of the restore
:meth:`HandoffIntake.link` gives the connection, or says why there is none.
"""
from __future__ import annotations

import hmac
import socket
import ssl
import threading

from .channel import HANDSHAKE_TIMEOUT, Channel, ChannelError
from . import tls


class HandoffError(Exception):
    """No usable handoff connection (its text says why)."""


class HandoffIntake:
    """``fds``: the unix socket the connection comes on; ``token``: the relocation's
    (WELCOME's ``channel_token``); ``tls_dir``: the daemon's keys, or None for plain TCP."""

    def __init__(self, fds: socket.socket, token: bytes, tls_dir: str | None):
        self.fds, self.token, self.tls_dir = fds, token, tls_dir
        self.channel: Channel | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._take, name="handoff-intake", daemon=True)
        self.thread.start()

    def _take(self) -> None:
        sock = None
        try:
            _, fds, _, _ = socket.recv_fds(self.fds, 16, 1)
            if not fds:
                raise HandoffError("the daemon gave no handoff connection")
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(True)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            if self.tls_dir is not None:
                sock = tls.server_context(self.tls_dir).wrap_socket(sock, server_side=True)
            channel = Channel(sock)
            hello = channel.expect("HANDOFF", HANDSHAKE_TIMEOUT)
            if not hmac.compare_digest(hello["token"], self.token):
                raise HandoffError("its token is not this relocation's")
            self.channel = channel
        except (OSError, ssl.SSLError, ChannelError, HandoffError, tls.TlsError) as exc:
            self.error = str(exc)
            if sock is not None:
                sock.close()
        finally:
            self.done.set()

    def link(self, timeout: float) -> Channel:
        """The connection, once its TLS and token are done (HandoffError if they failed,
        or no connection came within ``timeout`` seconds)."""
        if not self.done.wait(timeout):
            raise HandoffError(f"no handoff connection within {timeout:g}s")
        if self.channel is None:
            raise HandoffError(f"handoff connection: {self.error}")
        return self.channel

    def close(self) -> None:
        """Stop waiting for the connection (the connection itself is the caller's once given)."""
        try:
            self.fds.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(HANDSHAKE_TIMEOUT)
        self.fds.close()


__all__ = ["HandoffError", "HandoffIntake"]
