"""Structured output through a real daemon and the real client: 200 constrained requests of mixed
kinds on many adapters and mixes at once, every result valid; free rows beside them unchanged; tool
calls; bad constraints refused while the connection and other requests go on."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
from daemon_helpers import raw_connect, recv, send
from support import LiveDaemon, start_daemon, stop_daemon

import bridge
from bridge import messages as m
from daemon.structured import plan_output

ITEM = {"type": "object", "additionalProperties": False, "required": ["name", "count"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10},
                       "count": {"type": "integer", "minimum": 1, "maximum": 99}}}
SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["action"],
     "properties": {"action": {"enum": ["attack", "flee", "talk", "trade"]}}},
    {"type": "object", "additionalProperties": False, "required": ["title", "reward", "items"],
     "properties": {"title": {"type": "string", "maxLength": 16}, "reward": {"type": "integer", "minimum": 5,
                                                                               "maximum": 250},
                    "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 3},
                    "urgent": {"type": "boolean"}}},
    {"type": "array", "items": {"enum": ["north", "south", "east", "west"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "additionalProperties": False, "required": ["npc", "mood"],
     "properties": {"npc": {"type": "object", "additionalProperties": False, "required": ["id", "hp"],
                            "properties": {"id": {"type": "string", "pattern": "^[a-z]{3}[0-9]$"},
                                           "hp": {"type": "integer", "minimum": -10, "maximum": 10}}},
                    "mood": {"enum": ["calm", "angry"]}}},
]
REGEXES = [r"[A-Z][a-z]{2,7} the (brave|bold)", r"(yes|no|maybe)!", r"[0-9]{2}:[0-9]{2}"]
CHOICES = [["attack", "flee"], ["Open the gate.", "Keep it shut.", "Ask for a bribe."]]
MIXES: list[list[Any]] = [[], ["alpha"], ["beta"], [("alpha", 0.5), ("gamma", 1.0)], [("beta", -0.4), "gamma"]]
DOOR = {"name": "open_door", "description": "Open a door",
        "parameters": {"type": "object", "required": ["door"],
                       "properties": {"door": {"enum": ["gate", "cellar", "tower"]}}}}
GIVE = {"name": "give_item", "description": "Give an item",
        "parameters": {"type": "object", "required": ["item", "count"],
                       "properties": {"item": {"type": "string", "maxLength": 12},
                                      "count": {"type": "integer", "minimum": 1, "maximum": 5}}}}


def constraint(i: int) -> tuple[str, Any]:
    kind = ["json_schema", "regex", "choices"][i % 3]
    pool: list[Any] = {"json_schema": SCHEMAS, "regex": REGEXES, "choices": CHOICES}[kind]
    return kind, pool[(i // 3) % len(pool)]


def valid(kind: str, value: Any, result: m.Result) -> None:
    assert result.constraint == "satisfied" and result.finish_reason == "stop", result
    if kind == "json_schema":
        jsonschema.validate(result.json, value)
        assert json.loads(result.text) == result.json
    elif kind == "regex":
        assert re.fullmatch(value, result.text), (value, result.text)
    else:
        assert result.text in value and result.json is None


async def test_two_hundred_constrained_requests_on_many_adapters_and_mixes(live_daemon: LiveDaemon) -> None:
    rng = random.Random(5)
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        async def one(i: int) -> None:
            kind, value = constraint(i)
            result = await client.complete(
                prompt=f"Line {i}: the guard", adapters=MIXES[i % len(MIXES)], max_tokens=230,
                temperature=rng.choice([0.0, 0.7, 1.2]), top_k=rng.choice([0, 5]), seed=i, **{kind: value})
            valid(kind, value, result)

        for start in range(0, 200, 25):  # 25 in flight at once: 8 running, the rest queued
            await asyncio.gather(*(one(i) for i in range(start, start + 25)))


async def test_free_rows_next_to_constrained_ones_are_unchanged(live_daemon: LiveDaemon) -> None:
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        def free(i: int) -> Any:
            return client.complete(prompt=f"Tell me about the {['sea', 'keep', 'woods'][i]}", adapters=MIXES[i + 1],
                                   max_tokens=24, temperature=0.9, seed=70 + i)

        alone = [(await free(i)).text for i in range(3)]
        crowd = [client.complete(prompt="Quest:", json_schema=SCHEMAS[1], adapters=MIXES[i % 5], max_tokens=230,
                                 temperature=1.0, seed=i) for i in range(5)]
        results = await asyncio.gather(*(free(i) for i in range(3)), *crowd)
        assert [r.text for r in results[:3]] == alone
        for r in results[3:]:
            valid("json_schema", SCHEMAS[1], r)


@pytest.fixture(scope="module")
def roomy_daemon(live_daemon: LiveDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    """The same model and adapters with the tiny model's whole context (tool definitions are long
    in its 384-token vocabulary)."""
    base = tmp_path_factory.mktemp("roomy")
    runtime = base / "daemon.json"
    proc = start_daemon(live_daemon.serve_command(runtime, extra=["--max-context", "512"]), runtime,
                        base / "daemon.log")
    url = json.loads(runtime.read_text())["url"]
    yield replace(live_daemon, url=url, runtime_file=runtime, process=proc, log_path=base / "daemon.log")
    stop_daemon(proc)


async def test_tool_calls(roomy_daemon: LiveDaemon) -> None:
    async with bridge.connect(roomy_daemon.url, roomy_daemon.token) as client:
        ask = [{"role": "user", "content": "Let me into the tower, and give me a sword."}]
        for seed in range(4):
            required = await client.complete(messages=ask, tools=[DOOR, GIVE], tool_choice="required", seed=seed,
                                             temperature=1.0, max_tokens=80)
            assert required.constraint == "satisfied" and len(required.tool_calls) == 1, required
            call = required.tool_calls[0]
            schema = {"open_door": DOOR, "give_item": GIVE}[call.name]["parameters"]
            jsonschema.validate(call.arguments, schema)
        named = await client.complete(messages=ask, tools=[DOOR, GIVE], tool_choice="give_item", max_tokens=80,
                                      temperature=0.0)
        assert [c.name for c in named.tool_calls] == ["give_item"]
        jsonschema.validate(named.tool_calls[0].arguments, GIVE["parameters"])
        for seed in range(6):  # auto: a call, or text that does not start like one
            auto = await client.complete(messages=ask, tools=[DOOR], seed=seed, temperature=1.2, max_tokens=40)
            if auto.tool_calls:
                assert auto.tool_calls[0].name == "open_door" and auto.constraint == "satisfied"
            else:
                assert not auto.text.lstrip().startswith("{")
        none = await client.complete(messages=ask, tools=[DOOR], tool_choice="none", max_tokens=8, temperature=0.0)
        assert none.tool_calls == [] and none.constraint is None


async def test_a_long_chat_with_tools_is_trimmed_with_the_tools_counted(roomy_daemon: LiveDaemon) -> None:
    """trim_history leaves room for the tools' definitions too (they go out with every line)."""
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"Tell me about the tower, part {i}."},
                    {"role": "assistant", "content": f"The tower's {i}th floor holds old maps and dust."}]
    async with bridge.connect(roomy_daemon.url, roomy_daemon.token) as client:
        result = await client.complete(messages=[*history, {"role": "user", "content": "Open the door."}],
                                       tools=[DOOR, GIVE], tool_choice="required", trim_history=True,
                                       max_tokens=80, temperature=0.0)
    assert result.dropped_messages > 0 and result.constraint == "satisfied" and len(result.tool_calls) == 1
    assert result.prompt_tokens + 80 <= 512


