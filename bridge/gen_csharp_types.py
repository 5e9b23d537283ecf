"""C# text for the protocol generator (bridge/gen_csharp.py): doc comments and string literals, the
C# type of a field's shape, the MsgPack read and write of a value, and default-value initialisers."""

from __future__ import annotations

import math
import textwrap
from typing import Any

from .gen_schema import FieldSpec, Shape, Unsupported

__all__ = ["CLASS_NAMES", "I1", "I2", "I3", "I4", "WIDTH", "class_name", "cs_str", "cs_type", "doc_comment",
           "initializer", "read_value", "sentence", "write_field", "xml_text"]

# C# names that differ from the model's: the names the package's public API has always had.
CLASS_NAMES = {"Adapters": "AdapterList"}
_INT32 = (-(2**31), 2**31 - 1)
WIDTH = 120
I1, I2, I3, I4 = "    ", "        ", "            ", "                "

# ---------------------------------------------------------------- text


def cs_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ord(ch) > 0x7E:
            out += [f"\\u{unit:04x}" for unit in _utf16(ch)]
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _utf16(ch: str) -> list[int]:
    data = ch.encode("utf-16-be")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def xml_text(text: str) -> str:
    """Plain text (with `code` spans) as the body of an XML doc comment, in ASCII."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    pieces = text.split("`")
    if len(pieces) % 2 == 1:
        text = "".join(p if i % 2 == 0 else f"<c>{p}</c>" for i, p in enumerate(pieces))
    return "".join(ch if ord(ch) < 0x80 else f"&#x{ord(ch):x};" for ch in text)


def sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def doc_comment(xml: str, indent: str) -> list[str]:
    if not xml:
        return []
    one = f"{indent}/// <summary>{xml}</summary>"
    if len(one) <= WIDTH:
        return [one]
    # A tag is never split across lines: its inner spaces are held back while wrapping.
    held = xml.replace("<see cref=", "<see\0cref=").replace("<paramref name=", "<paramref\0name=")
    lines = [line.replace("\0", " ") for line in textwrap.wrap(
        held, width=WIDTH - len(indent) - 4, break_long_words=False, break_on_hyphens=False)]
    return [f"{indent}/// <summary>", *(f"{indent}/// {line}" for line in lines), f"{indent}/// </summary>"]



# ---------------------------------------------------------------- types, reads and writes


def class_name(model: str) -> str:
    return CLASS_NAMES.get(model, model)


def _wide(shape: Shape) -> bool:
    b = shape.bounds
    lows = [v for v in (b.ge, b.gt) if v is not None]
    highs = [v for v in (b.le, b.lt) if v is not None]
    return any(v < _INT32[0] for v in lows) or any(v > _INT32[1] for v in highs)


def _value_type(shape: Shape, wide: bool) -> str:
    if shape.kind == "int":
        return "long" if wide or _wide(shape) else "int"
    return {"float": "double", "bool": "bool"}.get(shape.kind, "")


def cs_type(shape: Shape, wide: bool = False) -> str:
    """The C# type of a value of `shape` (`wide`: an int field read as long)."""
    value = _value_type(shape, wide)
    if value:
        return value + "?" if shape.nullable else value
    if shape.kind in ("list", "dict"):
        assert shape.item is not None
        inner = cs_type(shape.item)
        return f"List<{inner}>" if shape.kind == "list" else f"Dictionary<string, {inner}>"
    if shape.kind == "model":
        return class_name(shape.model)
    return {"str": "string", "bytes": "byte[]", "any": "object"}[shape.kind]


_VALUE_READS = {"int": ("ReadInt32", "NullableInt"), "long": ("ReadInt64", "NullableLong"),
                "double": ("ReadDouble", "NullableDouble"), "bool": ("ReadBool", "NullableBool")}


