"""Turning user values into stored JSON bytes, with errors that name where they came from."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import orjson

from ._format import MAX_RECORD_JSON, NAME_RE

__all__ = ["check_name", "checked_clock", "checked_json", "dumps_sorted", "dumps_value",
           "unserializable"]

_dumps = orjson.dumps
# A record frames its value and offset with u32 lengths (docs/format.md, "Records"): the
# format's limit, named here for checked_json (and for the test that lowers it).
MAX_JSON_BYTES = MAX_RECORD_JSON


def check_name(name: object, what: str) -> str:
    """A persistent id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``; anything else is a ValueError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid {what} name: name={name!r} "
                         "rule=[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    return name


# A clock reading is stored as an i64 in records (docs/format.md) and as a JSON integer in
# commit and epoch records; negative readings are refused as well.
_CLOCK_LIMIT = 2**63


def checked_clock(clock_ms: Callable[[], Any]) -> Callable[[], int]:
    """Wrap an injected clock so that every reading is checked at the call that read it.

    A reading must be an ``int`` (not a ``bool``) in [0, 2**63): a float stored in a commit
    or epoch record would make every later open of the store fail, so a bad reading raises
    ``TypeError`` or ``ValueError`` before anything is written with it.
    """
    if not callable(clock_ms):
        raise TypeError(f"clock_ms must be callable: got={type(clock_ms).__name__}")

    def read() -> int:
        value = clock_ms()
        if type(value) is not int:
            raise TypeError(f"clock_ms() must return an int (milliseconds since the epoch): "
                            f"got={type(value).__name__} value={value!r}")
        if not 0 <= value < _CLOCK_LIMIT:
            raise ValueError(f"clock_ms() returned a reading out of range: value={value} "
                             f"range=[0, 2**63)")
        return value

    return read


def dumps_value(value: Any, where: str) -> bytes:
    """Serialize ``value`` with orjson, or raise ``TypeError`` naming ``where``.

    orjson writes NaN and infinities as ``null``, which would replay as a different value;
    they are refused here so that everything recorded round-trips exactly.
    """
    try:
        data = _dumps(value)
    except TypeError as exc:
        raise unserializable(where, exc) from None
    return checked_json(data, value, where)


def unserializable(where: str, exc: TypeError) -> TypeError:
    """The error for a value orjson refused (``exc``), naming ``where`` it was recorded,
    with how to store it where orjson's own message does not say."""
    message = str(exc)
    hint = next((text for name, text in _HINTS if message.endswith(f": {name}")), "")
    return TypeError(f"cannot serialize value for {where}: {message}{hint}")


# Types JSON has no form for, and how to store them (docs/api.md, "Values of your types").
_HINTS = (
    ("decimal.Decimal", ": store str(value), or give type= a dataclass (or pydantic or msgspec "
                        "model) whose field is a Decimal, and it comes back as a Decimal"),
    ("bytes", ": store base64 text, or give type= a dataclass whose field is bytes"),
    ("bytearray", ": store base64 text, or give type= a dataclass whose field is bytes"),
    ("memoryview", ": store base64 text, or give type= a dataclass whose field is bytes"),
    ("set", ": store a sorted list, or give type= a dataclass whose field is a set"),
    ("frozenset", ": store a sorted list, or give type= a dataclass whose field is a set"),
)


def checked_json(data: bytes, value: Any, where: str) -> bytes:
    """``data`` (``orjson.dumps(value)``), once it is known to store ``value`` exactly.

    Raises ``TypeError`` if ``value`` holds NaN or an infinity (orjson writes them as
    ``null``), ``ValueError`` if ``data`` is too long for a record.
    """
    # partition() rather than `in` or find(): bytes.__contains__ first tries the needle as
    # an int, and find() parses its arguments as a tuple; partition takes one argument and
    # costs about half as much as find() here (CPython 3.11, benchmarks.breakdown).
    if data.partition(b"null")[1] and _has_nonfinite(value):
        raise TypeError(f"cannot serialize value for {where}: NaN and infinity do not "
                        "round-trip through JSON")
    if len(data) > MAX_JSON_BYTES:
        # A ValueError, not a TypeError: the type is fine, the size is not storable.
        raise ValueError(f"value is too large to store for {where}: "
                         f"size={len(data)} limit={MAX_JSON_BYTES}")
    return data


def dumps_sorted(value: Any, where: str) -> bytes:
    """Serialize ``value`` with sorted keys (a stable cache key), or raise ``TypeError``.

    As ``dumps_value``, NaN and infinities are refused: written as ``null`` they would make
    ``f(nan)`` and ``f(None)`` the same key.
    """
    try:
        data = _dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise TypeError(f"cannot serialize {where}: {exc}") from None
    if data.find(b"null") != -1 and _has_nonfinite(value):
        raise TypeError(f"cannot serialize {where}: NaN and infinity do not round-trip "
                        "through JSON")
    return data


def _has_nonfinite(value: Any) -> bool:
    """Whether orjson would write a NaN or an infinity in ``value`` as ``null``.

    Walks every container orjson serializes natively. orjson has already refused
    anything deeper than its recursion limit, so this recursion is bounded too.
    """
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nonfinite(v) for v in value)
    if isinstance(value, enum.Enum):
        return _has_nonfinite(value.value)  # orjson writes an enum as its value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # orjson writes an instance's __dict__ (extra attributes included), or its slots,
        # leaving out names that start with "_" (which may even point back to the instance).
        attrs = getattr(value, "__dict__", None)
        names = attrs if attrs is not None else [f.name for f in dataclasses.fields(value)]
        return any(_has_nonfinite(getattr(value, name, None))
                   for name in names if not name.startswith("_"))
    return False
