"""Convergence of live pre-copy (specs/relocation.md, "Convergence"): the pure decision
over round statistics, and `hvm migrate` with a dirtier that outruns a
paced link: --timeout with cancel (the guest stays on the source, nothing on the
destination), with force (it completes), and --throttle (it converges)."""
import json
import threading
import time

import pytest
from click.testing import CliRunner

from migrate.cli import hvm
from migrate.domain import DomainConfig
from migrate.engine.convergence import (Convergence, Round, VcpuThrottle, decide, estimate_final,
                                        estimate_next)
from migrate.host import control
from test_relocation import console, hosts, pki, wait_console, wait_empty  # noqa: F401 (fixtures)

# 1000 pages took 0.5 s: 0.5 ms a page
ROUND = Round(pages=1000, bytes=4 << 20, seconds=0.5)


def test_estimate_is_pages_at_the_slower_recent_rate_plus_lag_plus_state():
    conv = Convergence(state_seconds=0.005)
    assert estimate_final(400, [ROUND], conv) == pytest.approx(0.205)
    assert estimate_final(400, [Round(0, 0, 0.0)], conv) == 0.005
    assert estimate_final(400, [], conv) == 0.005
    # the slower of the last two rounds (1 ms a page), not the last one alone
    slow, fast = Round(1000, 4 << 20, 1.0), Round(1000, 4 << 20, 0.25)
    assert estimate_final(100, [slow, fast], conv) == pytest.approx(0.105)
    assert estimate_final(100, [slow, ROUND, fast], conv) == pytest.approx(0.055)
    # a tiny round says little: the one before it sets the rate; the last lag is added
    tiny = Round(10, 40960, 0.5, lag=0.003)
    assert estimate_final(100, [fast, tiny], conv) == pytest.approx(0.025 + 0.003 + 0.005)
    assert estimate_final(100, [tiny], conv) == pytest.approx(5.0 + 0.003 + 0.005)


def test_decide_switches_on_small_sets_and_the_downtime_target():
    conv = Convergence(state_seconds=0.005, min_gain=0)     # no round taken for a smaller downtime
    d = decide(conv, [64], [ROUND], 1.0, 0)
    assert (d.action, d.reason) == ("switch", "small")
    d = decide(conv, [65], [ROUND], 1.0, 0)
    assert (d.action, d.reason) == ("switch", "downtime-target")
    d = decide(conv, [460], [ROUND], 1.0, 0)                 # (230 ms + 5 ms) x 1.25 fits 300 ms
    assert (d.action, d.reason, round(d.estimate, 3)) == ("switch", "downtime-target", 0.235)
    d = decide(conv, [590], [ROUND], 1.0, 0)                 # 300 ms fits, but not with headroom
    assert (d.action, d.reason) == ("continue", None)
    assert decide(Convergence(headroom=1.0, state_seconds=0.005, min_gain=0), [590], [ROUND], 1.0, 0).reason \
        == "downtime-target"
    d = decide(conv, [1000, 700], [ROUND], 1.0, 0)           # 355 ms, shrinking: another round
    assert (d.action, d.reason, d.throttle) == ("continue", None, 0)
    assert decide(Convergence(downtime=0.5, min_gain=0), [1000, 700], [ROUND], 1.0, 0).reason == "downtime-target"
    # the destination's lag counts: 40 ms more and the same set no longer fits
    lagging = Round(1000, 4 << 20, 0.5, lag=0.04)
    assert decide(conv, [460], [lagging], 1.0, 0).action == "continue"
    with pytest.raises(ValueError):
        Convergence(headroom=0.9)