def read_value(shape: Shape, r: str, depth: int, wide: bool = False) -> str:
    """A C# expression reading a value of `shape` from the reader `r` (nil only where nullable)."""
    value = _value_type(shape, wide)
    if value:
        strict, nullable = _VALUE_READS[value]
        return f"Wire.{nullable}({r})" if shape.nullable else f"{r}.{strict}()"
    if shape.kind == "any":
        return f"{r}.ReadValue()"
    if shape.kind == "str":
        return f"{r}.ReadStringOrNull()" if shape.nullable else f"{r}.ReadString()"
    if shape.kind == "bytes":
        strict = f"{r}.ReadBinary()"
    elif shape.kind == "model":
        strict = f"Wire.Read({r}, new {class_name(shape.model)}())"
    else:
        assert shape.item is not None
        inner = f"r{depth + 1}"
        helper = "ReadList" if shape.kind == "list" else "ReadDict"
        strict = f"Wire.{helper}({r}, {inner} => {read_value(shape.item, inner, depth + 1)})"
    return f"({r}.TryReadNil() ? null : {strict})" if shape.nullable else strict


def _writer(shape: Shape, depth: int) -> str:
    """A C# lambda writing one value of `shape` (a null as nil)."""
    w, v = f"w{depth}", f"v{depth}"
    if shape.kind == "any":
        body = f"{w}.WriteValue({v})"
    elif shape.kind in ("list", "dict"):
        assert shape.item is not None
        helper = "WriteList" if shape.kind == "list" else "WriteDict"
        body = f"Wire.{helper}({w}, {v}, {_writer(shape.item, depth + 1)})"
    else:
        body = f"Wire.Write({w}, {v})"
    return f"({w}, {v}) => {body}"


def write_field(f: FieldSpec, member: str) -> str:
    if f.shape.kind in ("list", "dict", "any"):
        return f"Wire.Field(w, {cs_str(f.name)}, {member}, {_writer(f.shape, 1)})"
    return f"Wire.Field(w, {cs_str(f.name)}, {member})"


# ---------------------------------------------------------------- defaults


def _cs_double(value: float) -> str:
    if not math.isfinite(value):
        raise Unsupported(f"default {value!r}: C# has no literal for it")
    text = repr(float(value))
    return text if any(c in text for c in ".eE") else text + ".0"


def _object_literal(value: Any) -> str:
    """A default of an `Any` field, typed the way MsgPackReader.ReadValue gives values back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}L"
    if isinstance(value, float):
        return _cs_double(value)
    if isinstance(value, str):
        return cs_str(value)
    if isinstance(value, list):
        return "new List<object> { " + ", ".join(_object_literal(v) for v in value) + " }"
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        entries = ", ".join(f"{{ {cs_str(k)}, {_object_literal(v)} }}" for k, v in value.items())
        return "new Dictionary<string, object> { " + entries + " }"
    raise Unsupported(f"default {value!r} of an Any field")


def _literal(shape: Shape, value: Any) -> str:
    kind = shape.kind
    if value is None:
        return "null"
    if kind == "str":
        return cs_str(value)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "int":
        return str(int(value))
    if kind == "float":
        return _cs_double(value)
    if kind == "any":
        return _object_literal(value)
    if kind in ("list", "dict") and shape.item is not None:
        item = shape.item
        if kind == "list":
            items = [_literal(item, v) for v in value]
        else:
            items = [f"{{ {cs_str(k)}, {_literal(item, v)} }}" for k, v in value.items()]
        return f"new {cs_type(shape)}()" if not items else f"new {cs_type(shape)} {{ {', '.join(items)} }}"
    raise Unsupported(f"default {value!r} of a {kind} field has no C# literal here")


def initializer(f: FieldSpec) -> str:
    # Required lists and maps start empty rather than null, as the hand-written classes did.
    if f.required:
        if f.shape.kind in ("list", "dict") and not f.shape.nullable:
            return f"new {cs_type(f.shape)}()"
        return ""
    return "" if f.default is None else _literal(f.shape, f.default)
