"""A codec decides what is stored: one that writes NaN as text is stored on every path
(record with and without an offset, a live source, a table), and replays as it wrote it;
an untyped NaN is still refused."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import apersist


def _encode(value: dict[str, Any]) -> dict[str, Any]:
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in value.items()}


def _decode(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: math.nan if v == "nan" else v for k, v in raw.items()}


NAN_AS_TEXT = apersist.Codec(encode=_encode, decode=_decode)


def _is_the_value(got: dict[str, Any]) -> bool:
    return set(got) == {"a", "b"} and math.isnan(got["a"]) and got["b"] is None


async def test_a_codec_that_stores_nan_as_text_is_stored_on_every_path(tmp_path: Path) -> None:
    config = apersist.Config(apersist.Backend.filesystem(tmp_path))
    value = {"a": math.nan, "b": None}  # its JSON has a "null": the NaN probe's case

    async def one(offset: Any) -> AsyncIterator[tuple[dict[str, Any], int]]:
        yield value, 1

    async with apersist.run(config) as run:
        stream = run.stream("plain", codec=NAN_AS_TEXT)
        await stream.record(value)
        await stream.record(value, offset=7)
        live = [e.value async for e in run.source("live", one, codec=NAN_AS_TEXT)]
        assert len(live) == 1
        table = await run.table("t", codec=NAN_AS_TEXT)
        table["k"] = value
    async with apersist.run(config) as run:
        plain = [e.value async for e in run.stream("plain", codec=NAN_AS_TEXT).replay()]
        assert len(plain) == 2
        assert all(_is_the_value(v) for v in plain)
        replayed = [e.value async for e in run.stream("live", codec=NAN_AS_TEXT).replay()]
        assert len(replayed) == 1
        assert _is_the_value(replayed[0])
        assert _is_the_value((await run.table("t", codec=NAN_AS_TEXT))["k"])


async def test_an_untyped_nan_is_still_refused(tmp_path: Path) -> None:
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path))) as run:
        with pytest.raises(TypeError, match="NaN"):
            await run.stream("s").record({"a": math.nan, "b": None})
        table = await run.table("t")
        with pytest.raises(TypeError, match="NaN"):
            table["k"] = {"a": math.nan, "b": None}