def test_decide_takes_another_round_while_it_cuts_the_downtime():
    """Within the target, one more round is taken when it is expected to bring the estimate's
    page part to min_gain (0.67) of it or less: a guest dirtying slower than the rounds go."""
    conv = Convergence(state_seconds=0.005)
    # 460 pages dirtied in 0.5 s; sending them takes 0.23 s, when some 212 get dirtied:
    # 106 + 5 ms against 230 + 5 ms
    assert estimate_next(460, [ROUND], conv) == pytest.approx(0.005 + 212 * 0.0005)
    d = decide(conv, [460], [ROUND], 1.0, 0)
    assert (d.action, d.reason, round(d.estimate, 3)) == ("continue", None, 0.235)
    # a guest that dirties the pages as fast as they go: no gain, switch
    redirtied = Round(460, 2 << 20, 0.23)
    assert estimate_next(460, [ROUND, redirtied], conv) == pytest.approx(estimate_final(460, [ROUND], conv))
    assert decide(conv, [460, 460], [ROUND, redirtied], 1.0, 0).reason == "downtime-target"
    # the gain is the page part's: the fixed part is the same after any number of rounds.
    # With 200 ms of it, 306 ms against 430 is 0.71 of the estimate, but 106 ms of pages
    # against 230 is 0.46 of them: another round
    fixed = Convergence(state_seconds=0.2, downtime=1.0)
    assert estimate_next(460, [ROUND], fixed) == pytest.approx(0.2 + 212 * 0.0005)
    assert decide(fixed, [460], [ROUND], 1.0, 0).action == "continue"
    assert decide(Convergence(state_seconds=0.2, downtime=1.0, min_gain=0.45), [460], [ROUND], 1.0, 0).reason \
        == "downtime-target"
    # a gain just short of min_gain is not worth a round
    half = Round(1000, 4 << 20, 0.5, lag=0.0)
    assert decide(Convergence(state_seconds=0.005, min_gain=0.4), [460], [half], 1.0, 0).action == "switch"
    # a stalled last round, the timeout or the round cap: switch on the target
    assert decide(conv, [500, 460], [ROUND], 1.0, 0).reason == "downtime-target"
    assert decide(Convergence(state_seconds=0.005, timeout=3), [460], [ROUND], 3.0, 0).reason == "downtime-target"
    assert decide(Convergence(state_seconds=0.005, timeout=3), [460], [ROUND], 2.0, 0).action == "continue"
    capped = [5000 - 100 * i for i in range(29)] + [460]
    assert decide(conv, capped, [ROUND], 1.0, 0).reason == "downtime-target"
    # a round that took no time gives no rate
    assert estimate_next(460, [Round(460, 0, 0.0)], conv) == float("inf")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            Convergence(min_gain=bad)


def test_decide_never_blows_the_target_by_itself():
    """Without a timeout, a dirty set that stalls two rounds in a row (not below 0.9x)
    with no throttle to raise, or the round cap, gives up: on_timeout decides, and by
    default that is cancel (the guest stays where it is), never a switch over the target."""
    conv = Convergence()
    assert decide(conv, [1000, 950], [ROUND], 1.0, 0).action == "continue"    # one stalled round
    d = decide(conv, [1000, 950, 940], [ROUND], 1.0, 0)                       # two: give up
    assert (d.action, d.reason) == ("cancel", "stalled")
    assert decide(conv, [1000], [ROUND], 1.0, 0).action == "continue"         # nothing to compare
    d = decide(Convergence(on_timeout="force"), [1000, 950, 940], [ROUND], 1.0, 0)
    assert (d.action, d.reason) == ("switch", "stalled") and d.estimate > 0.3
    shrinking = [5000 - 100 * i for i in range(30)]        # 30 rounds, each a little smaller
    d = decide(Convergence(min_shrink=1.0), shrinking, [ROUND], 1.0, 0)
    assert (d.action, d.reason) == ("cancel", "max-rounds")
    d = decide(Convergence(min_shrink=1.0, on_timeout="force"), shrinking, [ROUND], 1.0, 0)
    assert (d.action, d.reason) == ("switch", "max-rounds")
    # with a timeout, a stall goes on until it passes
    assert decide(Convergence(timeout=60), [1000, 1000, 1000, 1000], [ROUND], 5.0, 0).action == "continue"


