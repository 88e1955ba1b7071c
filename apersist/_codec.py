"""Values of the user's own types: ``type=`` and ``codec=`` turned into JSON and back.

A stream, source or table given ``type=`` (or ``codec=``) stores each value as JSON, as an
untyped one does, and gives it back as that type, live and replayed alike. Dataclasses are
always understood; pydantic and msgspec models when those packages are installed (they are
never imported here unless the user's type comes from them). A dataclass's fields are
decoded by their annotations, so ``Decimal``, ``datetime``, ``date``, ``time``, ``UUID``,
``bytes``, enums, nested dataclasses and containers of them round-trip.
"""

from __future__ import annotations

import base64
import collections.abc
import dataclasses
import datetime as dt
import decimal
import enum
import sys
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import orjson

from ._values import _has_nonfinite

__all__ = ["Codec", "ValueCodec", "next_codec", "value_codec"]

T = TypeVar("T")

_dumps = orjson.dumps
_Decoder = Callable[[Any], Any]


# Frozen, without slots: ``Codec[Money](...)`` sets ``__orig_class__``, and the __setattr__
# of a frozen dataclass with slots fails on that with a TypeError on Python 3.11 (its
# ``super()`` points at the class before slots were added), where a FrozenInstanceError
# (an AttributeError, which typing ignores) is what should come.
@dataclasses.dataclass(frozen=True)
class Codec(Generic[T]):
    """How to store values of a type apersist does not know: ``encode`` turns a value into
    something ``orjson`` can serialize (dicts, lists, str, int, float, bool, None), and
    ``decode`` turns that JSON back into the value.

    Give it as ``codec=`` to ``run.stream()``, ``run.source()``, ``run.source_batches()``
    or ``run.table()``. Raises ``TypeError`` if either is not callable.
    """

    encode: Callable[[T], Any]
    decode: Callable[[Any], T]

    def __post_init__(self) -> None:
        for name in ("encode", "decode"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Codec.{name} must be callable: "
                                f"got={type(getattr(self, name)).__name__}")


class ValueCodec:
    """A ``type=`` or ``codec=`` resolved once, for a stream or table of a run.

    ``dumps(value)`` is the value's stored JSON (``TypeError`` if it is not of the type or
    cannot be stored; NaN and infinities are refused here as well); ``decode`` is the value
    back from its JSON, or None when the JSON is the value already (``type=dict``).
    ``label`` names the type in messages; ``key`` is what a second request must match.
    """

    __slots__ = ("decode", "dumps", "key", "label")

    def __init__(self, key: object, label: str, dumps: Callable[[Any], bytes],
                 decode: _Decoder | None) -> None:
        self.key = key
        self.label = label
        self.dumps = dumps
        self.decode = decode

    def decode_values(self, values: list[Any], offsets: list[Any] | None, first: int,
                      where: str) -> list[Any]:
        """``values`` (one replayed chunk, the ``first``-th event of the replay first)
        decoded; ``ValueError`` naming ``where``, the event's position and offset if one
        does not fit the type."""
        decode = self.decode
        if decode is None:
            return values
        decoded: list[Any] = []
        try:
            # extend() keeps what map() gave before it raised: the culprit is the next
            # value. (Decoding the chunk again to find it would not do: a dataclass's
            # decoder converts its dict in place, so a value decoded once fails a second
            # time, and the message would name that event, with an error not its own.)
            decoded.extend(map(decode, values))
        except Exception as exc:
            index = len(decoded)
            offset = None if offsets is None else offsets[index]
            raise ValueError(
                f"cannot decode a stored value of {where} as {self.label}: "
                f"position={first + index} offset={offset!r} error={exc}") from exc
        return decoded

    def decode_one(self, value: Any, where: str) -> Any:
        """One stored value decoded (a table's), ``ValueError`` naming ``where``."""
        decode = self.decode
        if decode is None:
            return value
        try:
            return decode(value)
        except Exception as exc:
            raise ValueError(f"cannot decode a stored value of {where} as {self.label}: "
                             f"error={exc}") from exc


