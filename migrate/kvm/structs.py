"""Plain data <-> kernel structs.

Captured state must be plain Python data (no cffi objects leak out): a
struct becomes a dict keyed by the kernel's field names, a nested struct a
nested dict, an integer array a list.  Padding and reserved fields are
dropped on the way out and zero on the way in.
"""
import re

from ._lib import ffi

PADDING = re.compile(r"^(pad\d*|padding\d*|reserved)$")


def to_plain(cdata):
    if not isinstance(cdata, ffi.CData):
        return cdata
    ctype = ffi.typeof(cdata)
    if ctype.kind == "struct":
        return {
            name: to_plain(getattr(cdata, name))
            for name, _field in ctype.fields
            if not PADDING.match(name)
        }
    if ctype.kind == "array":
        return [to_plain(item) for item in cdata]
    return cdata


def from_plain(ctype_name: str, plain: dict):
    """A new zeroed struct of ``ctype_name`` filled from ``plain``."""
    cdata = ffi.new(ctype_name + " *")
    fill(cdata[0], plain)
    return cdata


def fill(cdata, plain) -> None:
    ctype = ffi.typeof(cdata)
    for name, field in ctype.fields:
        if PADDING.match(name):
            continue
        value = plain[name]
        if field.type.kind == "struct":
            fill(getattr(cdata, name), value)
        elif field.type.kind == "array":
            _fill_array(getattr(cdata, name), field.type, value)
        else:
            setattr(cdata, name, value)


def _fill_array(arr, atype, values) -> None:
    if len(values) != atype.length:
        raise ValueError(f"array of {atype.length} expected, got {len(values)}")
    for i, value in enumerate(values):
        if atype.item.kind == "struct":
            fill(arr[i], value)
        elif atype.item.kind == "array":
            _fill_array(arr[i], atype.item, value)
        else:
            arr[i] = value
