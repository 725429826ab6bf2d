"""Sizes, rates and durations as the command line reads them (migrate.units). No KVM needed."""
import pytest

from migrate.units import UnitError, parse_duration, parse_rate, parse_size


def test_sizes():
    assert parse_size("256M") == 256 << 20 and parse_size("256") == 256 << 20      # bare: MiB
    assert parse_size("1G") == parse_size("1GiB") == parse_size("1GB") == 1 << 30
    assert parse_size("1T") == 1 << 40 and parse_size("65536K") == 64 << 20
    assert parse_size("4096B") == 4096 and parse_size("1.5G") == 3 << 29
    assert parse_size("4096", default_unit=1) == 4096
    for bad in ("lots", "", "1X", "1iB", "M", "0.5B", "-1M", "1e3"):
        with pytest.raises(UnitError):
            parse_size(bad)


def test_rates():
    assert parse_rate("100") == parse_rate("100M") == parse_rate("100MB/s") == 100e6    # bare: MB/s
    assert parse_rate("1G") == 1e9 and parse_rate("500K") == 500e3
    assert parse_rate("100MiB/s") == 100 * (1 << 20)
    assert parse_rate("800Mbit/s") == parse_rate("800mbit") == 100e6
    assert parse_rate("100/s") == 100 and parse_rate("5", default_unit=1) == 5
    for bad in ("fast", "100Mb", "1iB/s", "1e6", "-5M"):
        with pytest.raises(UnitError):
            parse_rate(bad)


def test_durations():
    assert parse_duration("30") == parse_duration("30s") == 30.0          # bare: seconds
    assert parse_duration("500ms") == 0.5 and parse_duration("2m") == 120 and parse_duration("1h") == 3600
    assert parse_duration("300", default_unit=1e-3) == 0.3
    for bad in ("soon", "30x", "-1s", "1d"):
        with pytest.raises(UnitError):
            parse_duration(bad)