def value_codec(value_type: Any, codec: Codec[Any] | None) -> ValueCodec | None:
    """The ``ValueCodec`` for ``type=value_type`` or ``codec=codec`` (None if neither).

    Raises ``TypeError`` at the call for both at once, a ``codec`` that is not an
    ``apersist.Codec``, or a type whose values apersist cannot store and decode (a field
    of it included), with what to do instead.
    """
    if codec is not None:
        if value_type is not None:
            raise TypeError("give type= or codec=, not both: "
                            f"type={_name(value_type)} codec={codec!r}")
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be an apersist.Codec: got={type(codec).__name__}")
        return ValueCodec(codec, f"codec {_name(codec.decode)}", _codec_dumps(codec),
                          codec.decode)
    if value_type is None:
        return None
    decode = _decoder(value_type, _name(value_type), {})
    classes = _instance_check(value_type)
    check = None if classes is None else classes[0] if len(classes) == 1 else classes
    to_builtins: Callable[[Any], Any] | None = None
    if _is_pydantic(value_type):
        to_builtins = _pydantic_dump
    elif _is_msgspec(value_type):
        to_builtins = sys.modules["msgspec"].to_builtins
    return ValueCodec(value_type, _name(value_type),
                      _typed_dumps(check, _name(value_type), to_builtins), decode)


def next_codec(has: ValueCodec | None, value_type: Any, codec: Codec[Any] | None,
               where: str) -> ValueCodec | None:
    """What a stream or table of a run (``where``, with ``has`` its codec so far) takes for
    ``type=value_type`` or ``codec=codec``: the first call that names one fixes it for the
    run; None when the call names none or the one it has already. Another type later
    raises ``TypeError`` naming both."""
    key = codec if codec is not None else value_type
    if key is None or (has is not None and has.key == key):
        return None
    resolved = value_codec(value_type, codec)
    assert resolved is not None
    if has is not None:
        raise TypeError(f"{where} already has a type in this run: "
                        f"has={has.label} asked={resolved.label}")
    return resolved


def _instance_check(tp: Any) -> tuple[type, ...] | None:
    """The classes a value of ``tp`` is an instance of, for the check at the call: the
    type itself, a union's members, a generic's origin (``list[Order]``: a list), or None
    where no class tells (``Any``, ``Literal``). A float annotation takes ints too."""
    if tp is float:
        return (int, float)
    if tp is Any or tp is object:  # Any is a class on 3.11, which isinstance() refuses
        return None
    if isinstance(tp, type):
        return (tp,)
    if isinstance(tp, typing.NewType):
        return _instance_check(tp.__supertype__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _instance_check(args[0])
    if origin is typing.Union or origin is types.UnionType:
        classes: tuple[type, ...] = ()
        for arg in args:
            more = _instance_check(arg)
            if more is None:
                return None
            classes += more
        return classes
    if isinstance(origin, type):
        return (origin,)
    return None


def _name(obj: Any) -> str:
    if isinstance(obj, type):
        return obj.__qualname__
    return getattr(obj, "__qualname__", None) or repr(obj)


def _pydantic_dump(value: Any) -> Any:
    # What model_validate takes back: fields by alias (as it reads them), and no computed
    # fields (round_trip), which a model with extra="forbid" would refuse.
    return value.model_dump(mode="json", by_alias=True, round_trip=True)


class _NonFinite(TypeError):
    """NaN or an infinity, found where orjson would have written null."""


def _nonfinite() -> TypeError:
    return _NonFinite("NaN and infinity do not round-trip through JSON")


def _typed_dumps(check: type | tuple[type, ...] | None, expected: str,
                 to_builtins: Callable[[Any], Any] | None) -> Callable[[Any], bytes]:
    def dumps(value: Any) -> bytes:
        if check is not None and not isinstance(value, check):
            raise TypeError(f"expected a value of type {expected}: got={type(value).__qualname__}")
        if to_builtins is None:
            obj = value
        else:
            try:
                obj = to_builtins(value)
            except (TypeError, ValueError) as exc:  # the model's own dump refused it
                raise TypeError(f"{expected} could not be dumped by its library: "
                                f"{type(exc).__name__}: {exc}") from exc
        try:
            data = _dumps(obj, _default)
        except TypeError as exc:  # orjson's message drops _default's: give that one
            if isinstance(exc.__cause__, _NonFinite):
                raise _nonfinite() from None
            raise
        if 117 in data and data.partition(b"null")[1] and _has_nonfinite(obj):
            raise _nonfinite()
        return data

    return dumps


def _codec_dumps(codec: Codec[Any]) -> Callable[[Any], bytes]:
    encode = codec.encode

    def dumps(value: Any) -> bytes:
        obj = encode(value)
        data = _dumps(obj)
        if 117 in data and data.partition(b"null")[1] and _has_nonfinite(obj):
            raise _nonfinite()
        return data

    return dumps


def _default(obj: Any) -> Any:
    """What orjson does not write itself, in a typed value: undone by the field's decoder."""
    if isinstance(obj, decimal.Decimal):
        return str(obj)  # exact: "1.10" stays 1.10, with its exponent
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, set | frozenset):
        out: Any = list(obj)
    elif _is_pydantic(type(obj)):
        out = _pydantic_dump(obj)
    elif _is_msgspec(type(obj)):
        out = sys.modules["msgspec"].to_builtins(obj)
    else:
        raise TypeError(f"Type is not JSON serializable: {type(obj).__qualname__}")
    # orjson writes NaN and infinities in what this returns as null; the value's own walk
    # (_has_nonfinite) does not look inside sets and models.
    if _has_nonfinite(out):
        raise _nonfinite()
    return out


