"""The source side of a relocation (specs/relocation.md): runs inside the domain's own
process (the engine's save needs the vCPU ioctls of that process), asked by
``hvm migrate`` through the ``migrate`` operation of its control socket.

Connect (TLS 1.3, mutual), HELLO / WELCOME, the engine's save into DATA frames (live
pre-copy unless offline), STREAM_END, then the handoff: RESTORED -> GO -> RUNNING. Before
GO every failure resumes the source (if it was running) and raises
:class:`RelocationError`; so does an ERROR answering GO that says the destination's copy
never ran (``not_resumed``); any other end after GO leaves the source paused and raises
:class:`OutcomeUnknown`. The errors say what failed; the caller (the domain process) adds
where the guest is. A guest paused at the source arrives paused (GO ``paused``), as does
any with ``paused`` asked. A disk image's lock (:mod:`migrate.locks`) is let go just
before GO and taken back if the source resumes after all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import select
import os
import socket
import ssl
import threading
import time
from pathlib import Path

from ..config import DomainStatus
from ..engine import PAUSED_PHASES, Convergence, SaveCancelled, SaveError, SaveTimeout, save
from ..engine.sinks import DEFAULT_COMPRESSION
from .. import dataplane, trace
from ..engine.channels import ChannelSink
from ..engine.sinks import RelaySink
from ..engine.state import cpu_bodies, domain_cpus
from ..engine.warm import GcHold
from ..locks import DiskBusy
from ..stream import FORMAT_VERSION
from . import learned, tls
from .protocol import convergence_from_request, convergence_request
from .channel import (
    CHANNEL_MAGIC, CHANNEL_PREAMBLE, DEFAULT_CHANNELS, FRAME_TIMEOUT, MAX_GRANTED_CHANNELS, PROTO,
    RESTORED_TIMEOUT, RUNNING_TIMEOUT, SYNC_TIMEOUT, WELCOME_TIMEOUT,
    Channel, ChannelError, DataBuffer, PeerError, ready,
)

CONNECT_TIMEOUT = 10.0
# the downtime parts (specs/relocation.md, section 7), in the order they happen
SOURCE_PARTS = ("stop", "capture", "state", "pages", "end")
DESTINATION_PARTS = ("read", "apply", "answer", "resume")
DOWNTIME_PARTS = SOURCE_PARTS + DESTINATION_PARTS + ("link",)
log = logging.getLogger("hvm.relocate")


class RelocationError(Exception):
    """The relocation failed before GO: the source domain keeps running (or paused, as it was)."""


class OutcomeUnknown(RelocationError):
    """GO was sent and RUNNING did not arrive: the source stays paused."""


def net_attachment(net: dict | None) -> dict | None:
    """What HELLO says of a NIC: its link kind and the name of what it hangs on here."""
    return None if net is None else {"link": net["link"], "name": net["name"]}


def parse_target(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6ADDR]:PORT'."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class MigrateJob:
    """A ``migrate`` request: ``host``, ``port``, ``live`` (bool), ``tls_dir`` (absolute
    path) or ``insecure`` true, ``paused`` (bool: leave the guest paused there); optionally
    the CONVERGENCE_KEYS (``downtime_ms``, ``max_bandwidth`` bytes/s, ``precopy_timeout`` s,
    ``on_timeout``, ``throttle``, ``compress``). ``disk_lock``: the domain's disk image lock,
    set by the domain process that runs the job."""

    def __init__(self, host: str, port: int, live: bool, tls_dir: str | None, insecure: bool,
                 convergence: Convergence | None = None, compress: int | str | None = DEFAULT_COMPRESSION,
                 channels: int = DEFAULT_CHANNELS, paused: bool = False):
        self.host, self.port, self.live = host, port, live
        self.tls_dir, self.insecure = tls_dir, insecure
        self.convergence = convergence or Convergence()
        self.compress = compress
        self.channels = channels
        self.paused = paused
        self.disk_lock = None
        self.learned: Path | None = None     # where past moves' fixed parts are kept (learned.py)
        self.go_sent = False

    @classmethod
    def from_request(cls, req: dict) -> "MigrateJob":
        host, port = req.get("host"), req.get("port")
        live, tls_dir, insecure = req.get("live", True), req.get("tls_dir"), req.get("insecure", False)
        paused = req.get("paused", False)
        if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("migrate needs a host and a port")
        if not isinstance(live, bool) or not isinstance(insecure, bool) or not isinstance(paused, bool):
            raise ValueError("live, insecure and paused must be booleans")
        if not insecure and (not isinstance(tls_dir, str) or not os.path.isabs(tls_dir)):
            raise ValueError("migrate needs an absolute tls_dir, or insecure")
        conv, compress = convergence_from_request(req, "migrate")
        channels = req.get("channels", DEFAULT_CHANNELS)
        if not isinstance(channels, int) or isinstance(channels, bool) or \
                not 0 <= channels <= MAX_GRANTED_CHANNELS:
            raise ValueError(f"migrate: bad channels (0..{MAX_GRANTED_CHANNELS})")
        return cls(host, port, live, tls_dir, insecure, conv, compress, channels, paused)

    # -- the steps -------------------------------------------------------------
    def connect(self, setup: "_CancelWatch | None" = None) -> Channel:
        where = f"{self.host}:{self.port}"
        ctx = None if self.insecure else _client_context(self.tls_dir)
        try:
            raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except (OSError, ValueError) as exc:        # ValueError: a name IDNA cannot encode ("a..b")
            raise RelocationError(f"cannot connect to {where}: {getattr(exc, 'strerror', None) or exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw
        try:
            if ctx is not None:     # the TLS socket takes the descriptor over: it is the one to shut
                sock = ctx.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
            if setup is not None:
                setup.add(sock)
            if ctx is not None:
                sock.do_handshake()         # within CONNECT_TIMEOUT in all (the socket's timeout)
        except (ssl.SSLError, OSError) as exc:
            if setup is not None:
                setup.discard(sock)
            sock.close()
            hint = (" (the peer closed the connection during the handshake: does it run with "
                    "--insecure?)" if isinstance(exc, ssl.SSLEOFError) else "")
            raise RelocationError(f"TLS handshake with {where} failed: {exc}{hint}") from None
        return Channel(sock)

    def run(self, domain, progress=None, cancel: threading.Event | None = None,
            before_go=None) -> dict:
        """Relocate ``domain``; its statistics on success (the caller destroys the domain).
        ``before_go()``, called just before GO, may raise (SaveError) to cancel there; it
        is also called every CHECK_EVERY seconds during the set-up, where raising (the
        client went away: Ctrl-C) cancels as ``cancel`` does."""
        t0 = time.monotonic()
        was_running = domain.status is DomainStatus.RUNNING
        cancels = _CancelWatch(cancel, f"{self.host}:{self.port}", before_go)
        ch = sink = limit = outputs = None
        links: list[socket.socket] = []
        gc_hold = GcHold()      # a live save holds collections off from its pause on
        try:
            with cancels.steps():
                ch = self.connect(cancels)
                welcome = self.hello(ch, domain)
                token = self.open_channels(welcome, links, cancels)
                outputs = self.channel_outputs(links, token) if links else None
            cancels.end_setup()     # from here on the save watches the cancel (and stops its sink)
            out = DataBuffer(ch)
            sink = ChannelSink(out.write, out.flush, outputs) if links else RelaySink(out.write, out.flush)
            handoff = outputs[0] if links and welcome.get("handoff") is True else None
            outputs = None      # the sink's now
            limit = _PauseLimit(ch, sink)
            return self._stream_and_handoff(domain, ch, t0, time.monotonic() - t0, was_running, progress,
                                            cancel, links, out, sink, before_go, gc_hold, limit, cancels,
                                            handoff)
        except RelocationError:
            raise
        except Exception as exc:        # nothing above foresaw it (a bug): say where the guest is
            log.exception("relocation to %s:%d failed unexpectedly", self.host, self.port)
            _logging_off(domain)        # kept paused or resumed, it may run here again
            if self.go_sent:
                raise self._unknown(domain, exc) from None
            if was_running and domain.status is DomainStatus.PAUSED:
                domain.resume()
            raise RelocationError(f"relocation to {self.host}:{self.port} failed: internal error: "
                                  f"{type(exc).__name__}: {exc}") from None
        finally:
            cancels.stop()              # first: nothing is shut down after this
            if limit is not None:
                limit.stop()            # likewise (it waits for a shutting down under way)
            gc_hold.release()           # after the handoff: RESTORED's answer waited on none
            if sink is not None:
                sink.close()            # after the handoff: freeing the data plane is no downtime
            for output in outputs or ():
                output.close()
            for sock in links:
                sock.close()
            if ch is not None:
                ch.close()

    def hello(self, ch: Channel, domain) -> dict:
        """HELLO, and the destination's WELCOME (checked), or RelocationError."""
        cfg = domain.config
        try:
            ch.send("HELLO", proto=PROTO, stream_versions=[FORMAT_VERSION], name=cfg.name,
                    memory=cfg.memory, stub=bool(cfg.stub), disk=cfg.disk, live=self.live,
                    cpu=cpu_bodies(domain_cpus(domain)), net=net_attachment(cfg.net),
                    channels=self.channels, vcpus=cfg.vcpus, **({"handoff": True} if self.channels else {}))
            welcome = ch.expect("WELCOME", WELCOME_TIMEOUT)
        except PeerError as exc:
            raise RelocationError(f"{self.host}:{self.port} refused: {exc}") from None
        except ChannelError as exc:
            raise RelocationError(f"{self.host}:{self.port} did not welcome us: {exc}") from None
        if welcome["proto"] != PROTO:
            raise RelocationError(f"{self.host}:{self.port} speaks protocol {welcome['proto']}, "
                                  f"not {PROTO}")
        if welcome["stream_version"] != FORMAT_VERSION:
            raise RelocationError(f"{self.host}:{self.port} asks for stream version "
                                  f"{welcome['stream_version']}; this host writes {FORMAT_VERSION}")
        return welcome

    def open_channels(self, welcome: dict, links: list, setup: "_CancelWatch | None" = None) -> bytes:
        """The data channels WELCOME granted (specs/relocation.md, "Data channels"): TCP
        connections to the daemon's address, each opening with its preamble, appended to
        ``links`` (the caller closes them, failing or not); their TLS handshakes happen in
        the data plane. Returns the channels' token. Refusals and failures are
        RelocationError."""
        granted = welcome.get("channels", 0)
        if not granted:
            return b""
        channel_id, token = welcome.get("channel_id"), welcome.get("channel_token")
        if not (isinstance(granted, int) and not isinstance(granted, bool) and 0 < granted <= self.channels
                and isinstance(channel_id, bytes)
                and len(channel_id) == 16 and isinstance(token, bytes) and len(token) == 32
                and isinstance(welcome.get("handoff", False), bool)):
            raise RelocationError(f"{self.host}:{self.port} granted channels badly: {granted!r}")
        try:
            for index in range(granted):
                sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
                links.append(sock)
                if setup is not None:
                    setup.add(sock)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(CHANNEL_PREAMBLE.pack(CHANNEL_MAGIC, channel_id, index, 0))
                sock.settimeout(None)       # the data plane sets its own timeouts
        except (OSError, ValueError) as exc:
            raise RelocationError(f"cannot open data channel {len(links)} to {self.host}:{self.port}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        return token

    def channel_outputs(self, links: list[socket.socket], token: bytes) -> list:
        """A data plane Output per channel, TLS started and the channel header written: the
        channels side by side, each on a thread of its own (the handshakes run in C, without
        the GIL), so that they take one handshake's time, and one handshake's limit in all,
        not one after the other."""
        outputs: list = [None] * len(links)
        errors: list[tuple[int, Exception]] = []       # in the order they came: the first says why
        tls_ctx = None

        def start(index: int, sock: socket.socket) -> None:
            try:
                out = outputs[index] = dataplane.Output(sock.fileno(), tls_ctx, self.host, FRAME_TIMEOUT,
                                                        dataplane.HANDSHAKE)
                out.channel_header(FORMAT_VERSION, index, token)
            except Exception as exc:            # a bug included: said, not lost on the thread
                errors.append((index, exc))
                for other in links:             # the move fails: the others need not finish
                    if other is not sock:
                        _shut(other)
        try:
            tls_ctx = None if self.insecure else dataplane.TlsContext(False, self.tls_dir)
            threads = [threading.Thread(target=start, args=(index, sock), name=f"channel-{index}")
                       for index, sock in enumerate(links)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except dataplane.DataplaneError as exc:         # the TLS context
            errors.append((0, exc))
        finally:
            if tls_ctx is not None:
                tls_ctx.close()
        if errors:
            for out in outputs:
                if out is not None:
                    out.close()
            index, exc = errors[0]
            raise RelocationError(f"data channel {index} to {self.host}:{self.port}: {exc}") from None
        return outputs

    def _stream_and_handoff(self, domain, ch, t0, setup, was_running, progress, cancel, links,
                            out, sink, before_go, gc_hold, limit: "_PauseLimit",
                            cancels: "_CancelWatch", handoff=None) -> dict:
        where = f"{self.host}:{self.port}"
        watch = _LinkWatch(ch, sink)
        at: dict[str, float] = {}
        conv = self.convergence
        if self.learned is not None and self.live:     # what the state and the handoff took there lately
            fixed = learned.expected(self.learned, where, conv.state_seconds, conv.downtime)
            conv = dataclasses.replace(conv, state_seconds=fixed)

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise SaveCancelled("cancelled while the destination placed a round")

        def after_round() -> float:
            """SYNC after each pre-copy round (specs/relocation.md): the destination places
            everything sent so far, so the pause covers only the last dirty pages and the
            state, not a backlog; how long that took is the lag the downtime estimate adds."""
            sink.flush()
            t = time.monotonic()
            with watch.held():              # SYNCED is the answer, not a failure
                if links:
                    ch.send("SYNC", bytes=out.sent, round=sink.round)
                else:
                    ch.send("SYNC", bytes=out.sent)
                _expect(ch, "SYNCED", SYNC_TIMEOUT, check_cancel)
            return time.monotonic() - t

        def on_end(stats) -> None:
            watch.stop()                    # RESTORED or ERROR comes next: the main thread reads it
            out.flush()
            ch.send("STREAM_END", bytes=stats.stream_bytes)
            at["final"] = time.monotonic()

        def report(stats) -> None:
            # Live, none from the pause on: a report inside the downtime, or the save's last one
            # right after STREAM_END, took CPU (its statistics, and their reader, the client)
            # that the destination needed then (a loopback move shares two cores); the
            # relocation's answer carries the statistics, and the check that the client is
            # still there is made just before GO (before_go)
            if progress is not None and not (self.live and stats.phase in PAUSED_PHASES):
                progress(stats)

        try:
            try:
                stats = save(domain, sink, live=self.live, stats_cb=report, cancel=cancel,
                             compress=self.compress, convergence=conv,
                             after_round=after_round, on_end=on_end, keep_dirty_logging=self.live,
                             gc_hold=gc_hold,          # a guest paused here has no downtime to bound
                             on_pause=limit.arm if self.live and was_running else None)
            finally:
                watch.stop()
                cancels.stop()      # RESTORED's wait looks for a cancel itself (before_go)
        except Exception as exc:
            if not limit.stop():        # the limit cut the links: that is why it failed
                raise limit.error(where) from None
            raise _stream_failed(ch, exc, where) from None
        paused_at = stats.start_time + stats.pause_offset
        try:
            # RESTORED, or READY on data channel 0 first (RESTORED then comes after GO)
            restored, handoff = _await_restored(ch, handoff, RESTORED_TIMEOUT, before_go)
            trace.mark("S RESTORED read" if restored is not None else "S READY read")
            if not limit.stop():
                raise ChannelError("the pause limit ran out")
            if before_go is not None:
                before_go()
        except (ChannelError, SaveError) as exc:
            _logging_off(domain)
            if was_running:
                domain.resume()
            if not limit.stop():
                raise limit.error(where) from None
            if isinstance(exc, SaveError):          # cancelled: the destination drops its copy
                ch.send_error(f"the source cancelled the relocation: {exc}", linger=1.0)
                raise RelocationError(f"relocation to {where} cancelled before the handoff") from None
            raise RelocationError(f"relocation to {where} failed before the handoff: "
                                  f"{_peer_reason(ch, exc)}") from None
        restored_at = time.monotonic()
        ready_read = restored is None           # else READY is still to be read on channel 0
        stay_paused = self.paused or not was_running
        try:
            if self.disk_lock is not None:      # the destination takes it on GO
                self.disk_lock.release_writer()
            self.go_sent = True         # from here on a failure leaves the outcome unknown
            if handoff is not None:     # GO on channel 0 first, then as ever
                try:
                    handoff.go(stay_paused)
                except dataplane.DataplaneError as exc:
                    log.warning("%s: GO goes on the control connection only", exc)
            ch.send("GO", paused=stay_paused)
            trace.mark("S GO sent")
            if restored is None:
                restored = ch.expect("RESTORED", RESTORED_TIMEOUT)
            running = ch.expect("RUNNING", RUNNING_TIMEOUT)
            trace.mark("S RUNNING read")
        except ChannelError as exc:     # PeerError included
            # the receiving domain process answers on channel 0 too, whichever way GO came:
            # what the daemon could not say (it died, the link did), it may have
            not_resumed = isinstance(exc, PeerError) and exc.not_resumed
            answer = None
            if handoff is not None and not not_resumed:
                answer = _channel_answer(handoff, ready_read, RUNNING_TIMEOUT)
            if answer in ("running", "paused"):
                log.warning("relocation to %s: %s after GO, but the destination's copy answered %r on "
                            "data channel 0", where, exc, answer)
                restored, running = restored or {}, {"paused": answer == "paused"}
            else:
                _logging_off(domain)
                if answer != "refused" and not not_resumed:
                    raise self._unknown(domain, exc) from None
                self._take_disk_back(exc)   # the destination's copy never ran and is gone
                if was_running:
                    domain.resume()
                said = "its copy never ran (data channel 0); " if answer == "refused" else ""
                raise RelocationError(f"relocation to {where} failed at the handoff: destination: "
                                      f"{said}{exc}") from None
        running_at = time.monotonic()
        arrived = "paused" if running.get("paused") is True else "running"
        final_at = at["final"]
        parts = _downtime_parts(stats.downtime_parts, restored_at - final_at, running_at - restored_at,
                                restored, running)
        downtime = running_at - paused_at - parts.pop("return", 0.0)
        target = self.convergence.downtime if self.live else None
        measured = learned.fixed_part(downtime, stats.downtime_estimate, conv.state_seconds)
        if self.learned is not None and measured is not None and learned.from_move(stats) and \
                learned.worth_keeping(downtime, stats.downtime_estimate, conv.state_seconds):
            learned.record(self.learned, where, measured)           # None offline: no estimate
        return {
            "seconds": running_at - t0, "setup": setup,
            "downtime": downtime, "downtime_target": target,
            "over_target": target is not None and downtime > target,
            "downtime_final": final_at - paused_at,
            "downtime_restore": restored_at - final_at,
            "downtime_resume": running_at - restored_at,
            "downtime_parts": parts,
            "destination_seconds": seconds if isinstance(seconds := restored.get("seconds"), (int, float))
            and 0 <= seconds < math.inf else None,
            "bytes": stats.stream_bytes, "rounds": stats.rounds, "live": self.live,
            "rounds_detail": _rounds(stats, stats.start_time, final_at),
            "reason": stats.reason, "downtime_estimate": stats.downtime_estimate,
            "downtime_fixed": conv.state_seconds, "downtime_fixed_measured": measured,
            "throttle": max(stats.throttle_history, default=0),
            "vcpus": stats.vcpus, "pause_skew": stats.pause_skew,
            "arrived": arrived,
            "save": stats.as_dict(),
        }

    def _take_disk_back(self, exc: Exception) -> None:
        """After GO, the destination's copy never ran: take the disk image lock back
        before resuming here; if someone else took the image meanwhile, stay paused."""
        if self.disk_lock is None:
            return
        try:
            self.disk_lock.take_writer(wait=1.0)
        except DiskBusy as busy:
            raise RelocationError(f"relocation to {self.host}:{self.port} failed at the handoff "
                                  f"(destination: {exc}), and the guest cannot resume here: {busy}") from None


    def _unknown(self, domain, exc: Exception) -> "OutcomeUnknown":
        name = domain.config.name
        return OutcomeUnknown(
            f"outcome unknown: GO was sent to {self.host}:{self.port} but RUNNING did not arrive "
            f"({exc}); the guest may be running on {self.host}. {name} is kept paused here: "
            f"check there, then either 'hvm destroy {name}' or 'hvm unpause {name}' here")


def _stream_failed(ch: Channel, exc: Exception, where: str) -> "RelocationError":
    """What to raise for a stream that failed with ``exc``; the engine has resumed the
    domain here, and a cancel or a timeout tells the destination to drop its copy."""
    if isinstance(exc, RelocationError):
        return exc
    if isinstance(exc, SaveTimeout):            # dirty logging off, the domain running
        ch.send_error(f"the source cancelled the relocation: {exc}", linger=1.0)
        return RelocationError(f"relocation to {where} cancelled: {exc}")
    if isinstance(exc, SaveCancelled):          # the user, or hvm destroy
        ch.send_error(f"the source cancelled the relocation: {exc}", linger=1.0)
        return RelocationError(f"relocation to {where} cancelled during the stream")
    if isinstance(exc, (ChannelError, SaveError, dataplane.DataplaneError)):
        # a data channel broken by the destination: its ERROR on the control connection says why
        return RelocationError(f"relocation to {where} failed during the stream: {_peer_reason(ch, exc)}")
    return RelocationError(f"relocation to {where} failed during the stream: {exc}")


def _logging_off(domain) -> None:
    """Dirty logging off after a failed handoff (the save left it on: a relocation that
    succeeds destroys the domain), before the domain may run again here."""
    try:
        domain.set_dirty_logging(False)
    except Exception as exc:        # the domain may be what failed; the relocation error says more
        log.warning("turning dirty logging off failed: %s", exc)


def _downtime_parts(source: dict, restore_wait: float, resume_wait: float, restored: dict,
                    running: dict) -> dict:
    """Where the downtime went (specs/relocation.md, section 7), in seconds: the source's
    ``stop``, ``capture``, ``state``, ``pages`` and ``end`` (SaveStats.downtime_parts); the
    destination's ``read``, ``apply`` and ``answer`` (from RESTORED) and ``resume`` (from
    RUNNING), when it reported them; ``link``: the rest of the STREAM_END / RESTORED and
    GO / RUNNING round trips (``restore_wait``, ``resume_wait``). ``return``, for the
    caller to pop: the estimated time from the destination's guest running to RUNNING
    here, which is not downtime: RUNNING's ``after`` (how long the guest had run when
    RUNNING left there) and half of the rest of the GO / RUNNING round trip beyond the
    destination's resume."""
    parts = {k: source[k] for k in SOURCE_PARTS if k in source}

    def peer(message: dict, key: str, most: float) -> float | None:      # the peer's word, bounded
        value = message.get(key)
        return min(max(value, 0.0), most) if isinstance(value, float) and math.isfinite(value) else None

    dest = {k: v for k in DESTINATION_PARTS[:-1] if (v := peer(restored, k, restore_wait)) is not None}
    if (resume := peer(running, "resume", resume_wait)) is not None:
        dest["resume"] = resume
    parts.update(dest)
    trips = restore_wait + resume_wait - sum(dest.values())
    if "resume" in dest:
        after = peer(running, "after", resume_wait - dest["resume"]) or 0.0
        parts["return"] = after + (resume_wait - dest["resume"] - after) / 2
        trips -= parts["return"]
    parts["link"] = max(0.0, trips)
    return parts


def _rounds(stats, start: float, end: float) -> list[dict]:
    """Per page round: pages, bytes, seconds, bandwidth (bytes/s), dirty rate (pages dirtied
    per second during the round before), throttle percent in force, for pre-copy rounds the
    destination's lag behind it (the SYNC round trip after it; its seconds include it) and,
    after round 0, the downtime estimate made before it. Round 0 includes the stream head,
    and its ``holes`` are the never-written pages it did not need to send;
    the last round runs from the pause to STREAM_END and includes the state records."""
    marks = [(start + at, nbytes) for at, nbytes in stats.round_starts]
    if marks:
        marks[0] = (marks[0][0], 0)
    pages = [stats.pages_total - sum(stats.dirty_history)] + list(stats.dirty_history)
    bounds = marks + [(end, stats.stream_bytes)]
    out = []
    for i, count in enumerate(pages[:len(marks)]):
        seconds = bounds[i + 1][0] - bounds[i][0]
        nbytes = bounds[i + 1][1] - bounds[i][1]
        before = out[-1]["seconds"] if out else 0.0
        out.append({"round": i, "pages": count, "holes": stats.pages_holes if i == 0 else 0,
                    "bytes": nbytes, "seconds": seconds,
                    "bandwidth": nbytes / seconds if seconds > 0 else 0.0,
                    "dirty_rate": count / before if before > 0 else 0.0,
                    "throttle": stats.throttle_history[i] if i < len(stats.throttle_history) else 0,
                    "lag": stats.lag_history[i] if i < len(stats.lag_history) else None,
                    "downtime_estimate": stats.estimate_history[i - 1]
                    if 0 < i <= len(stats.estimate_history) else None})
    return out


def _client_context(tls_dir: str) -> ssl.SSLContext:
    try:
        return tls.client_context(tls_dir)
    except tls.TlsError as exc:
        raise RelocationError(str(exc)) from None


PAUSE_LIMIT_MIN = 10.0      # seconds a live move may stay paused before RESTORED, at least ...
PAUSE_LIMIT_FACTOR = 4.0    # ... or this many times its downtime estimate, if longer
PAUSE_LIMIT_POLL = 0.5      # seconds between two looks at the clock (nothing wakes it in a pause)


class _PauseLimit:
    """The bound on a live move's paused time before GO (specs/relocation.md, section 5):
    armed at the pause, with a limit of PAUSE_LIMIT_MIN seconds or PAUSE_LIMIT_FACTOR
    times the downtime estimate's own terms plus its lag once (the lag is the destination's
    word: times four, a destination could stretch the limit four times as far as it lies),
    whichever is longer. If neither RESTORED nor READY (on
    data channel 0) has been read by then (a destination that reads the last round
    slowly, or restores slowly), it cancels the sink (its channels shut down) and shuts
    the control connection down, so the save or the wait for RESTORED fails at once and
    the guest resumes here. :meth:`stop` says whether GO may still be
    sent: once it has returned True the limit cannot fire. Arming and stopping only set
    fields (they are on the downtime path); the thread looks every PAUSE_LIMIT_POLL."""

    def __init__(self, ch: Channel, sink):
        self.ch, self.sink = ch, sink
        self.lock = threading.Lock()
        self.limit = self.deadline = None
        self.fired = self.done = False
        threading.Thread(target=self._watch, name="pause-limit", daemon=True).start()

    def arm(self, stats) -> None:
        """At the pause (save's ``on_pause``)."""
        lag = stats.estimate_lag        # counted once: a destination stretches the limit 1:1 at most
        self.limit = max(PAUSE_LIMIT_MIN, PAUSE_LIMIT_FACTOR * (stats.downtime_estimate - lag) + lag)
        self.deadline = time.monotonic() + self.limit

    def _watch(self) -> None:
        while True:
            time.sleep(PAUSE_LIMIT_POLL)
            with self.lock:         # stop() waits for what is done here: the owner closes next
                if self.done:
                    return
                if self.deadline is None or time.monotonic() < self.deadline:
                    continue
                self.fired = True
                try:
                    self.sink.cancel()
                finally:
                    _shut(self.ch.sock)
            log.warning("no RESTORED %g s after the pause: the relocation was given up", self.limit)
            return

    def stop(self) -> bool:
        """Disarm it (idempotent): False if it has fired, and the move is to be given up.
        Once it returns, the sink and the connection are the caller's to close."""
        with self.lock:
            self.done = True
            return not self.fired

    def error(self, where: str) -> "RelocationError":
        """Armed only for a guest that was running: it runs here again."""
        return RelocationError(f"relocation to {where} given up: the destination had not restored the "
                               f"guest {self.limit:g} s after the pause (the limit is the longer of "
                               f"{PAUSE_LIMIT_MIN:g} s and {PAUSE_LIMIT_FACTOR:g}x the downtime estimate, "
                               f"its lag counted once); "
                               f"the guest runs here again")


class _CancelWatch:
    """A relocation's cancel: ``cancel`` set (``hvm destroy``, the job cancelled) or
    ``check()`` raising (the client went away: Ctrl-C on ``hvm migrate``), looked at every
    CHECK_EVERY seconds on a thread of its own until :meth:`stop`; ``check()`` raising
    sets ``cancel`` too, which the save watches (its sink stops at once: SaveCancelled),
    even while a round's send or a SYNCED waits on the destination.

    During the set-up, before the save watches the cancel (until :meth:`end_setup`), a
    cancel also shuts down every connection :meth:`add` was given, so a step waiting on
    the destination (its TLS handshake, WELCOME, a data channel's handshake) fails at
    once, and :meth:`steps` turns that failure, or a step that ends after the cancel, into
    "cancelled". A connection is :meth:`discard`-ed before it is closed elsewhere, and
    :meth:`end_setup` comes before the owner closes the rest: nothing is shut down after
    its descriptor may have gone to another file."""

    def __init__(self, cancel: threading.Event | None, where: str, check=None):
        self.cancel, self.where, self.check = cancel, where, check
        self.lock = threading.Lock()
        self.socks: list = []
        self.fired = self.setup_over = self.done = False
        if cancel is not None or check is not None:
            threading.Thread(target=self._watch, name="cancel-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self.done:
            if self.cancel is not None:
                if self.cancel.wait(CHECK_EVERY):
                    break
            else:
                time.sleep(CHECK_EVERY)
            if self.done:
                return
            if self.check is not None:
                try:
                    self.check()
                except Exception:
                    if self.cancel is not None:
                        self.cancel.set()
                    break
        with self.lock:
            if self.done or self.setup_over:
                return
            self.fired = True
            for sock in self.socks:
                _shut(sock)

    def add(self, sock) -> None:
        with self.lock:
            self.socks.append(sock)
            if self.fired:
                _shut(sock)

    def discard(self, sock) -> None:
        with self.lock:
            if sock in self.socks:
                self.socks.remove(sock)

    def end_setup(self, check: bool = True) -> None:
        """No shutting down after this returns; ``check``: raise the cancel's
        RelocationError if it came."""
        with self.lock:
            self.setup_over = True
        if check:
            self._check()

    def stop(self) -> None:
        """The cancel is looked at no more (idempotent); nothing is shut down after it."""
        self.end_setup(check=False)
        self.done = True

    def _check(self) -> None:
        if self.fired or (self.cancel is not None and self.cancel.is_set()):
            raise RelocationError(f"relocation to {self.where} cancelled before the stream began")

    @contextlib.contextmanager
    def steps(self):
        """Around set-up steps: a failure after a cancel, or a cancel meanwhile, is the
        cancel's RelocationError."""
        try:
            yield
        except Exception:
            self._check()
            raise
        self._check()


def _shut(sock) -> None:
    """Shut a connection down from another thread than the one using it: on a duplicate of
    its descriptor, so a TLS socket's state is left alone (its blocked reads and writes
    fail at once)."""
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


class _LinkWatch:
    """While the pages go out (on data channels, the control connection is otherwise
    quiet), anything the destination says on the control connection (an ERROR) or its
    closing stops the sink at once: the save fails at once, and then reads what was
    said, instead of blocking in writes to channels nobody reads."""

    def __init__(self, ch: Channel, sink):
        self.ch, self.sink = ch, sink
        self.lock = threading.Lock()
        self.holding = self.stopped = False
        self.thread = threading.Thread(target=self._run, name="link-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            try:
                readable = select.select([self.ch.sock], [], [], 0.2)[0]
            except (OSError, ValueError):
                readable = True
            if readable:
                with self.lock:
                    if self.stopped:
                        return
                    # readable may be stale: the main thread can have read the answer (SYNCED)
                    # and left held() since the select; only what is unread now counts
                    if not self.holding and _readable_now(self.ch.sock):
                        self.sink.cancel()
                        return
                time.sleep(0.05)        # held: the main thread reads the answer

    @contextlib.contextmanager
    def held(self):
        with self.lock:
            self.holding = True
        try:
            yield
        finally:
            with self.lock:
                self.holding = False

    def stop(self) -> None:
        with self.lock:
            self.stopped = True


def _await_restored(ch: Channel, handoff, timeout: float, check=None) -> tuple[dict | None, object]:
    """RESTORED within ``timeout`` seconds in all (as :func:`_expect`), or None when READY
    came first on data channel 0 (``handoff``: its data plane Output; None: no handoff):
    the destination holds the restored pair and awaits GO, and RESTORED follows; and the
    handoff, or None once channel 0 failed or carried anything else (logged: the control
    connection alone goes on)."""
    deadline = time.monotonic() + timeout
    while handoff is not None and not _readable_now(ch.sock):
        if check is not None:
            check()
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelError(f"no RESTORED within {timeout:g} s")
        try:
            got = handoff.handoff("ready", ch.sock.fileno(), min(CHECK_EVERY, left))
        except dataplane.DataplaneError as exc:
            log.warning("%s: awaiting RESTORED", exc)
            handoff = None
            break
        if got == "ready":
            return None, handoff
    return _expect(ch, "RESTORED", max(deadline - time.monotonic(), 0.001), check), handoff


def _channel_answer(handoff, ready_read: bool, timeout: float) -> str | None:
    """The destination's answer to GO on data channel 0 (READY first, unless ``ready_read``),
    within ``timeout`` seconds in all: "running", "paused", "refused" (its copy never ran),
    or None if it gave none (the channel ended or failed)."""
    deadline = time.monotonic() + timeout
    try:
        if not ready_read and handoff.handoff("ready", -1, timeout) is None:
            return None
        return handoff.handoff("answer", -1, max(deadline - time.monotonic(), 0.0))
    except dataplane.DataplaneError as exc:
        log.warning("%s", exc)
        return None


def _readable_now(sock) -> bool:
    try:
        return bool(getattr(sock, "pending", lambda: 0)()) or bool(ready({sock: select.POLLIN}, 0))
    except (OSError, ValueError):
        return True


PEER_REASON_WAIT = 5.0  # seconds a failed relocation waits in all for the destination's ERROR


def _peer_reason(ch: Channel, exc: Exception) -> str:
    """The destination's ERROR text if it sends one within PEER_REASON_WAIT seconds in all
    (whatever else it sends meanwhile is dropped), else ``exc``."""
    if isinstance(exc, PeerError):
        return f"destination: {exc}"
    deadline = time.monotonic() + PEER_REASON_WAIT
    try:
        while (left := deadline - time.monotonic()) > 0:
            ch.receive(timeout=left)
    except PeerError as peer:
        return f"destination: {peer}"
    except ChannelError:
        pass
    return str(exc)


CHECK_EVERY = 0.2       # seconds between two checks for a cancel while an answer is awaited


def _expect(ch: Channel, kind: str, timeout: float, check=None) -> dict:
    """``ch.expect(kind)`` within ``timeout`` seconds in all; until the answer's first byte
    comes, ``check()`` (which may raise to give up: a cancel) runs every CHECK_EVERY
    seconds. A frame once begun is read whole (within what is left of ``timeout``)."""
    deadline = time.monotonic() + timeout
    if check is not None:
        while not _readable_now(ch.sock):
            check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError(f"no {kind} within {timeout:g} s")
            ready({ch.sock: select.POLLIN}, min(CHECK_EVERY, left))
    return ch.expect(kind, max(deadline - time.monotonic(), 0.001))


def migrate_domain(name: str, target: str, *, live: bool = True, tls_dir: str | None = None,
                   insecure: bool = False, progress=None, base: Path | None = None,
                   channels: int = DEFAULT_CHANNELS, paused: bool = False, **convergence) -> dict:
    """Ask domain ``name``'s process to relocate itself to ``target`` (HOST:PORT); the
    reply (``status``, ``stats``) once the destination runs it (or holds it paused:
    ``paused``, or it was paused here). ControlError otherwise (kind UNKNOWN when GO was
    sent and RUNNING did not come). ``convergence``: the CONVERGENCE_KEYS (None values
    are left out)."""
    from .control import LOST, UNKNOWN, ControlError, DomainClient
    host, port = parse_target(target)
    if not insecure:
        if not tls_dir:
            raise ValueError("--tls-dir (or $HVM_TLS_DIR) is required unless --insecure")
        tls_dir = str(Path(tls_dir).absolute())
    extra = convergence_request(convergence, "migrate")
    with DomainClient(name, base) as client:
        client.check_answers()      # a stopped or hung process: refused now, not waited for forever
        try:
            return client.call_with_progress("migrate", progress, host=host, port=port, live=live,
                                             tls_dir=tls_dir, insecure=insecure, channels=channels,
                                             paused=paused, **extra)
        except ControlError as exc:
            if exc.kind != LOST:
                raise
            raise ControlError(             # it may have died before GO, or after
                f"outcome unknown: the domain process of {name} ended during its relocation to "
                f"{target} ({exc}); the guest may be running on {host}. Check there: if it runs there, "
                f"'hvm destroy {name}' here clears what is left here; if not, the guest is lost "
                f"('hvm list' shows it crashed here, its logs kept)", UNKNOWN,
                f"crashed here, perhaps running on {host}") from None


__all__ = ["MigrateJob", "OutcomeUnknown", "RelocationError", "migrate_domain", "parse_target"]
