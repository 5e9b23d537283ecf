"""The code generators: staleness of any kind is caught, the error codes agree in every language,
every supported annotation renders, and what the generators cannot carry is refused loudly."""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from bridge import gen, gen_csharp, gen_gdscript, gen_schema
from bridge import messages as m
from bridge.errors import CLIENT_ONLY, MEANINGS, ErrorCode

sys.path.insert(0, str(Path(__file__).parent))

import protocol_samples

PROTOCOL_DIR = "unity_package/Runtime/Core/Protocol"
MESSAGES_CS = f"{PROTOCOL_DIR}/Messages.g.cs"
ERRORS_CS = f"{PROTOCOL_DIR}/ErrorCodes.g.cs"
PROTOCOL_GD = "godot_addon/addons/loraloom/protocol.gd"


def test_generated_files_are_the_ones_expected() -> None:
    """Every C# file has its .meta, and the GDScript schema and PROTOCOL.md are among the outputs."""
    files = gen.render()
    for name in gen_csharp.FILES:
        assert f"{PROTOCOL_DIR}/{name}" in files
        assert f"{PROTOCOL_DIR}/{name}.meta" in files
    assert PROTOCOL_GD in files and "bridge/PROTOCOL.md" in files
    for path, data in files.items():
        if path.endswith((".g.cs", ".gd")):
            assert gen_csharp.HEADER_MARK in data.decode().splitlines()[1 if path.endswith(".cs") else 0], path


def test_stale_catches_changed_missing_and_leftover_files(tmp_path: Path) -> None:
    """In a copy of the generated files, an edit, a deletion and files no longer generated are all
    reported; writing again restores the edit and removes the leftovers, never a hand-written file."""
    files = gen.render()
    gen.write(tmp_path, files)
    assert gen.stale(tmp_path, files) == []

    cs, gd = tmp_path / MESSAGES_CS, tmp_path / PROTOCOL_GD
    cs.write_text(cs.read_text().replace("public int MaxTokens = 256;", "public int MaxTokens = 255;"))
    gd.unlink()
    old_cs = tmp_path / PROTOCOL_DIR / "Retired.g.cs"
    old_cs.write_bytes(files[MESSAGES_CS])
    orphan_meta = tmp_path / PROTOCOL_DIR / "Gone.g.cs.meta"
    orphan_meta.write_text(gen_csharp.meta_text("Runtime/Core/Protocol/Gone.g.cs"))
    old_gd = tmp_path / "godot_addon/addons/loraloom/old_protocol.gd"
    old_gd.write_bytes(files[PROTOCOL_GD])
    handwritten = tmp_path / "godot_addon/addons/loraloom/chat.gd"
    handwritten.write_text("extends Node\n## Mentions `python -m bridge.gen` but is not generated.\n")
    old_frame = tmp_path / "tests/fixtures/frames/retired.json"
    old_frame.write_text("{}\n")

    leftovers = [old_frame, old_gd, old_cs, orphan_meta]
    expected = [MESSAGES_CS, PROTOCOL_GD]
    expected += [f"{p.relative_to(tmp_path).as_posix()} (no longer generated)" for p in leftovers]
    assert sorted(gen.stale(tmp_path, files)) == sorted(expected)

    gen.write(tmp_path, files)
    assert gen.stale(tmp_path, files) == []
    assert not any(p.exists() for p in leftovers)
    assert handwritten.exists()


def test_a_changed_model_makes_every_language_stale() -> None:
    """A field added to a model changes the C# classes, the GDScript schema and nothing else, so
    `python -m bridge.gen --check` fails until they are regenerated."""

    class Ping(m.Ping):
        """Answered by `pong` with the same id."""

        note: str = Field(default="hi", description="a note the daemon ignores")

    clients = [Ping if cls is m.Ping else cls for cls in gen.CLIENT_TYPES]
    spec = gen_schema.describe(clients, gen.SERVER_TYPES, version=m.PROTOCOL_VERSION,
                               meanings={c: MEANINGS[c] for c in ErrorCode}, client_only=CLIENT_ONLY)
    changed = gen.render(spec)
    assert "public string Note = \"hi\";" in changed[MESSAGES_CS].decode()
    assert '"note": {"kind": "str", "default": "hi"' in changed[PROTOCOL_GD].decode()
    assert gen.stale(gen.ROOT, changed) == [MESSAGES_CS, PROTOCOL_GD]


