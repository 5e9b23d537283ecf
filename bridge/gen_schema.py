"""The protocol as the code generators see it: the message models turned into plain data.

`describe()` walks the client and server message unions of `bridge/messages.py` and every model
they nest (the parts), and gives each field a `Shape`: its kind, whether it is nullable, its bounds,
its allowed strings and, for lists and maps, the shape of its items. The error codes and their
meanings come along from `bridge/errors.py`.

It knows the annotations the models use: str, int, float, bool, bytes, `X | None`, `Literal` of
strings, nested models, `list[...]`, `dict[str, ...]` and `Any` (an arbitrary msgpack value), and
the constraints pydantic records for them (ge, gt, le, lt, min/max length, pattern). Anything else
raises `Unsupported`, so a new kind of field stops generation instead of going missing in one
language.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, StringConstraints
from pydantic.fields import FieldInfo

from . import messages as m
from .errors import CLIENT_ONLY, MEANINGS, ErrorCode

__all__ = [
    "Bounds",
    "ErrorSpec",
    "FieldSpec",
    "Kind",
    "ModelSpec",
    "ProtocolSpec",
    "Shape",
    "Unsupported",
    "ValueGroup",
    "bounds_phrases",
    "describe",
    "identifier",
    "pascal",
    "protocol",
    "union_members",
    "upper_snake",
]

Kind = Literal["str", "int", "float", "bool", "bytes", "model", "list", "dict", "any"]
Direction = Literal["client", "server", "part"]

# Names of the constant groups for Literal fields, shared by the languages (C#: a static class of
# that name; GDScript: constants prefixed with it in CONSTANT_CASE). A Literal field not listed
# here gets its model's name followed by its own.
VALUE_GROUP_NAMES: dict[tuple[str, str], str] = {
    ("ChatMessage", "role"): "ChatRole",
    ("AdapterInfo", "kind"): "AdapterKind",
    ("ModelInfo", "kind"): "AdapterKind",
    ("AdapterInfo", "status"): "AdapterStatus",
    ("Result", "finish_reason"): "FinishReason",
    ("ImageResult", "finish_reason"): "FinishReason",
    ("AdapterEvent", "event"): "AdapterEventKind",
    ("Subscribe", "topics"): "SubscribeTopic",
}

_SCALARS: dict[Any, Kind] = {str: "str", int: "int", float: "float", bool: "bool", bytes: "bytes"}
_NUMERIC_KINDS = ("int", "float")
_SIZED_KINDS = ("str", "bytes", "list", "dict")


class Unsupported(TypeError):
    """An annotation or constraint the generators cannot carry into every language."""


@dataclass(frozen=True)
class Bounds:
    """The constraints on one value (None: no such constraint)."""

    ge: int | float | None = None
    gt: int | float | None = None
    le: int | float | None = None
    lt: int | float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None

    def items(self) -> list[tuple[str, int | float | str]]:
        """The constraints that are set, in a fixed order."""
        names = ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")
        return [(n, v) for n in names if (v := getattr(self, n)) is not None]


@dataclass(frozen=True)
class Shape:
    """What one value may be. `item` is a list's item or a map's value; map keys are strings."""

    kind: Kind
    nullable: bool = False
    bounds: Bounds = Bounds()
    values: tuple[str, ...] = ()  # kind "str" from a Literal: the allowed strings
    model: str = ""  # kind "model": the part's class name
    item: Shape | None = None

    def literal(self) -> Shape | None:
        """This shape or the innermost item shape that is a Literal, if any."""
        shape: Shape | None = self
        while shape is not None:
            if shape.values:
                return shape
            shape = shape.item
        return None


@dataclass(frozen=True)
class FieldSpec:
    name: str
    shape: Shape
    required: bool
    default: Any  # the pydantic default; None when required
    description: str


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the Python class name
    doc: str  # its docstring on one line
    fields: tuple[FieldSpec, ...]
    direction: Direction
    type_name: str = ""  # messages: the value of `type`
    cls: type[BaseModel] | None = field(default=None, compare=False, repr=False)

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)

    def wire_fields(self) -> tuple[FieldSpec, ...]:
        """The fields besides the `type` discriminator of a message."""
        return tuple(f for f in self.fields if not (self.type_name and f.name == "type"))


@dataclass(frozen=True)
class ErrorSpec:
    name: str  # the ErrorCode member: BAD_FRAME
    code: str  # its value: bad_frame
    meaning: str
    client_only: bool


@dataclass(frozen=True)
class ValueGroup:
    """The allowed strings of one or more Literal fields, under one name."""

    name: str
    values: tuple[str, ...]
    users: tuple[tuple[str, str], ...]  # (model, field) pairs


@dataclass(frozen=True)
class ProtocolSpec:
    version: int
    client: tuple[ModelSpec, ...]
    server: tuple[ModelSpec, ...]
    parts: tuple[ModelSpec, ...]
    errors: tuple[ErrorSpec, ...]
    groups: tuple[ValueGroup, ...] = field(default=())

    @property
    def messages(self) -> tuple[ModelSpec, ...]:
        return self.client + self.server

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return self.client + self.server + self.parts

    def group_of(self, model: str, field_name: str) -> ValueGroup | None:
        return next((g for g in self.groups if (model, field_name) in g.users), None)


# ---------------------------------------------------------------- names


def pascal(snake: str) -> str:
    """tokens_per_s -> TokensPerS."""
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_") if part)


def upper_snake(name: str) -> str:
    """AdapterRef -> ADAPTER_REF, finish_reason -> FINISH_REASON."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def identifier(value: str, where: str) -> str:
    """A PascalCase name for an allowed string ("cuda:1" -> "Cuda1"), or Unsupported."""
    name = "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", value) if p)
    if not name or not name[0].isalpha():
        raise Unsupported(f"{where}: the value {value!r} has no usable constant name")
    return name


