"""Turning user values into stored JSON bytes, with errors that name where they came from."""

from __future__ import annotations

import math
from typing import Any

import orjson

from ._format import NAME_RE

__all__ = ["check_name", "dumps_value"]

_dumps = orjson.dumps


def check_name(name: object, what: str) -> str:
    """A persistent id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``; anything else is a ValueError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid {what} name: name={name!r} "
                         "rule=[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    return name


def dumps_value(value: Any, where: str) -> bytes:
    """Serialize ``value`` with orjson, or raise ``TypeError`` naming ``where``.

    orjson writes NaN and infinities as ``null``, which would replay as a different value;
    they are refused here so that everything recorded round-trips exactly.
    """
    try:
        data = _dumps(value)
    except TypeError as exc:
        raise TypeError(f"cannot serialize value for {where}: {exc}") from None
    # find() rather than `in`: bytes.__contains__ first tries the needle as an int, which
    # costs twice as much on this hot path.
    if data.find(b"null") != -1 and _has_nonfinite(value):
        raise TypeError(f"cannot serialize value for {where}: NaN and infinity do not "
                        "round-trip through JSON")
    return data


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nonfinite(v) for v in value)
    return False