def _is_pydantic(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")
    return (pydantic is not None and isinstance(tp, type)
            and issubclass(tp, pydantic.BaseModel))


def _is_msgspec(tp: Any) -> bool:
    msgspec = sys.modules.get("msgspec")
    return (msgspec is not None and isinstance(tp, type)
            and issubclass(tp, msgspec.Struct))


def _decimal(value: Any) -> decimal.Decimal:
    # From text (what is stored); a number written by hand goes through its text too, so
    # 0.1 is Decimal("0.1"), not its binary expansion.
    return decimal.Decimal(value if isinstance(value, str) else str(value))


def _date(value: Any) -> dt.date:
    # A datetime is a date (a date field may hold one): its text is longer than a date's.
    if isinstance(value, str) and len(value) > 10:
        return dt.datetime.fromisoformat(value)
    return dt.date.fromisoformat(value)


def _bytes(value: Any) -> bytes:
    return base64.b64decode(value, validate=True)


# Annotations whose JSON is the value already.
_IDENTITY: set[Any] = {Any, object, str, int, float, bool, type(None), None, dict, list,
                       typing.Any}
_SCALARS: dict[Any, _Decoder] = {
    decimal.Decimal: _decimal,
    dt.datetime: dt.datetime.fromisoformat,
    dt.date: _date,
    dt.time: dt.time.fromisoformat,
    uuid.UUID: uuid.UUID,
    bytes: _bytes,
    bytearray: lambda value: bytearray(_bytes(value)),
}
_SEQUENCES = {list, collections.abc.Sequence, collections.abc.MutableSequence,
              collections.abc.Iterable, collections.abc.Collection}
_SETS = {set: set, frozenset: frozenset, collections.abc.Set: frozenset,
         collections.abc.MutableSet: set}
_MAPPINGS = {dict, collections.abc.Mapping, collections.abc.MutableMapping}


def _decoder(tp: Any, what: str, memo: dict[type, list[_Decoder | None]]) -> _Decoder | None:
    """The function that turns ``tp``'s JSON back into a ``tp`` (None: the JSON is it).

    ``what`` names ``tp`` in the ``TypeError`` for a type this cannot decode; ``memo``
    holds the dataclasses being built, for types that refer to themselves.
    """
    try:
        hash(tp)
    except TypeError:  # an annotation with unhashable metadata: looked at by its origin
        pass
    else:
        if tp in _IDENTITY:
            return None
        scalar = _SCALARS.get(tp)
        if scalar is not None:
            return scalar
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            _check_enum(tp, what)
            return tp
        if dataclasses.is_dataclass(tp):
            return _dataclass_decoder(tp, memo)
        if _is_pydantic(tp):
            return tp.model_validate  # type: ignore[attr-defined,no-any-return]
        if _is_msgspec(tp):
            convert = sys.modules["msgspec"].convert
            return lambda value: convert(value, tp)
        if tp is tuple:
            return tuple
        if tp in _SETS:
            return _SETS[tp]
    if isinstance(tp, typing.NewType):
        return _decoder(tp.__supertype__, what, memo)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _decoder(args[0], what, memo)
    if origin is typing.Literal:
        return None
    if origin is typing.Union or origin is types.UnionType:
        options = [arg for arg in args if arg is not type(None)]
        decoders = [_decoder(arg, what, memo) for arg in options]
        if all(d is None for d in decoders):
            return None
        if len(options) == 1:
            inner = decoders[0]
            assert inner is not None
            return lambda value: None if value is None else inner(value)
    elif origin in _SEQUENCES:
        item = _decoder(args[0], what, memo) if args else None
        if item is None:
            return None if origin is list or not args else list
        return _mapped(list, item)
    elif origin in _SETS:
        make = _SETS[origin]
        item = _decoder(args[0], what, memo) if args else None
        return make if item is None else _mapped(make, item)
    elif origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0], what, memo)
            return tuple if item is None else _mapped(tuple, item)
        items = [_decoder(arg, what, memo) or _same for arg in args]
        return lambda value: tuple(f(v) for f, v in zip(items, value, strict=True))
    elif origin in _MAPPINGS:
        if args and args[0] not in (str, Any):
            raise TypeError(f"apersist cannot store {what}: JSON object keys are strings, "
                            f"got key type {_name(args[0])}; use dict[str, ...] or "
                            "codec=apersist.Codec(encode=..., decode=...)")
        item = _decoder(args[1], what, memo) if len(args) == 2 else None
        if item is None:
            return None
        return lambda value: {key: item(v) for key, v in value.items()}
    raise TypeError(f"apersist cannot store {what}: type={_name(tp)} is not a dataclass, a "
                    "pydantic or msgspec model, nor a type JSON can give back; give "
                    "codec=apersist.Codec(encode=..., decode=...)")