def test_decide_timeout_cancel_or_force():
    conv = Convergence(timeout=3)
    d = decide(conv, [1000, 1000], [ROUND], 2.9, 0)          # stalled, but the timeout decides
    assert (d.action, d.reason) == ("continue", None)
    assert decide(conv, [1000, 1000], [ROUND], 30, 0).reason == "timeout-cancel"
    assert decide(conv, [1000, 1000], [ROUND], 3.0, 0).action == "cancel"
    d = decide(Convergence(timeout=3, on_timeout="force"), [1000, 1000], [ROUND], 3.0, 0)
    assert (d.action, d.reason) == ("switch", "timeout-force")
    # the downtime target still wins before the timeout does
    assert decide(conv, [1000, 100], [ROUND], 99, 0).reason == "downtime-target"
    assert decide(conv, [1000, 50], [ROUND], 99, 0).reason == "small"
    # a timeout lifts the round cap
    assert decide(Convergence(timeout=3, min_shrink=1.0), [9000 - i for i in range(40)], [ROUND], 1, 0).action == "continue"
    with pytest.raises(ValueError):
        Convergence(on_timeout="later")


def test_decide_throttle_ramps_from_the_second_stalled_round():
    conv = Convergence(throttle=True)
    d = decide(conv, [1000, 1000], [ROUND], 1, 0)            # one stalled round: wait
    assert (d.action, d.throttle) == ("continue", 0)
    d = decide(conv, [1000, 1000, 1000], [ROUND], 1, 0)      # two: start at 20%
    assert (d.action, d.throttle) == ("continue", 20)
    steps, pct = [], 20
    while pct < 99:
        pct = decide(conv, [1000, 1000, 1000], [ROUND], 1, pct).throttle
        steps.append(pct)
    assert steps == [30, 40, 50, 60, 70, 80, 90, 99]
    assert decide(conv, [1000, 1000, 800], [ROUND], 1, 40).throttle == 40   # shrinking: keep it
    d = decide(conv, [1000, 1000, 1000], [ROUND], 1, 99)     # nothing left to raise: give up
    assert (d.action, d.reason) == ("cancel", "stalled")
    d = decide(Convergence(throttle=True, timeout=5), [1000, 1000, 1000], [ROUND], 1, 99)
    assert (d.action, d.throttle) == ("continue", 99)     # the timeout will decide


class FakeDomain:
    def __init__(self):
        self.status, self.calls = "running", []

    def pause(self, durable=True):
        self.calls.append("pause" if durable else "pause, not durable")
        self.status = "paused"

    def resume(self):
        self.calls.append("resume")
        self.status = "running"


def test_throttle_duty_cycles_and_always_releases():
    import time
    dom = FakeDomain()
    throttle = VcpuThrottle(dom, period=0.02)
    throttle.set_percent(0)
    assert throttle._thread is None                       # nothing to do at 0 %
    throttle.set_percent(90)
    time.sleep(0.1)
    throttle.stop()                                       # most likely while holding it paused
    # its pauses flush no disk (they save nothing)
    assert dom.calls.count("pause, not durable") >= 3 and "pause" not in dom.calls
    assert dom.calls[-1] == "resume" and dom.status == "running"
    assert throttle.percent == 0


def test_throttle_stop_waits_for_a_pause_under_way():
    """stop() returns only once the thread is done: its pause resumed, nothing of it left to
    run after (a thread outliving stop() would resume the guest after the saver's final
    pause). The thread's pause is held until stop() has been waiting for 0.3 s (a stop()
    that gave up waiting sooner fails here; it used to give up after 10 s)."""
    import time
    dom = FakeDomain()
    release, inside = threading.Event(), threading.Event()
    plain_pause = dom.pause

    def slow_pause(durable=True):
        inside.set()
        release.wait(5)
        plain_pause(durable)
    dom.pause = slow_pause
    throttle = VcpuThrottle(dom, period=0.02)
    throttle.set_percent(50)
    assert inside.wait(5)
    threading.Timer(0.3, release.set).start()
    throttle.stop()
    assert dom.calls == ["pause, not durable", "resume"] and dom.status == "running"
    time.sleep(0.1)
    assert dom.calls == ["pause, not durable", "resume"]           # nothing more came


