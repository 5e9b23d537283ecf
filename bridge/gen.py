"""Generate every file derived from the protocol's models, and check that none is stale.

    python -m bridge.gen           # rewrite them all
    python -m bridge.gen --check   # exit 1 when any is stale (the test suite does this too)

What it writes, all from bridge/messages.py and bridge/errors.py as `gen_schema` describes them:

- `bridge/PROTOCOL.md`, the reference of every message and error code (here);
- the golden frames `tests/fixtures/frames/` (here);
- the C# protocol files `unity_package/Runtime/Core/Protocol/*.g.cs` and their Unity .meta
  files (`gen_csharp`);
- the GDScript schema `godot_addon/addons/loraloom/protocol.gd` (`gen_gdscript`).

A file that carries the generated header (a `*.g.cs` or `.gd`), a `*.g.cs.meta` or a golden
frame that is no longer generated counts as stale too, and writing deletes it.

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

from . import gen_csharp, gen_gdscript, gen_schema
from . import messages as m
from .codec import encode
from .errors import CLIENT_ONLY, MEANINGS, ErrorCode

__all__ = ["CLIENT_TYPES", "EXAMPLES", "SERVER_TYPES", "generated_files", "main", "render", "stale", "write"]

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "bridge" / "PROTOCOL.md"
FRAMES_DIR = ROOT / "tests" / "fixtures" / "frames"
# Where the generated files go, relative to the repository root.
PROTOCOL_MD_PATH = "bridge/PROTOCOL.md"
FRAMES_PATH = "tests/fixtures/frames"
UNITY_PACKAGE = "unity_package"
CSHARP_DIR = "Runtime/Core/Protocol"  # inside the Unity package
GODOT_ADDON = "godot_addon"
GDSCRIPT_DIR = "addons/loraloom"  # inside the Godot project

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
        adapters=[_ADAPTER], limits=_LIMITS,
        memory=m.Memory(device="cuda", budget_mb=2048, reserved_mb=1911, used_mb=302, measured_mb=1986,
                        weights_mb=258, kv_cache_mb=1440, lora_pool_mb=163, workspace_mb=40, image_mb=10)),
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
    "set_budget": m.SetBudget(id="b-1", duty_cap=0.5, tokens_per_s=m.TokenRates(background=40.0),
                              frame_sync=m.FrameSync(period_ms=8.33, game_ms=3.5)),
    "frame": m.Frame(game_ms=3.25),
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
    "budget": m.Budget(id="b-1", duty_cap=0.5, tokens_per_s=m.TokenRates(background=40.0),
                       frame_sync=m.FrameSync(period_ms=8.33, game_ms=3.5), set_by_client=True),
    "image_progress": m.ImageProgress(id="img-1", step=2, total=4),
    "image_result": m.ImageResult(id="img-1", images=[b"\x89PNG\r\n\x1a\n\x00\x01\x02"], seed=1234,
                                  width=256, height=256, adapter_versions={"pixel_style": 1},
                                  timings=m.Timings(queued_ms=0.5, first_token_ms=120.0,
                                                    total_ms=480.0)),
}

CLIENT_TYPES: list[type[BaseModel]] = gen_schema.union_members(m.ClientMessage)
SERVER_TYPES: list[type[BaseModel]] = gen_schema.union_members(m.ServerMessage)


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


_SYMBOLS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("max_length", "max len"),
            ("min_length", "min len"), ("pattern", "matches"))


def _constraints(shape: gen_schema.Shape) -> str:
    notes = [f"{sym} `{getattr(shape.bounds, attr)}`" for attr, sym in _SYMBOLS
             if getattr(shape.bounds, attr) is not None]
    if shape.item is not None:
        inner = _constraints(shape.item)
        if inner:
            notes.append(("items: " if shape.kind == "list" else "values: ") + inner)
    return ", ".join(notes)


def _table(model: type[BaseModel]) -> list[str]:
    doc = " ".join((model.__doc__ or "").split())
    spec = next(s for s in gen_schema.protocol().models if s.cls is model)
    lines = [f"### {model.__name__}", "", doc, "", "| field | type | default | constraints | meaning |",
             "| --- | --- | --- | --- | --- |"]
    for (name, field), f in zip(model.model_fields.items(), spec.fields, strict=True):
        default = "required" if field.is_required() else f"`{json.dumps(_to_json(field.default))}`"
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {default} | {_constraints(f.shape)} "
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
        "- `set_budget`: one `budget` (the GPU budget now in force; it ends with the connection).",
        "- `frame`: no answer (with a `frame_sync` budget: a frame of the game starts now).",
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
    # The models that messages nest, as they first appear.
    out += [line for part in gen_schema.protocol().parts if part.cls is not None for line in _table(part.cls)]
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


def render(spec: gen_schema.ProtocolSpec | None = None) -> dict[str, bytes]:
    """Every generated file: its path relative to the repository root -> its bytes."""
    spec = spec or gen_schema.protocol()
    files = {PROTOCOL_MD_PATH: render_protocol_md().encode()}
    files |= {f"{FRAMES_PATH}/{name}": data for name, data in render_frames().items()}
    for name, text in gen_csharp.render(spec).items():
        package_path = f"{CSHARP_DIR}/{name}"
        files[f"{UNITY_PACKAGE}/{package_path}"] = text.encode()
        files[f"{UNITY_PACKAGE}/{package_path}.meta"] = gen_csharp.meta_text(package_path).encode()
    files[f"{GODOT_ADDON}/{GDSCRIPT_DIR}/{gen_gdscript.FILE}"] = gen_gdscript.render(spec).encode()
    return files


def _has_header(path: Path) -> bool:
    """True when one of the first three lines is a comment with the generated-file mark."""
    with path.open("rb") as f:
        head = f.read(600).decode("utf-8", errors="replace").splitlines()[:3]
    marks = (gen_csharp.HEADER_MARK, gen_gdscript.HEADER_MARK)
    return any(line.lstrip().startswith(("//", "#")) and any(m in line for m in marks) for line in head)


def generated_files(root: Path = ROOT) -> set[str]:
    """The files under `root` that generation owns now: golden frames, and the C# and GDScript
    files with the generated header (and the .meta of any *.g.cs)."""
    owned = {p.relative_to(root).as_posix() for p in (root / FRAMES_PATH).glob("*") if p.is_file()}
    package = root / UNITY_PACKAGE
    for path in package.rglob("*.g.cs") if package.exists() else []:
        if _has_header(path):
            owned.add(path.relative_to(root).as_posix())
    for path in package.rglob("*.g.cs.meta") if package.exists() else []:
        owned.add(path.relative_to(root).as_posix())
    addon = root / GODOT_ADDON
    for path in addon.rglob("*.gd") if addon.exists() else []:
        if _has_header(path):
            owned.add(path.relative_to(root).as_posix())
    return owned


def stale(root: Path = ROOT, files: dict[str, bytes] | None = None) -> list[str]:
    """The generated files under `root` that differ from what the models produce now, are missing,
    or are no longer generated."""
    expected = render() if files is None else files
    problems = [path for path, data in expected.items()
                if not (root / path).is_file() or (root / path).read_bytes() != data]
    problems += [f"{path} (no longer generated)" for path in sorted(generated_files(root) - set(expected))]
    return problems


def write(root: Path = ROOT, files: dict[str, bytes] | None = None) -> list[str]:
    """Write every generated file under `root` and delete the ones no longer generated; returns
    the paths it changed."""
    expected = render() if files is None else files
    changed = []
    for path in sorted(generated_files(root) - set(expected)):
        (root / path).unlink()
        changed.append(path)
    for path, data in expected.items():
        target = root / path
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.gen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any generated file is stale")
    args = parser.parse_args(argv)
    try:
        files = render()
    except gen_schema.Unsupported as exc:
        print(f"cannot generate the protocol files: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = stale(files=files)
        for p in problems:
            print(f"stale: {p}", file=sys.stderr)
        if problems:
            print("run `python -m bridge.gen` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    changed = write(files=files)
    for path in changed:
        print(f"wrote {path}" if path in files else f"deleted {path}")
    print(f"{len(files)} generated files, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