def _check_enum(tp: type[enum.Enum], what: str) -> None:
    """orjson writes an enum as its value: each value must come back from JSON as itself
    (a tuple comes back a list, a Decimal is refused), or ``TypeError``."""
    for member in tp:
        try:
            back = orjson.loads(_dumps(member.value))
        except TypeError:
            back = _dumps  # not the value, whatever it is
        if type(back) is not type(member.value) or back != member.value:
            raise TypeError(f"apersist cannot store {what}: the value of {_name(tp)}."
                            f"{member.name} ({member.value!r}) does not come back from JSON "
                            "as itself; give the enum str or int values, or give "
                            "codec=apersist.Codec(encode=..., decode=...)")


def _same(value: Any) -> Any:
    return value


def _mapped(make: Callable[[Any], Any], item: _Decoder) -> _Decoder:
    return lambda value: make(map(item, value))


def _dataclass_decoder(cls: type, memo: dict[type, list[_Decoder | None]]) -> _Decoder:
    """``cls(**fields)``, each field decoded by its annotation."""
    if cls in memo:  # a type that refers to itself: decode through the cell being built
        building = memo[cls]
        return lambda value: building[0](value)  # type: ignore[misc]
    cell: list[_Decoder | None] = [None]
    memo[cls] = cell
    try:
        # The class's own name resolves too: a class defined in a function may name itself.
        hints = typing.get_type_hints(cls, localns={cls.__name__: cls})
    except Exception as exc:
        raise TypeError(f"apersist cannot read the annotations of {_name(cls)} (define the "
                        f"types it names at module level): {exc}") from exc
    fields = dataclasses.fields(cls)
    for f in fields:
        if f.init and f.name.startswith("_"):
            raise TypeError(f"apersist cannot store field {_name(cls)}.{f.name}: orjson leaves "
                            "out attributes whose names start with '_'; rename the field, or "
                            "give codec=apersist.Codec(encode=..., decode=...)")
    for name, f in cls.__dataclass_fields__.items():  # type: ignore[attr-defined]
        if (isinstance(hints.get(name), dataclasses.InitVar)
                and f.default is dataclasses.MISSING):
            raise TypeError(f"apersist cannot store {_name(cls)}: its InitVar {name} is not "
                            "stored, and __init__ needs it to rebuild a value; give it a "
                            "default, or give codec=apersist.Codec(encode=..., decode=...)")
    dropped = frozenset(f.name for f in fields if not f.init)  # orjson writes them; __init__ sets them
    init_names = frozenset(f.name for f in fields if f.init) | frozenset(
        name for name, f in cls.__dataclass_fields__.items()  # type: ignore[attr-defined]
        if isinstance(hints.get(name), dataclasses.InitVar))
    convert = [(f.name, d) for f in fields if f.init
               for d in [_decoder(hints.get(f.name, Any), f"field {_name(cls)}.{f.name}", memo)]
               if d is not None]

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise TypeError(f"expected a JSON object for {cls.__qualname__}: "
                            f"got={type(value).__name__}")
        if dropped:
            value = {key: item for key, item in value.items() if key not in dropped}
        # The dict is the replay's own (orjson.loads made it for this event): converted in
        # place, not copied.
        for name, field_decoder in convert:
            if name in value:
                value[name] = field_decoder(value[name])
        try:
            return cls(**value)
        except TypeError:
            # Names __init__ does not take: attributes orjson wrote besides the fields
            # (set in __post_init__, or a subclass's fields), or fields the class no
            # longer has. Left out, as pydantic and msgspec leave out unknown fields; a
            # value that fails without them fails for its own reason.
            known = {key: item for key, item in value.items() if key in init_names}
            if len(known) == len(value):
                raise
            return cls(**known)

    cell[0] = decode
    return decode