def test_migrate_request_keys_are_checked():
    from migrate.host.source import MigrateJob
    base = {"host": "h", "port": 1, "insecure": True}
    job = MigrateJob.from_request({**base, "downtime_ms": 50, "max_bandwidth": 2e7, "precopy_timeout": 3,
                                   "on_timeout": "force", "throttle": True, "compress": None})
    c = job.convergence
    assert (c.downtime, c.max_bandwidth, c.timeout, c.on_timeout, c.throttle, job.compress) == \
        (0.05, 2e7, 3, "force", True, None)
    assert MigrateJob.from_request(base).convergence == Convergence() and MigrateJob.from_request(base).compress == "auto"
    for bad in ({"on_timeout": "later"}, {"throttle": 1}, {"max_bandwidth": 0}, {"precopy_timeout": True},
                {"compress": 99}, {"compress": "lz4"}, {"downtime_ms": "300"}, {"channels": 9}):
        with pytest.raises(ValueError, match="migrate: bad"):
            MigrateJob.from_request({**base, **bad})


# -- hvm migrate with a dirtier that outruns a 20 MB/s link ------------------------------

def start_dirtier(name, memory_mib, ws_mib, rate_mib):
    control.create_domain(DomainConfig(name, "dirtier", memory_mib << 20, args=[ws_mib << 20, rate_mib << 20]))


def migrate(name, port, pki, *extra):
    return CliRunner().invoke(hvm, ["migrate", name, f"127.0.0.1:{port}", "--tls-dir", str(pki / "ca" / "src"),
                                    "--max-bandwidth", "20", "--compress", "none", "--json", *extra])


@pytest.mark.kvm
def test_timeout_cancel_keeps_the_guest_on_the_source(hosts, pki):
    src, dst, daemon = hosts
    b = daemon(dst)
    start_dirtier("d1", 48, 32, 40)
    wait_console("d1", src, r"^dirtier writes=")
    res = migrate("d1", b.address[1], pki, "--timeout", "3", "--on-timeout", "cancel")
    assert res.exit_code == 1, res.output
    assert "cancelled: pre-copy did not converge within 3 s" in res.output
    assert "d1 keeps running here" in res.output
    [info] = control.list_domains(src)
    assert info["status"] == "running"
    after = len(console("d1", src))
    wait_console("d1", src, r"^dirtier writes=", after=after)      # and it still runs
    wait_empty(dst)


@pytest.mark.kvm
def test_timeout_force_completes(hosts, pki):
    src, dst, daemon = hosts
    b = daemon(dst)
    start_dirtier("d2", 48, 32, 40)
    wait_console("d2", src, r"^dirtier writes=")
    res = migrate("d2", b.address[1], pki, "--timeout", "3", "--on-timeout", "force")
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)["stats"]
    assert stats["reason"] == "timeout-force" and stats["save"]["reason"] == "timeout-force"
    assert stats["downtime_estimate"] > 0.3 and stats["downtime"] > 0.3   # the price of forcing
    assert stats["over_target"] and stats["downtime_target"] == 0.3      # said, never silent
    assert "warning: migrate downtime" in res.stderr and "exceeded the 300 ms target" in res.stderr
    assert control.list_domains(src) == []
    [info] = control.list_domains(dst)
    assert info["name"] == "d2" and info["status"] == "running"
    wait_console("d2", dst, r"^dirtier writes=")


