"""A str-keyed mapping split into parts, so a big one never grows in one long C call.

CPython grows a dict by copying every entry into a new table twice the size, in one C
call that holds the GIL and so stalls the event loop, whatever thread makes it. Measured
on the 2-core Xeon VM (``benchmarks/state.py``): 3 ms at 87k keys, 6 ms at 175k, 12 ms at
350k, 28 ms at 700k. A million-key table went through that last copy while it opened (or
while it grew), a 30 ms stall that no pacing could cut. Split 64 ways by key hash, each
part grows on its own, at a 64th of the size: at most 3 ms up to 5.5M keys, 6 ms up to 11M.

The price: about 60 ns more per lookup (``hash(key) & MASK`` and a list index; a str
caches its hash), and iteration goes part by part. Within a part it follows insertion
order, but which part a key falls in depends on the str hash, which CPython salts per
process (``PYTHONHASHSEED``): the order of iteration is not insertion order and may differ
between runs. Hot paths index ``parts`` themselves, with ``part_of``'s formula inlined.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

__all__ = ["MASK", "ShardedDict"]

V = TypeVar("V")

#: A key's part is ``parts[hash(key) & MASK]``.
MASK = 63


class ShardedDict(MutableMapping[str, V], Generic[V]):
    """``str -> V``, held as ``MASK + 1`` dicts; see the module's docstring for why."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[dict[str, V]] = [{} for _ in range(MASK + 1)]

    def part_of(self, key: str) -> dict[str, V]:
        """The dict that holds ``key`` (or would)."""
        return self.parts[hash(key) & MASK]

    def __getitem__(self, key: str) -> V:
        return self.parts[hash(key) & MASK][key]

    def __setitem__(self, key: str, value: V) -> None:
        self.parts[hash(key) & MASK][key] = value

    def __delitem__(self, key: str) -> None:
        del self.parts[hash(key) & MASK][key]

    def __contains__(self, key: object) -> bool:
        return key in self.parts[hash(key) & MASK]  # unhashable: TypeError, as a dict

    def get(self, key: str, default: V | None = None) -> V | None:  # type: ignore[override]
        return self.parts[hash(key) & MASK].get(key, default)

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self.parts)

    def __len__(self) -> int:
        return sum(map(len, self.parts))

    def values_list(self) -> list[V]:
        """Every value, in one list: a copy of the references, for a snapshot."""
        out: list[V] = []
        for part in self.parts:
            out.extend(part.values())
        return out

    def clear(self) -> None:
        for part in self.parts:
            part.clear()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} len={len(self)}>"