# ---------------------------------------------------------------- constraints


def _constraint_items(item: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(item, FieldInfo):  # Annotated[int, Field(ge=0)] keeps its constraints inside
        for inner in item.metadata:
            yield from _constraint_items(inner, where)
        return
    if isinstance(item, annotated_types.Ge | annotated_types.Gt | annotated_types.Le | annotated_types.Lt):
        name = type(item).__name__.lower()
        yield name, getattr(item, name)
        return
    if isinstance(item, annotated_types.MinLen):
        yield "min_length", item.min_length
        return
    if isinstance(item, annotated_types.MaxLen):
        yield "max_length", item.max_length
        return
    if isinstance(item, StringConstraints):
        transforms = ("strip_whitespace", "to_upper", "to_lower", "strict", "ascii_only")
        if any(getattr(item, t) for t in transforms):
            raise Unsupported(f"{where}: string constraint {item!r} changes or restricts values beyond bounds")
        for name in ("min_length", "max_length", "pattern"):
            value = getattr(item, name)
            if value is not None:
                yield name, value if isinstance(value, int | str) else value.pattern
        return
    raise Unsupported(f"{where}: constraint {item!r} is not supported")


def _tighter(name: str, old: Any, new: Any, where: str) -> Any:
    if old is None or old == new:
        return new
    if name in ("ge", "gt", "min_length"):
        return max(old, new)
    if name in ("le", "lt", "max_length"):
        return min(old, new)
    raise Unsupported(f"{where}: two different {name} constraints")


def _bounds(metadata: Sequence[Any], where: str) -> Bounds:
    found: dict[str, Any] = {}
    for item in metadata:
        for name, value in _constraint_items(item, where):
            found[name] = _tighter(name, found.get(name), value, where)
    return Bounds(**found)


def _check_bounds(shape: Shape, where: str) -> None:
    b = shape.bounds
    numeric = any(v is not None for v in (b.ge, b.gt, b.le, b.lt))
    sized = b.min_length is not None or b.max_length is not None
    if numeric and shape.kind not in _NUMERIC_KINDS:
        raise Unsupported(f"{where}: numeric bounds on a {shape.kind}")
    if sized and shape.kind not in _SIZED_KINDS:
        raise Unsupported(f"{where}: length bounds on a {shape.kind}")
    if b.pattern is not None and shape.kind != "str":
        raise Unsupported(f"{where}: a pattern on a {shape.kind}")


def bounds_phrases(shape: Shape) -> list[str]:
    """The bounds of `shape` (and of its items) in words, for doc comments."""
    b = shape.bounds
    phrases = []
    low = f"at least {b.ge}" if b.ge is not None else f"more than {b.gt}" if b.gt is not None else ""
    high = f"at most {b.le}" if b.le is not None else f"less than {b.lt}" if b.lt is not None else ""
    if low or high:
        phrases.append(", ".join(p for p in (low, high) if p))
    unit = {"str": "characters", "bytes": "bytes", "list": "items", "dict": "entries"}.get(shape.kind, "")
    if b.min_length is not None and b.max_length is not None:
        phrases.append(f"{b.min_length} to {b.max_length} {unit}")
    elif b.max_length is not None:
        phrases.append(f"at most {b.max_length} {unit}")
    elif b.min_length is not None:
        phrases.append(f"at least {b.min_length} {unit}")
    if b.pattern is not None:
        phrases.append(f"matches `{b.pattern}`")
    if shape.item is not None and shape.kind in ("list", "dict"):
        inner = bounds_phrases(shape.item)
        if inner:
            phrases.append(("each item: " if shape.kind == "list" else "each value: ") + "; ".join(inner))
    return phrases


# ---------------------------------------------------------------- the walk


class _Walker:
    """Describes models field by field, collecting the parts they nest in order of appearance."""

    def __init__(self) -> None:
        self.parts: dict[str, type[BaseModel]] = {}

    def shape(self, tp: Any, metadata: tuple[Any, ...], where: str) -> Shape:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.shape(args[0], (*metadata, *tp.__metadata__), where)
        if origin is typing.Union or origin is types.UnionType:
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1 or len(rest) == len(args):
                raise Unsupported(f"{where}: {tp} (of unions only `X | None` is supported)")
            return replace(self.shape(rest[0], metadata, where), nullable=True)
        shape = self._plain(tp, origin, args, _bounds(metadata, where), where)
        _check_bounds(shape, where)
        return shape

    def _plain(self, tp: Any, origin: Any, args: tuple[Any, ...], bounds: Bounds, where: str) -> Shape:
        if origin is typing.Literal:
            if not args or not all(isinstance(a, str) for a in args):
                raise Unsupported(f"{where}: {tp} (only Literals of strings are supported)")
            return Shape("str", bounds=bounds, values=tuple(args))
        if origin is list and len(args) == 1:
            return Shape("list", bounds=bounds, item=self.shape(args[0], (), f"{where}[]"))
        if origin is dict and len(args) == 2:
            if args[0] is not str:
                raise Unsupported(f"{where}: {tp} (map keys must be str)")
            return Shape("dict", bounds=bounds, item=self.shape(args[1], (), f"{where}{{}}"))
        if tp is Any:
            return Shape("any", bounds=bounds)
        if origin is None and tp in _SCALARS:
            return Shape(_SCALARS[tp], bounds=bounds)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return Shape("model", bounds=bounds, model=self._part(tp, where))
        raise Unsupported(f"{where}: annotation {tp!r} is not supported")

    def _part(self, model: type[BaseModel], where: str) -> str:
        known = self.parts.setdefault(model.__name__, model)
        if known is not model:
            raise Unsupported(f"{where}: two models are called {model.__name__}")
        return model.__name__

    def field(self, model: type[BaseModel], name: str, info: FieldInfo) -> FieldSpec:
        where = f"{model.__name__}.{name}"
        if info.alias or info.validation_alias or info.serialization_alias or info.exclude:
            raise Unsupported(f"{where}: aliases and excluded fields are not supported (the wire key is the name)")
        shape = self.shape(info.annotation, tuple(info.metadata), where)
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        return FieldSpec(name, shape, required, default, " ".join((info.description or "").split()))

    def model(self, model: type[BaseModel], direction: Direction) -> ModelSpec:
        if model.model_config.get("extra") != "forbid":
            raise Unsupported(f"{model.__name__}: models must forbid extra fields (clients refuse unknown ones)")
        fields = tuple(self.field(model, n, info) for n, info in model.model_fields.items())
        doc = " ".join((model.__doc__ or "").split())
        if direction == "part":
            return ModelSpec(model.__name__, doc, fields, direction, cls=model)
        kind = model.model_fields.get("type")
        literal = kind is not None and typing.get_origin(kind.annotation) is typing.Literal
        if kind is None or not literal or not isinstance(kind.default, str):
            raise Unsupported(f"{model.__name__}: a message needs `type: Literal[NAME] = NAME`")
        return ModelSpec(model.__name__, doc, fields, direction, kind.default, cls=model)


def union_members(union: Any) -> list[type[BaseModel]]:
    """The models of a message union (`Annotated[A | B, Field(discriminator=...)]`) or of a list."""
    if isinstance(union, list | tuple):
        members = list(union)
    else:
        if typing.get_origin(union) is typing.Annotated:
            union = typing.get_args(union)[0]
        members = list(typing.get_args(union)) or [union]
    for member in members:
        if not (isinstance(member, type) and issubclass(member, BaseModel)):
            raise Unsupported(f"message union member {member!r} is not a model")
    return members


def _groups(models: Sequence[ModelSpec]) -> tuple[ValueGroup, ...]:
    values: dict[str, list[str]] = {}
    users: dict[str, list[tuple[str, str]]] = {}
    for model in models:
        for f in model.wire_fields():
            literal = f.shape.literal()
            if literal is None:
                continue
            name = VALUE_GROUP_NAMES.get((model.name, f.name)) or model.name + pascal(f.name)
            known = values.setdefault(name, [])
            known += [v for v in literal.values if v not in known]
            users.setdefault(name, []).append((model.name, f.name))
    for name, allowed in values.items():
        idents = [identifier(v, name) for v in allowed]
        if len(set(idents)) != len(idents):
            raise Unsupported(f"{name}: two values share a constant name ({allowed})")
    return tuple(ValueGroup(n, tuple(v), tuple(users[n])) for n, v in values.items())


def describe(client: Any, server: Any, *, version: int,
             meanings: dict[ErrorCode, str] | None = None,
             client_only: frozenset[ErrorCode] = frozenset()) -> ProtocolSpec:
    """The protocol of the `client` and `server` message unions (or lists of models)."""
    walker = _Walker()
    client_specs = tuple(walker.model(cls, "client") for cls in union_members(client))
    server_specs = tuple(walker.model(cls, "server") for cls in union_members(server))
    messages = client_specs + server_specs
    names = [s.name for s in messages]
    types_ = [s.type_name for s in messages]
    if len(set(names)) != len(names) or len(set(types_)) != len(types_):
        raise Unsupported("message class names and type names must be unique")
    parts: list[ModelSpec] = []
    seen: set[str] = set()
    while len(seen) < len(walker.parts):  # parts may nest further parts: walk until none is new
        for name, cls in list(walker.parts.items()):
            if name not in seen:
                if name in names:
                    raise Unsupported(f"{name} is both a message and a part of one")
                seen.add(name)
                parts.append(walker.model(cls, "part"))
    errors = tuple(ErrorSpec(code.name, code.value, (meanings or {})[code], code in client_only)
                   for code in (meanings or {}))
    return ProtocolSpec(version, client_specs, server_specs, tuple(parts), errors, _groups(messages + tuple(parts)))


_PROTOCOL: list[ProtocolSpec] = []


def protocol() -> ProtocolSpec:
    """The protocol of bridge/messages.py and bridge/errors.py (described once)."""
    if not _PROTOCOL:
        missing = [c for c in ErrorCode if c not in MEANINGS]
        if missing:
            raise Unsupported(f"error codes without a meaning in bridge/errors.py: {missing}")
        _PROTOCOL.append(describe(m.ClientMessage, m.ServerMessage, version=m.PROTOCOL_VERSION,
                                  meanings={c: MEANINGS[c] for c in ErrorCode}, client_only=CLIENT_ONLY))
    return _PROTOCOL[0]