@pytest.mark.kvm
def test_throttle_converges(hosts, pki):
    src, dst, daemon = hosts
    b = daemon(dst)
    start_dirtier("d3", 16, 8, 40)        # 8 MiB at 40 MB/s: a round of it takes 0.4 s at 20 MB/s
    wait_console("d3", src, r"^dirtier writes=")
    res = migrate("d3", b.address[1], pki, "--throttle")
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)["stats"]
    assert stats["reason"] in ("downtime-target", "small") and stats["throttle"] >= 20
    per_round = [r["throttle"] for r in stats["rounds_detail"]]
    assert per_round[0] == 0 and max(per_round) == stats["throttle"] and per_round[-1] == 0   # released
    assert stats["save"]["throttle_history"] == per_round
    assert control.list_domains(src) == []
    [info] = control.list_domains(dst)
    assert info["status"] == "running"
    wait_console("d3", dst, r"^dirtier writes=")


@pytest.mark.kvm
def test_live_save_takes_the_same_convergence_options(tmp_path, state_dir):
    """`hvm save --live` with a dirtier outrunning --max-bandwidth: --timeout with cancel
    fails, leaves no file and the domain running; with force it writes the file and says
    why it switched over. Without --live the options are refused."""
    start_dirtier("d4", 48, 32, 40)
    wait_console("d4", state_dir, r"^dirtier writes=")
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "d4.hvm"
    common = ["save", "d4", str(path), "--live", "--checkpoint", "--max-bandwidth", "20",
              "--compress", "none", "--timeout", "2", "--json"]
    res = CliRunner().invoke(hvm, common + ["--on-timeout", "cancel"])
    assert res.exit_code == 1 and "pre-copy did not converge within 2 s" in res.output, res.output
    assert not list((tmp_path / "out").iterdir())          # no file, no partial file
    assert [d["status"] for d in control.list_domains(state_dir)] == ["running"]
    res = CliRunner().invoke(hvm, common + ["--on-timeout", "force"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)["stats"]
    assert stats["reason"] == "timeout-force" and stats["downtime_estimate"] > 0.3
    assert path.stat().st_size == stats["stream_bytes"]
    assert [d["status"] for d in control.list_domains(state_dir)] == ["running"]     # --checkpoint
    res = CliRunner().invoke(hvm, ["save", "d4", str(tmp_path / "x.hvm"), "--throttle"])
    assert res.exit_code == 2 and "need --live" in res.output


def test_save_request_keys_are_checked():
    from migrate.host.domaind import SaveJob
    job = SaveJob.from_request({"path": "/x", "mode": "live", "precopy_timeout": 2, "on_timeout": "force",
                                "throttle": True, "max_bandwidth": 1e6, "compress": 3})
    c = job.convergence
    assert (c.timeout, c.on_timeout, c.throttle, c.max_bandwidth, job.level) == (2, "force", True, 1e6, 3)
    assert SaveJob.from_request({"path": "/x", "compress": None}).level is None
    with pytest.raises(ValueError, match="precopy_timeout apply to a live save only"):
        SaveJob.from_request({"path": "/x", "mode": "checkpoint", "precopy_timeout": 2})
    with pytest.raises(ValueError, match="save: bad throttle"):
        SaveJob.from_request({"path": "/x", "mode": "live", "throttle": "yes"})


def test_the_lag_counts_in_proportion_to_the_pages_left():
    """A backlog grows with the pages behind it: after a round of 1000 pages that left the
    receiver 40 ms behind, 100 dirty pages carry 4 ms of it; more pages than the round
    sent carry all of it, no more."""
    conv = Convergence(state_seconds=0.005)
    big = Round(1000, 4 << 20, 0.5, lag=0.04)
    assert estimate_final(100, [big], conv) == pytest.approx(100 * 0.0005 + 0.004 + 0.005)
    assert estimate_final(3000, [big], conv) == pytest.approx(3000 * 0.0005 + 0.04 + 0.005)
    assert estimate_final(100, [Round(0, 0, 0.0, lag=0.002)], conv) == pytest.approx(0.002 + 0.005)