def _cs_meanings(text: str) -> dict[str, str]:
    constants = dict(re.findall(r'public const string (\w+) = "([^"]*)";', text))
    table = re.findall(r'^\s*\{ (\w+), "((?:[^"\\]|\\.)*)" \},$', text, re.M)
    return {constants[name]: meaning.replace('\\"', '"').replace("\\\\", "\\") for name, meaning in table}


def _gd_meanings(text: str) -> dict[str, str]:
    constants = dict(re.findall(r'^const (ERROR_\w+) := "([^"]*)"$', text, re.M))
    block = text[text.index("const ERROR_MEANINGS := {"):]
    block = block[:block.index("\n}")]
    entries = re.findall(r'^\t(ERROR_\w+): (.*?),$', block, re.M | re.S)
    return {constants[name]: "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', literal)) for name, literal in entries}


def test_every_error_code_has_its_meaning_in_both_languages() -> None:
    """ErrorCodes.g.cs and protocol.gd each have a constant and the same meaning for every code."""
    expected = {code.value: MEANINGS[code] for code in ErrorCode}
    assert _cs_meanings((gen.ROOT / ERRORS_CS).read_text()) == expected
    assert _gd_meanings((gen.ROOT / PROTOCOL_GD).read_text()) == expected


def test_every_supported_annotation_renders() -> None:
    """The sample models (every supported kind, nested) describe and render in both languages."""
    spec = protocol_samples.sample_spec()
    everything = spec.client[0]
    shape = {f.name: f.shape for f in everything.fields}
    assert shape["matrix"].item is not None and shape["matrix"].item.item == gen_schema.Shape("int", nullable=True)
    assert shape["arguments"].kind == "dict" and shape["arguments"].item == gen_schema.Shape("any")
    assert shape["scores"].nullable and shape["scores"].item == gen_schema.Shape("float", nullable=True)
    assert [p.name for p in spec.parts] == ["Tool"]
    csharp = gen_csharp.render(spec, "Loraloom.Core.Sample")
    assert "public List<List<int?>> Matrix" in csharp["Messages.g.cs"]
    assert "public Dictionary<string, object> Arguments" in csharp["Messages.g.cs"]
    assert "public long Big = 0;" in csharp["Messages.g.cs"]
    assert "public string Type = \"function\";" in csharp["Parts.g.cs"]
    gdscript = gen_gdscript.render(spec, "LoraloomSampleProtocol")
    assert '"item": {"kind": "list", "item": {"kind": "int", "nullable": true}}' in gdscript


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


@pytest.mark.parametrize("annotation", [
    int | str,
    set[int],
    tuple[int, int],
    dict[int, str],
    Literal[1, 2],
    datetime,
    list,
    ErrorCode,
    Annotated[int, Field(multiple_of=2)],
    Annotated[str, StringConstraints(strip_whitespace=True)],
    Annotated[str, Field(strict=True)],
], ids=str)
def test_unknown_annotations_are_refused(annotation: Any) -> None:
    """An annotation or constraint the generators cannot carry into every language stops them."""
    model = create_model("Odd", __base__=_Base, type=(Literal["odd"], "odd"), value=(annotation, ...))
    with pytest.raises(gen_schema.Unsupported):
        gen_schema.describe([model], [], version=1)


def test_models_the_generators_cannot_follow_are_refused() -> None:
    """Aliases, models that allow extra fields, and messages without a `type` literal are refused."""
    aliased = create_model("Aliased", __base__=_Base, type=(Literal["a"], "a"), value=(int, Field(alias="v")))
    open_model = create_model("Open", type=(Literal["o"], "o"))
    untyped = create_model("Untyped", __base__=_Base, value=(int, 0))
    for model in (aliased, open_model, untyped):
        with pytest.raises(gen_schema.Unsupported):
            gen_schema.describe([model], [], version=1)


def test_names_that_would_clash_are_refused() -> None:
    """A field named like a member of the C# bases is refused instead of shadowing it."""
    clash = create_model("Clash", __base__=_Base, type=(Literal["clash"], "clash"), request_id=(str, ""))
    with pytest.raises(gen_schema.Unsupported):
        gen_csharp.render(gen_schema.describe([clash], [], version=1))