async def test_bad_constraints_are_refused_and_nothing_else_is_touched(live_daemon: LiveDaemon) -> None:
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        stream = client.generate("Once upon a time", max_tokens=60, temperature=0.0, seed=1)
        first = await asyncio.wait_for(stream.__anext__(), 30)
        for bad, words in [({"regex": "[a-"}, "unclosed character class"),
                           ({"json_schema": {"type": "nonsense"}}, "nonsense"),
                           ({"grammar": "start: nowhere\n"}, "nowhere")]:
            with pytest.raises(bridge.RequestError) as info:
                await client.complete("Hi", **bad)
            assert info.value.code == bridge.ErrorCode.INVALID_PARAMETER and words in info.value.message, info.value
        ws = await raw_connect(live_daemon.url, live_daemon.token)  # frames the client would not build
        for i, (fields, words) in enumerate([(dict(regex="a", choices=["a"]), "at most one"),
                                            (dict(tool_choice="required"), "needs 'tools'"),
                                            (dict(tools=[DOOR]), "need 'messages'"),
                                            (dict(choices=[]), "at least 1")]):
            await send(ws, {"type": "generate", "id": f"bad{i}", "prompt": "Hi", **fields})
            error = await recv(ws)
            assert (error.type, error.id, error.code) == ("error", f"bad{i}", "bad_message") and words in error.message
            with pytest.raises(ValueError, match=words):
                await client.complete("Hi", **fields)
        await ws.close()
        rest = [piece async for piece in stream]
        assert stream.result is not None and stream.result.finish_reason == "length"
        assert first + "".join(rest) == stream.result.text
        cut = await client.complete("Quest:", json_schema=SCHEMAS[1], max_tokens=3, temperature=0.0)
        assert (cut.finish_reason, cut.constraint, cut.json) == ("length", "incomplete", None)
        assert (await client.ping()) is not None


def test_tools_are_shown_the_way_the_template_expects() -> None:
    """A template that renders tools gets them (and its `<tool_call>` tags shape the grammar); any other
    gets a system message describing them, added to the persona."""
    msg = m.Generate(id="t", messages=[{"role": "system", "content": "You are Meg."},
                                       {"role": "user", "content": "open up"}], tools=[DOOR, GIVE])
    native = plan_output(msg, [x.model_dump() for x in msg.messages or []], renders_tools=True,
                         tags=("<tool_call>\n", "\n</tool_call>"))
    assert [t["function"]["name"] for t in native.tools] == ["open_door", "give_item"]
    assert native.messages is not None and native.messages[0]["content"] == "You are Meg."
    assert native.constraint is not None and '"<tool_call>\\n"' in native.constraint.source
    calls = native.parse('<tool_call>\n{"name": "open_door", "arguments": {"door": "gate"}}\n</tool_call>', True)
    assert calls == (None, [m.ToolCall(name="open_door", arguments={"door": "gate"})])
    described = plan_output(msg, [x.model_dump() for x in msg.messages or []], renders_tools=False,
                            tags=("<tool_call>\n", "\n</tool_call>"))
    assert described.tools == () and described.tags == ("", "")
    assert described.messages is not None and described.messages[0]["content"].startswith("You are Meg.\n\n")
    assert '"give_item"' in described.messages[0]["content"] and len(described.messages) == 2
    assert described.parse("I will not.", True) == (None, [])
