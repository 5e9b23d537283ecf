"""The Python client's Conversation against a real daemon (256-token context): trimming, saving, order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support import LiveDaemon

import bridge
from bridge.client import Client, Conversation, TextStream

pytestmark = pytest.mark.timeout(600)

PERSONA = "You are Salty Meg, the quartermaster."


def spy_on_generate(client: Client) -> list[list[dict[str, str]]]:
    """Records the messages of every generate the client starts (the real request still goes out)."""
    sent: list[list[dict[str, str]]] = []
    real = client.generate

    def generate(*args: Any, **kwargs: Any) -> TextStream:
        sent.append([dict(m) for m in kwargs.get("messages") or []])
        return real(*args, **kwargs)

    client.generate = generate  # type: ignore[method-assign]
    return sent


async def test_a_200_turn_conversation_keeps_answering_on_a_256_token_context(live_daemon: LiveDaemon) -> None:
    """Every one of 200 turns is answered; the persona always goes out first; the history the
    conversation keeps starts with a whole turn; old turns go in steps of several turns."""
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        sent = spy_on_generate(client)
        meg = Conversation(client, system_prompt=PERSONA, adapters=["alpha"], max_tokens=16, temperature=0.0)
        drops: list[int] = []
        for turn in range(200):
            await meg.ask(f"Turn {turn}: where is the rum hidden?")
            result = meg.last_result
            assert result is not None and result.finish_reason in ("stop", "length")
            assert result.prompt_tokens + 16 <= 256
            drops.append(result.dropped_messages)
            history = meg.history
            assert history[0]["role"] == "user" and history[-2]["content"] == f"Turn {turn}: where is the rum hidden?"
            assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
    assert all(s[0] == {"role": "system", "content": PERSONA} for s in sent)
    assert sum(drops) > 150 and all(d % 2 == 0 for d in drops)
    trims = [d for d in drops if d]
    # Cut to 3/4 of the budget: each trim drops several turns, so most turns keep the previous prefix.
    assert sum(trims) / len(trims) >= 4, drops
    assert len(sent) == 200 and len(sent[-1]) < 40


async def test_history_saves_as_plain_json_and_restores(live_daemon: LiveDaemon) -> None:
    """to_json gives plain JSON; a new Conversation that loads it sends the same messages and goes on."""
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        first = Conversation(client, system_prompt=PERSONA, adapters=["beta"], max_tokens=8, seed=3)
        for line in ("Ahoy!", "Any rum left?", "Where?"):
            await first.ask(line)
        saved = first.to_json()
        data = json.loads(saved)
        assert data == {"system_prompt": PERSONA, "history": first.history}
        assert [m["content"] for m in data["history"][::2]] == ["Ahoy!", "Any rum left?", "Where?"]

        restored = Conversation(client, adapters=["beta"], max_tokens=8, seed=3)
        restored.load_json(saved)
        assert restored.system_prompt == PERSONA and restored.history == first.history
        assert restored.messages("And then?") == first.messages("And then?")
        assert await restored.ask("And then?") == await first.ask("And then?")  # same seed, same prompt
        assert restored.history == first.history

        for bad in ('{"history": [{"role": "narrator", "content": "x"}]}', '{"system_prompt": 3, "history": []}',
                    "[1, 2]", '{"system_prompt": "x"}'):
            with pytest.raises(ValueError):
                restored.load_json(bad)
        assert restored.history == first.history and restored.system_prompt == PERSONA


async def test_concurrent_asks_run_one_at_a_time_in_order(live_daemon: LiveDaemon) -> None:
    """Three asks made at once are answered in the order they were made, each with the exchanges before it."""
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        sent = spy_on_generate(client)
        npc = Conversation(client, system_prompt=PERSONA, adapters=["gamma"], max_tokens=12, temperature=0.9)
        replies = await asyncio.gather(npc.ask("one"), npc.ask("two"), npc.ask("three"))
    history = npc.history
    assert [m["content"] for m in history[::2]] == ["one", "two", "three"]
    assert [m["content"] for m in history[1::2]] == replies
    assert [len(s) for s in sent] == [2, 4, 6]
    assert sent[2][1:5] == history[:4]


async def test_a_failed_ask_leaves_the_history_and_the_queue_goes_on(live_daemon: LiveDaemon) -> None:
    """An ask the daemon refuses raises its error and records nothing; the asks behind it still run."""
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        npc = Conversation(client, system_prompt=PERSONA, adapters=["alpha"], max_tokens=6)
        await npc.ask("hello")
        before = npc.history
        npc.settings["adapters"] = ["ghost"]
        failing = asyncio.ensure_future(npc.ask("boo"))
        await asyncio.sleep(0)  # the failing ask has started (and read its settings)
        npc.settings = {**npc.settings, "adapters": ["alpha"]}  # the queued ask below uses the new settings
        behind = asyncio.ensure_future(npc.ask("still there?"))
        with pytest.raises(bridge.AdapterError) as info:
            await failing
        assert info.value.code == bridge.ErrorCode.UNKNOWN_ADAPTER
        await behind
        assert npc.history[:2] == before and [m["content"] for m in npc.history[::2]] == ["hello", "still there?"]


async def test_a_history_replaced_during_an_ask_is_kept(live_daemon: LiveDaemon) -> None:
    """Loading a save while a line is answered: the answer belongs to the old conversation and is not added."""
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        npc = Conversation(client, adapters=["alpha"], max_tokens=24)
        saved = [{"role": "user", "content": "from the save"}, {"role": "assistant", "content": "aye"}]

        def load_the_save(_chunk: str) -> None:
            npc.history = saved

        await npc.ask("hello", on_chunk=load_the_save)
        assert npc.history == saved
    with pytest.raises(TypeError):
        Conversation(client, messages=[])
