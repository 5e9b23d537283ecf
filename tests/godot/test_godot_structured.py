"""Structured replies through the Godot addon, in the real Godot 4.6 runtime against the real
daemon (suite_structured.gd of the one page run). Every reply is checked against its constraint
here, with jsonschema and re.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).parent))

from godot_cases import CHOICES, GRAMMAR_WORDS, REGEXES, SCHEMAS, TOOL
from godot_suite import GodotRun


def test_ask_json_returns_a_valid_dictionary_and_signals_it(godot_run: GodotRun) -> None:
    """ask_json (await) and ask_request with json_schema (signal) give values valid against each
    schema (nested objects, arrays, enums, bounded numbers, a pattern); json_received fires once,
    before response_finished, with the same value; the text is that JSON; the line is recorded;
    whole floats from JSON went out as ints."""
    outcomes = godot_run.passed("structured:json")["outcomes"]
    assert len(outcomes) == len(SCHEMAS)
    for schema, outcome in zip(SCHEMAS, outcomes, strict=True):
        jsonschema.validate(outcome["value"], schema)
        assert outcome["signals"] == [outcome["value"]]
        assert outcome["order"] == ["json", "finished"]
        assert json.loads(outcome["text"]) == outcome["value"]
        assert [m["role"] for m in outcome["history"]] == ["user", "assistant"]
        assert outcome["history"][1]["content"] == outcome["text"]
        types = outcome["sent_schema_types"]
        assert set(types.values()) <= {"int"}, types  # maxLength 16.0 -> 16, minimum -10.0 -> -10
        assert bool(types) == ('"max' in json.dumps(schema) or '"min' in json.dumps(schema))


def test_choices_regex_and_grammar(godot_run: GodotRun) -> None:
    """ask_choice gives one of the choices, ask_regex a whole match, ask_grammar a sentence of the grammar."""
    picked = godot_run.passed("structured:choices")["picked"]
    assert len(picked) == 6 and set(picked) <= set(CHOICES)
    matched = godot_run.passed("structured:regex")["matched"]
    assert [m[0] for m in matched] == REGEXES
    for pattern, text in matched:
        assert re.fullmatch(pattern, text), (pattern, text)
    said = godot_run.passed("structured:grammar")["said"]
    assert len(said) == 3 and set(said) <= GRAMMAR_WORDS


def test_tool_calls_come_back_as_data_and_as_a_signal(godot_run: GodotRun) -> None:
    """tools + required: one call with valid arguments, tool_called fired with it before
    response_finished; a plain ask() on a node with tools sends them (a named tool_choice forces
    the call); tool_choice none answers in words."""
    data = godot_run.passed("structured:tools")
    assert len(data["calls"]) == 1
    call = data["calls"][0]
    assert call["name"] == TOOL["name"]
    jsonschema.validate(call["arguments"], TOOL["parameters"])
    assert data["signalled"][0] == call
    assert data["required_order"] == ["tool", "finished"]
    assert len(data["signalled"]) == 2, "the named choice through ask() made a call too"
    assert data["signalled"][1]["name"] == TOOL["name"]
    assert [t["name"] for t in data["sent_tools"]] == [TOOL["name"]]
    assert data["sent_tool_choice"] == TOOL["name"]
    assert json.loads(data["ask_reply"])["name"] == TOOL["name"]
    assert data["none_calls"] == []


def test_constrained_and_free_lines_on_many_adapters_at_once(godot_run: GodotRun) -> None:
    """Eight chats on three adapters in flight together, schemas, choices, regexes and free text
    mixed: every constrained reply is valid, the free ones are plain results."""
    data = godot_run.passed("structured:mixed_batch")
    assert data["in_flight_together"]
    outcomes = data["outcomes"]
    assert len(outcomes) == 8 and len({a for o in outcomes for a in o["adapters"]}) == 3
    for i, outcome in enumerate(outcomes):
        if outcome["kind"] == "json_schema":
            jsonschema.validate(outcome["json"], SCHEMAS[i % len(SCHEMAS)])
        elif outcome["kind"] == "choices":
            assert outcome["text"] in CHOICES
        elif outcome["kind"] == "regex":
            assert re.fullmatch(REGEXES[0], outcome["text"])
        if outcome["kind"] == "free":
            assert outcome["constraint"] == "" and outcome["json"] is None
        else:
            assert outcome["constraint"] == "satisfied"


def test_a_reply_cut_short_fails_as_incomplete(godot_run: GodotRun) -> None:
    """A schema or choice that cannot finish in max_tokens fails with `incomplete` (the partial
    text kept on the request), emits no json_received, and is not recorded."""
    data = godot_run.passed("structured:incomplete")
    assert [f[0] for f in data["failed"]] == ["incomplete", "incomplete"]
    assert "max_tokens" in data["failed"][0][1]
    assert data["json_signals"] == 0 and data["history"] == []
    assert data["request_error"] == "incomplete" and data["request_constraint"] == "incomplete"
    assert data["kept_text"] and "a very long answer indeed".startswith(data["kept_text"])


def test_a_bad_constraint_is_refused_and_the_chat_goes_on(godot_run: GodotRun) -> None:
    """An invalid regex fails with invalid_parameter and the library's reason; the next line works."""
    data = godot_run.passed("structured:bad_constraint")
    assert len(data["failed"]) == 1
    code, message = data["failed"][0]
    assert code == "invalid_parameter" and "unclosed character class" in message
    assert data["after"] in ("yes", "no") and data["still_connected"]


def test_structured_demo_guard_acts_and_quest_giver_gives_a_quest(godot_run: GodotRun) -> None:
    """The sample scene: the guard picks one of the game's actions and the game carries it out;
    the quest giver returns a quest valid against its schema."""
    data = godot_run.passed("demo:structured")
    assert set(data["known_actions"]) == {"open_gate", "keep_shut", "ask_bribe", "call_captain"}
    assert len(data["actions"]) == 2 and set(data["actions"]) <= set(data["known_actions"])
    assert data["acted"] == data["actions"] and data["outcome"]
    jsonschema.validate(data["quest"], data["quest_schema"])
    assert set(data["quest"]) >= {"title", "reward", "items", "urgent"}
    assert data["offered"] == [data["quest"]]
