"""What the GDScript suites for structured output and shipping are given, and what pytest expects back.

The schemas, patterns, grammar and tool go to suite_structured.gd through the page's configuration
(JSON, so every number arrives in Godot as a float); the shipping layout goes to suite_shipping.gd.
The tests in test_godot_structured.py and test_godot_shipping.py check the answers against these.
"""

from __future__ import annotations

from typing import Any

ITEM = {"type": "object", "additionalProperties": False, "required": ["name", "count"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10},
                       "count": {"type": "integer", "minimum": 1, "maximum": 99}}}
# Short enough for the suite daemon's 256-token context with the chat template around them.
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "additionalProperties": False, "required": ["action"],
     "properties": {"action": {"enum": ["attack", "flee", "talk", "trade"]}}},
    {"type": "object", "additionalProperties": False, "required": ["title", "reward", "items"],
     "properties": {"title": {"type": "string", "maxLength": 16},
                    "reward": {"type": "integer", "minimum": 5, "maximum": 250},
                    "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 2},
                    "urgent": {"type": "boolean"}}},
    {"type": "array", "items": {"enum": ["north", "south", "east", "west"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "additionalProperties": False, "required": ["npc", "mood"],
     "properties": {"npc": {"type": "object", "additionalProperties": False, "required": ["id", "hp"],
                            "properties": {"id": {"type": "string", "pattern": "^[a-z]{3}[0-9]$"},
                                           "hp": {"type": "integer", "minimum": -10, "maximum": 10}}},
                    "mood": {"enum": ["calm", "angry"]}}},
]
REGEXES = [r"[A-Z][a-z]{2,7} the (brave|bold)", r"[0-9]{2}:[0-9]{2}"]
CHOICES = ["attack", "flee", "talk", "trade"]
GRAMMAR = 'start: ANSWER "!"\nANSWER: "yes" | "no" | "maybe"\n'
GRAMMAR_WORDS = {"yes!", "no!", "maybe!"}
# One short tool: its definition, laid out by the tiny model's template, takes ~200 of 256 tokens.
TOOL = {"name": "open", "description": "",
        "parameters": {"type": "object", "required": ["door"], "properties": {"door": {"enum": ["gate"]}}}}


def structured_config() -> dict[str, Any]:
    return {"schemas": SCHEMAS, "regexes": REGEXES, "choices": CHOICES, "grammar": GRAMMAR, "tool": TOOL}


# ---------------------------------------------------------------- shipping

EXECUTABLES = {
    # executable -> the folder the shipping contract puts next to it
    "/games/Quest/quest.x86_64": "/games/Quest/loraloom",
    "C:/Games/Quest/Quest.exe": "C:/Games/Quest/loraloom",
    "/Applications/Quest.app/Contents/MacOS/Quest": "/Applications/Quest.app/Contents/MacOS/loraloom",
}
EXPORT_PATHS = {
    # what the export dialog was given -> where the loraloom folder goes
    "/out/linux/quest.x86_64": "/out/linux",
    "C:/out/win/Quest.exe": "C:/out/win",
    "/out/mac/Quest.app": "/out/mac/Quest.app/Contents/MacOS",
}
EXPORT_FEATURES = [["linux", "x86_64", "pc"], ["windows", "x86_64", "pc"], ["macos", "pc"],
                   ["web", "wasm32"], ["android", "arm64"], ["ios", "arm64"]]
# A bundle as `loraloom bundle` lays it out (PyInstaller one-folder) and a pack as `loraloom pack` does.
RUNTIME_FILES = ["loraloom", "_internal/base_library.zip", "_internal/torch/lib/libtorch_cpu.so",
                 "_internal/.hidden-metadata"]
PACK_FILES = ["manifest.json", "model/config.json", "model/model.safetensors",
              "adapters/pirate/adapter_config.json", "adapters/pirate/adapter_model.safetensors"]


def shipping_config() -> dict[str, Any]:
    return {"executables": list(EXECUTABLES), "export_paths": list(EXPORT_PATHS),
            "export_features": EXPORT_FEATURES, "runtime_files": RUNTIME_FILES, "pack_files": PACK_FILES}


def expected_export_targets() -> list[str]:
    """Where each file of the bundle and the pack lands under the export's folder."""
    return sorted([f"loraloom/runtime/{p}" for p in RUNTIME_FILES] + [f"loraloom/pack/{p}" for p in PACK_FILES])
