"""The fixed part of the downtime learned per destination (migrate/host/learned.py)."""
import json

from migrate.host import learned


def test_the_largest_of_the_last_five_per_destination(tmp_path):
    path = tmp_path / learned.FILE
    assert learned.load(path, "a:1") is None                    # nothing kept yet
    for ms in (9, 5, 6, 7, 4, 3):
        learned.record(path, "a:1", ms / 1000)
    learned.record(path, "b:2", 0.002)
    assert learned.load(path, "a:1") == 0.007                   # 9 ms was the sixth from last
    assert learned.load(path, "b:2") == 0.002
    assert json.loads(path.read_text())["destinations"]["a:1"] == [0.005, 0.006, 0.007, 0.004, 0.003]


def test_what_is_kept_stays_bounded(tmp_path):
    path = tmp_path / learned.FILE
    learned.record(path, "a:1", 5.0)                            # out of bounds: not kept
    learned.record(path, "a:1", float("nan"))
    assert learned.load(path, "a:1") is None
    for i in range(learned.MAX_DESTINATIONS + 3):
        learned.record(path, f"h{i}:1", 0.004)
    table = json.loads(path.read_text())["destinations"]
    assert len(table) == learned.MAX_DESTINATIONS and "h0:1" not in table and f"h{i}:1" in table


def test_an_unreadable_record_is_ignored_and_replaced(tmp_path):
    path = tmp_path / learned.FILE
    for text in ("not json", '{"version": 2, "destinations": {}}', '{"version": 1, "destinations": []}',
                 '{"version": 1, "destinations": {"a:1": ["x", -1, 2.0]}}'):
        path.write_text(text)
        assert learned.load(path, "a:1") is None
    learned.record(path, "a:1", 0.004)
    assert learned.load(path, "a:1") == 0.004
    learned.record(tmp_path / "missing" / learned.FILE, "a:1", 0.004)     # cannot write: ignored


def test_the_fixed_part_is_what_the_estimates_other_terms_leave():
    # estimated 9 ms with a fixed part of 7 (2 ms of pages and lag), measured 10 ms
    assert abs(learned.fixed_part(0.010, 0.009, 0.007) - 0.008) < 1e-12
    assert learned.fixed_part(0.010, 0.0, 0.007) is None        # no estimate (offline)


def test_kept_only_from_moves_whose_last_pages_were_a_small_part():
    """A move whose estimate was mostly its last pages (at pre-copy rates, which the paused
    final round beats) leaves too little of its downtime for the fixed part: not kept. A
    small final round leaves it nearly alone: kept."""
    ms = 1e-3
    # flat-out 511 MiB: estimate 14.98 ms with F 7: 7.98 of other terms, downtime 11.04
    assert learned.fixed_part(11.04 * ms, 14.98 * ms, 7 * ms) < 3.1 * ms
    assert not learned.worth_keeping(11.04 * ms, 14.98 * ms, 7 * ms)
    # idle: 0.6 ms of other terms in a 5.7 ms downtime
    assert learned.worth_keeping(5.7 * ms, 7.6 * ms, 7 * ms)
    assert learned.worth_keeping(10 * ms, 12 * ms, 7 * ms)          # 5 of 10 ms: the bound, kept
    assert not learned.worth_keeping(10 * ms, 12.01 * ms, 7 * ms)
    assert not learned.worth_keeping(10 * ms, 0.0, 7 * ms)          # no estimate (offline)


def test_the_default_counts_until_five_are_kept(tmp_path):
    """One or two measures of a noisy pause are no upper bound: until five are kept, the
    default counts too; from five on, the largest of them, above or below it; always with
    the margin on what was measured (the largest of five was still below the next one)."""
    path = tmp_path / learned.FILE
    m = learned.MARGIN
    assert m > 1
    assert learned.expected(path, "a:1", 0.007) == 0.007
    learned.record(path, "a:1", 0.0044)
    assert learned.expected(path, "a:1", 0.007) == 0.007        # 0.0044 * 1.25 = 0.0055
    learned.record(path, "a:1", 0.009)
    assert learned.expected(path, "a:1", 0.007) == 0.009 * m
    for ms in (5, 6, 5.5, 4):                   # the last five: 9, 5, 6, 5.5, 4
        learned.record(path, "a:1", ms / 1000)
    assert learned.expected(path, "a:1", 0.007) == 0.009 * m
    learned.record(path, "a:1", 0.005)          # 9 ms drops out: 5, 6, 5.5, 4, 5
    assert learned.expected(path, "a:1", 0.007) == 0.006 * m
    for ms in (3, 3, 3, 3, 3.2):                # below the default: the default no longer counts
        learned.record(path, "a:1", ms / 1000)
    assert learned.expected(path, "a:1", 0.007) == 0.0032 * m


def test_one_slow_pause_does_not_set_every_later_moves_estimate(tmp_path):
    """A move whose pause took 0.96 s (a hiccup, or a destination that held RESTORED back)
    is within the bounds kept. Alone it is believed, but never above 0.4 of the target; a
    normal move after it leaves it out (over 4x the median of the others), until most of
    the last five say the same."""
    path = tmp_path / learned.FILE
    target, default = 0.300, 0.007
    learned.record(path, "a:1", 0.958)
    assert learned.expected(path, "a:1", default, target) == learned.TARGET_SHARE * target
    assert learned.expected(path, "a:1", default) == 0.958 * learned.MARGIN        # no target: no bound
    learned.record(path, "a:1", 0.005)
    assert learned.expected(path, "a:1", default, target) == default              # 0.958 left out
    for _ in range(3):
        learned.record(path, "a:1", 0.005)
    assert learned.expected(path, "a:1", default, target) == default              # four believed: the default counts
    learned.record(path, "a:1", 0.005)                                            # 0.958 drops out of the five
    assert learned.expected(path, "a:1", default, target) == 0.005 * learned.MARGIN
    # a destination that got slower: believed once three of the last five say so
    learned.record(path, "a:1", 0.050)
    learned.record(path, "a:1", 0.050)
    assert learned.expected(path, "a:1", default, target) == default              # three believed, all 5 ms
    learned.record(path, "a:1", 0.050)
    assert learned.expected(path, "a:1", default, target) == 0.050 * learned.MARGIN


def test_the_bound_on_the_target_never_goes_below_the_default(tmp_path):
    path = tmp_path / learned.FILE
    learned.record(path, "a:1", 0.009)
    assert learned.expected(path, "a:1", 0.007, 0.010) == 0.007       # 0.4 of 10 ms is 4: the default holds


def test_only_moves_that_switched_on_their_own_unthrottled_teach_it():
    from types import SimpleNamespace as Stats
    assert learned.from_move(Stats(reason="small", throttle_history=[0, 0, 0]))
    assert learned.from_move(Stats(reason="downtime-target", throttle_history=[0, 0]))
    assert not learned.from_move(Stats(reason="downtime-target", throttle_history=[0, 20, 30, 0]))
    for forced in ("stalled", "max-rounds", "timeout-force"):
        assert not learned.from_move(Stats(reason=forced, throttle_history=[0, 0]))
