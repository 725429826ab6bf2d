"""Plain data <-> kernel structs.

Captured state must be plain Python data (no cffi objects leak out): a
struct becomes a dict keyed by the kernel's field names, a nested struct a
nested dict, an integer array a list.  Padding and reserved fields are
dropped on the way out and zero on the way in.

The conversions sit on the downtime path of a live relocation (state capture on the
source, apply on the destination), so each struct type gets its own converter pair,
generated once from its cffi field list: straight-line attribute reads and writes
instead of a walk over the type at every call. The modules that convert state generate
theirs at import (:func:`prepare`).
"""
import functools
import re

from ._lib import ffi

PADDING = re.compile(r"(pad\d*|padding\d*|reserved)\Z")


def _carried(ctype):
    return [(name, field.type) for name, field in ctype.fields if not PADDING.match(name)]


@functools.cache
def _reader(ctype):
    """function(cdata) -> plain for a struct or array ctype (made once per ctype)."""
    env: dict = {}
    if ctype.kind == "struct":
        items = []
        for i, (name, ftype) in enumerate(_carried(ctype)):
            if ftype.kind in ("struct", "array"):
                env[f"f{i}"] = _reader(ftype)
                items.append(f"{name!r}: f{i}(c.{name})")
            else:
                items.append(f"{name!r}: c.{name}")
        body = "{" + ", ".join(items) + "}"
    elif ctype.item.kind in ("struct", "array"):
        env["item"] = _reader(ctype.item)
        body = "[item(x) for x in c]"
    else:
        body = "list(c)"
    exec(f"def conv(c):\n    return {body}\n", env)      # noqa: S102 - generated from cffi types only
    return env["conv"]


@functools.cache
def _writer(ctype):
    """function(cdata, plain) for a struct or array ctype (made once per ctype): fills
    every carried field, KeyError for a missing key, ValueError for an array of the wrong
    length."""
    env: dict = {"_length": _length}
    lines = []
    if ctype.kind == "struct":
        for i, (name, ftype) in enumerate(_carried(ctype)):
            if ftype.kind in ("struct", "array"):
                env[f"f{i}"] = _writer(ftype)
                lines.append(f"f{i}(c.{name}, p[{name!r}])")
            else:
                lines.append(f"c.{name} = p[{name!r}]")
    else:
        lines.append(f"_length(p, {ctype.length})")
        if ctype.item.kind in ("struct", "array"):
            env["item"] = _writer(ctype.item)
            lines.append("for i, v in enumerate(p):\n        item(c[i], v)")
        else:
            lines.append(f"c[0:{ctype.length}] = p")
    code = "def fill(c, p):\n" + "".join(f"    {line}\n" for line in lines or ["pass"])
    exec(code, env)      # noqa: S102 - generated from cffi types only
    return env["fill"]


def _length(values, length: int) -> None:
    if len(values) != length:
        raise ValueError(f"array of {length} expected, got {len(values)}")


def prepare(*ctype_names: str) -> None:
    """Generate the converters of these struct types now (an import calls it for the
    state structs), not on first use, which would be a state capture or apply."""
    for name in ctype_names:
        ctype = ffi.typeof(name)
        _reader(ctype)
        _writer(ctype)


def to_plain(cdata):
    if not isinstance(cdata, ffi.CData):
        return cdata
    ctype = ffi.typeof(cdata)
    if ctype.kind in ("struct", "array"):
        return _reader(ctype)(cdata)
    return cdata


def from_plain(ctype_name: str, plain: dict):
    """A new zeroed struct of ``ctype_name`` filled from ``plain``."""
    cdata = ffi.new(ctype_name + " *")
    fill(cdata[0], plain)
    return cdata


def fill(cdata, plain) -> None:
    _writer(ffi.typeof(cdata))(cdata, plain)
