"""Sizes, rates and durations as people write them on a command line, and the click
option types that read them (one type per kind, so every option of a kind takes the
same units and its errors name the option).

- sizes: ``256M``, ``1G``, ``512MiB``, ``1T``, ``65536K``, ``4096B``; K/M/G/T are binary
  (KiB ...), like xl's ``memory=``; a bare number is in the option's default unit.
- rates: ``100M`` or ``100MB/s`` (10^6 bytes a second), ``1G``, ``500K``, ``100MiB/s``
  (binary), ``800Mbit`` or ``800Mbit/s`` (bits, like tc); a bare number is in the
  option's default unit (MB/s for ``--max-bandwidth``).
- durations: ``30s``, ``500ms``, ``2m``, ``1h``, ``1.5s``; a bare number is in the
  option's default unit (seconds for ``--timeout``, milliseconds for ``--downtime-ms``).
"""
from __future__ import annotations

import math
import re

import click


class UnitError(ValueError):
    """Text that is not a size, rate or duration; the message says what would be."""


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE = re.compile(rf"{_NUMBER}\s*([KMGT]?)(i?B?)\Z", re.IGNORECASE)
_RATE = re.compile(rf"{_NUMBER}\s*([KMG]?)(iB|B|bit)?(/s)?\Z", re.IGNORECASE)
_DURATION = re.compile(rf"{_NUMBER}\s*(ms|s|m|min|h)?\Z", re.IGNORECASE)
_BINARY = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DECIMAL = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str, default_unit: int = 1 << 20) -> int:
    """Bytes: '256M', '1G', '512MiB', '1T', '4096B'; a bare number is ``default_unit`` bytes
    (MiB unless told). A size must come to a whole number of bytes."""
    m = _SIZE.match(str(text).strip())
    if not m or (m.group(3) and m.group(3).lower() not in ("b", "ib")) or \
            (m.group(3).lower() == "ib" and not m.group(2)):
        raise UnitError(f"{text!r} is not a size (examples: 256M, 1G, 512MiB)")
    number, prefix = float(m.group(1)), m.group(2).upper()
    unit = _BINARY[prefix] if prefix or m.group(3) else default_unit
    value = number * unit
    if value != int(value):
        raise UnitError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str, default_unit: float = 1e6) -> float:
    """Bytes per second: '100M' and '100MB/s' (10^6 B/s), '1G', '100MiB/s', '800Mbit/s';
    a bare number is ``default_unit`` bytes a second (MB/s unless told)."""
    m = _RATE.match(str(text).strip())
    if not m:
        raise UnitError(f"{text!r} is not a rate (examples: 100M or 100MB/s, 1G, 800Mbit/s)")
    if m.group(3) == "b":
        raise UnitError(f"{text!r}: a lone 'b' is ambiguous: write MB/s for bytes, Mbit/s for bits")
    number, prefix, unit = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").lower()
    if not (prefix or unit or m.group(4)):
        return number * default_unit
    if unit == "ib":
        if not prefix:
            raise UnitError(f"{text!r} is not a rate (examples: 100M or 100MB/s, 1G, 800Mbit/s)")
        return number * _BINARY[prefix]
    return number * _DECIMAL[prefix] / (8 if unit == "bit" else 1)


def parse_duration(text: str, default_unit: float = 1.0) -> float:
    """Seconds: '30s', '500ms', '2m', '1h', '1.5'; a bare number is ``default_unit``
    seconds (seconds unless told)."""
    m = _DURATION.match(str(text).strip())
    if not m:
        raise UnitError(f"{text!r} is not a duration (examples: 30s, 500ms, 2m)")
    unit = m.group(2)
    return float(m.group(1)) * (_SECONDS[unit.lower()] if unit else default_unit)


class _Unit(click.ParamType):
    """A click option type over one of the parsers above, with bounds; click names the
    option in every error ("Invalid value for '--timeout': ...")."""
    parse = staticmethod(parse_size)
    what = "value"

    def __init__(self, default_unit=None, minimum=None, min_open=False, metavar=None, show=str):
        self.default_unit, self.minimum, self.min_open = default_unit, minimum, min_open
        self.metavar, self.show = metavar, show

    def get_metavar(self, param, ctx=None):     # click 8.1 and 8.2 signatures
        return self.metavar

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value                # a default given as a number
        try:
            out = self.parse(value) if self.default_unit is None else self.parse(value, self.default_unit)
        except UnitError as exc:
            self.fail(str(exc), param, ctx)
        if not math.isfinite(out):
            self.fail(f"{value!r} is not a finite {self.what}", param, ctx)
        if self.minimum is not None and (out < self.minimum or (self.min_open and out == self.minimum)):
            bound = "above" if self.min_open else "at least"
            self.fail(f"{value!r}: the {self.what} must be {bound} {self.show(self.minimum)}", param, ctx)
        return out


class Size(_Unit):
    name, what, parse = "size", "size", staticmethod(parse_size)


class Rate(_Unit):
    name, what, parse = "rate", "rate", staticmethod(parse_rate)


class Duration(_Unit):
    name, what, parse = "duration", "duration", staticmethod(parse_duration)


__all__ = ["Duration", "Rate", "Size", "UnitError", "parse_duration", "parse_rate", "parse_size"]
