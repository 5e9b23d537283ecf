"""Generate `bridge/PROTOCOL.md` and the golden frames from the message models.

    python -m bridge.gen           # rewrite both
    python -m bridge.gen --check   # exit 1 when either is stale (the test suite does this too)

Golden frames: `tests/fixtures/frames/NAME.msgpack` is the canonical encoding of one example
message and `NAME.json` the same value as JSON (msgpack bin as {"$bin": base64}). The C# and
GDScript codecs decode every frame, compare it with the JSON, and re-encode it byte for byte.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import messages as m
from .codec import encode
from .errors import CLIENT_ONLY, MEANINGS, ErrorCode

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "bridge" / "PROTOCOL.md"
FRAMES_DIR = ROOT / "tests" / "fixtures" / "frames"

_ADAPTER = m.AdapterInfo(name="pirate", kind="text", status="ready", version=3,
                         hash="9f2c4e1a7b3d5c60", rank=8, targets=["q_proj", "v_proj"])
_TIMINGS = m.Timings(queued_ms=1.5, first_token_ms=42.25, total_ms=812.0, tokens_per_s=39.5)
_LIMITS = m.Limits(max_frame_bytes=1048576, max_inflight_per_connection=64, max_prompt_tokens=8192,
                   max_new_tokens=4096, max_adapters_per_request=4)

EXAMPLES: dict[str, BaseModel] = {
    "hello": m.Hello(protocol=1, token="3f9a0c1e5b7d4a2c", client="unity"),
    "welcome": m.Welcome(
        protocol=1, server="0.1.0",
        text_model=m.ModelInfo(name="SmolLM2-135M-Instruct", kind="text", device="cpu",
                               dtype="float32", context_length=8192),
        image_model=m.ModelInfo(name="tiny-sd (placeholder: draws noise)", kind="image",
                                device="cpu", dtype="float32", placeholder=True),
        adapters=[_ADAPTER], limits=_LIMITS),
    "generate": m.Generate(id="npc-1", prompt="Ahoy! Who goes there?",
                           adapters=[m.AdapterRef(name="pirate")], max_tokens=64, seed=7),
    "generate_chat": m.Generate(
        id="npc-2",
        messages=[m.ChatMessage(role="system", content="You are Brunhild, a grumpy blacksmith."),
                  m.ChatMessage(role="user", content="Can you fix my sword? \u2694")],
        adapters=[m.AdapterRef(name="blacksmith", scale=0.75), m.AdapterRef(name="elf", scale=0.25)],
        temperature=0.0, top_k=40, top_p=0.9, repetition_penalty=1.1, stop=["\n\n", "User:"],
        stream=False),
    "generate_image": m.GenerateImage(id="img-1", prompt="a pixel-art map tile, forest",
                                      adapters=[m.AdapterRef(name="pixel_style", scale=0.8)],
                                      width=256, height=256, steps=4, seed=1234),
    "cancel": m.Cancel(id="npc-1"),
    "list_adapters": m.ListAdapters(id="q-1"),
    "subscribe": m.Subscribe(id="sub-1"),
    "ping": m.Ping(id="p-1"),
    "chunk": m.Chunk(id="npc-1", text="Arr, ", index=0, tokens=2),
    "result": m.Result(id="npc-1", text="Arr, who be askin'?", finish_reason="stop", prompt_tokens=12,
                       completion_tokens=9, adapter_versions={"pirate": 3}, timings=_TIMINGS),
    "error": m.Error(id="npc-9", code=ErrorCode.UNKNOWN_ADAPTER.value,
                     message="unknown adapter 'ghost' (known: blacksmith, elf, pirate)"),
    "error_no_id": m.Error(code=ErrorCode.BAD_FRAME.value, message="frame is not valid msgpack"),
    "adapters": m.Adapters(id="q-1", adapters=[_ADAPTER, m.AdapterInfo(
        name="broken", kind="text", status="failed", error="lora_B of q_proj has shape [64, 8]")]),
    "adapter_event": m.AdapterEvent(event="updated", adapter=_ADAPTER, previous_version=2),
    "adapter_event_rejected": m.AdapterEvent(
        event="rejected", adapter=_ADAPTER,
        reason="adapter_model.safetensors is truncated; version 3 keeps serving"),
    "pong": m.Pong(id="p-1", server_time=1796000000.25),
    "image_progress": m.ImageProgress(id="img-1", step=2, total=4),
    "image_result": m.ImageResult(id="img-1", images=[b"\x89PNG\r\n\x1a\n\x00\x01\x02"], seed=1234,
                                  width=256, height=256, adapter_versions={"pixel_style": 1},
                                  timings=m.Timings(queued_ms=0.5, first_token_ms=120.0,
                                                    total_ms=480.0)),
}

CLIENT_TYPES: list[type[BaseModel]] = [m.Hello, m.Generate, m.GenerateImage, m.Cancel, m.ListAdapters,
                                       m.Subscribe, m.Ping]
SERVER_TYPES: list[type[BaseModel]] = [m.Welcome, m.Chunk, m.Result, m.Error, m.Adapters, m.AdapterEvent, m.Pong,
                m.ImageProgress, m.ImageResult]
PARTS: list[type[BaseModel]] = [m.AdapterRef, m.ChatMessage, m.AdapterInfo, m.ModelInfo, m.Limits, m.Timings]


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bin": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return {str: "str", int: "int", float: "float", bool: "bool", bytes: "bin"}.get(tp, str(tp))


def _constraints(field: Any) -> str:
    notes = []
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                          ("max_length", "max len"), ("min_length", "min len"), ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                notes.append(f"{sym} `{value}`")
    return ", ".join(notes)


def _table(model: type[BaseModel]) -> list[str]:
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"### {model.__name__}", "", doc, "", "| field | type | default | constraints | meaning |",
             "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else f"`{json.dumps(_to_json(field.default))}`"
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {default} | {_constraints(field)} "
                     f"| {field.description or ''} |")
    lines.append("")
    return lines


def render_protocol_md() -> str:
    out = [
        "# The loraloom wire protocol",
        "",
        "<!-- Generated by `python -m bridge.gen` from bridge/messages.py. Do not edit by hand. -->",
        "",
        f"Protocol version: **{m.PROTOCOL_VERSION}**.",
        "",
        "## Frames",
        "",
        "- One WebSocket connection per client, binary frames only; each frame is **one msgpack map**.",
        "- Every map has a string `type`. Requests carry a client-chosen `id` (1-64 characters);",
        "  every event about a request carries the same `id`. Ids must be unique among a connection's",
        "  requests in flight.",
        "- Field order in a map is free; absent optional fields mean their default (null where nullable).",
        "  Unknown fields and unknown types are refused with `bad_message`, and so are values outside a",
        "  field's bounds (the tables below): integers fit a signed 32-bit int (seeds: 63 bits), floats",
        "  are finite. A value within bounds that this daemon's settings refuse is `invalid_parameter`.",
        "- Canonical encoding (what the golden frames hold, byte for byte): maps in field order, absent",
        "  values left out, integers in their smallest msgpack form, floats as float64, strings as str",
        "  (UTF-8), bytes as bin.",
        "",
        "## Session",
        "",
        "1. Open `ws://HOST:PORT/` (the runtime file gives both and the token). A browser `Origin`",
        "   header is refused with HTTP 403 unless allowed by the daemon's settings.",
        "2. Send `hello` with the protocol version and the token. The daemon answers `welcome`, or",
        "   `error` (`unauthorized`, `unsupported_version`) and closes the connection (code 1008).",
        "3. Send requests at will; events come back tagged with their ids, interleaved.",
        "",
        "- `generate`: zero or more `chunk` (when `stream` is true), then one `result`, or one `error`.",
        "- `generate_image`: `image_progress` per step, then one `image_result`, or one `error`.",
        "- `cancel`: the request ends with its `result` (`finish_reason` `cancelled`); cancelling an",
        "  unknown id answers `error` `unknown_request`.",
        "- `list_adapters` / `subscribe`: one `adapters`; after `subscribe`, `adapter_event`s",
        "  arrive whenever an adapter folder changes.",
        "- `ping`: one `pong`.",
        "",
        "A frame that cannot be parsed is answered with `error` (with the `id` when one could be read)",
        "and the connection stays open. A frame larger than the daemon's hard limit (4x",
        "`max_frame_bytes`) closes the connection with code 1009. Closing the connection cancels",
        "all its requests.",
        "",
        "## Error codes",
        "",
        "| code | meaning |",
        "| --- | --- |",
    ]
    for code in ErrorCode:
        if code not in CLIENT_ONLY:
            out.append(f"| `{code.value}` | {MEANINGS[code]} |")
    out += ["", "## Client -> daemon", ""]
    for model in CLIENT_TYPES:
        out += _table(model)
    out += ["## Daemon -> client", ""]
    for model in SERVER_TYPES:
        out += _table(model)
    out += ["## Parts", ""]
    for model in PARTS:
        out += _table(model)
    out += ["## Golden frames", "",
            "`tests/fixtures/frames/` holds one example of every message: NAME.msgpack (canonical",
            "bytes) and NAME.json (the same value; bin as `{\"$bin\": base64}`):", ""]
    out += [f"- `{name}`" for name in EXAMPLES]
    out.append("")
    return "\n".join(out)


def render_frames() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name, message in EXAMPLES.items():
        files[f"{name}.msgpack"] = encode(message)
        value = _to_json(message.model_dump(mode="python", exclude_none=True))
        files[f"{name}.json"] = (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def stale() -> list[str]:
    """The generated files that differ from what the models produce now."""
    problems = []
    if not PROTOCOL_MD.exists() or PROTOCOL_MD.read_text(encoding="utf-8") != render_protocol_md():
        problems.append(str(PROTOCOL_MD.relative_to(ROOT)))
    expected = render_frames()
    present = {p.name for p in FRAMES_DIR.glob("*")} if FRAMES_DIR.exists() else set()
    for name, data in expected.items():
        path = FRAMES_DIR / name
        if not path.exists() or path.read_bytes() != data:
            problems.append(str(path.relative_to(ROOT)))
    problems += [f"tests/fixtures/frames/{n} (no longer generated)" for n in sorted(present - set(expected))]
    return problems


def write() -> None:
    PROTOCOL_MD.write_text(render_protocol_md(), encoding="utf-8")
    FRAMES_DIR.mkdir(parents=True, exist_ok=True)
    expected = render_frames()
    for path in FRAMES_DIR.glob("*"):
        if path.name not in expected:
            path.unlink()
    for name, data in expected.items():
        (FRAMES_DIR / name).write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.gen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated files are stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for p in problems:
            print(f"stale: {p}", file=sys.stderr)
        return 1 if problems else 0
    write()
    print(f"wrote {PROTOCOL_MD.relative_to(ROOT)} and {len(EXAMPLES)} golden frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
