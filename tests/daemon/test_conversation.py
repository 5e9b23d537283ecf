"""Fitting conversations into the context: the pure rule, and a 200-turn chat through a real daemon."""

from __future__ import annotations

import pytest
from support import LiveDaemon

import bridge
from daemon.conversation import DoesNotFit, fit_messages


def words(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) + 1 for m in messages)


def chat(turns: int) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "You are Meg, a pirate."}]
    for i in range(turns):
        out += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    return [*out, {"role": "user", "content": "and now?"}]


def test_what_fits_is_sent_whole() -> None:
    assert fit_messages(chat(2), words, 100) == (chat(2), 0)


def test_oldest_whole_turns_go_first_down_to_the_slack() -> None:
    """The system message stays, the kept part starts at a user message, the last user message stays,
    and the cut leaves a quarter of the budget free for the next turns."""
    messages = chat(20)
    kept, dropped = fit_messages(messages, words, 60)
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and kept[1]["role"] == "user"
    assert kept[1:] == messages[1 + dropped:] and dropped % 2 == 0
    assert words(kept) <= 45 < words([messages[0], *messages[dropped - 1:]])


def test_the_same_cut_serves_several_turns() -> None:
    """Turn after turn, the kept prefix changes only when the slack is used up (cache-friendly)."""
    cuts = []
    messages = chat(30)
    for _ in range(8):
        _kept, dropped = fit_messages(messages, words, 80)
        cuts.append(dropped)
        messages = [messages[0], *messages[1 + dropped:], {"role": "assistant", "content": "arr " * 3},
                    {"role": "user", "content": "more " * 3}]
    assert cuts.count(0) >= 4, cuts


def test_too_long_even_alone_is_refused() -> None:
    with pytest.raises(DoesNotFit):
        fit_messages([{"role": "system", "content": "x " * 50}, {"role": "user", "content": "hi"}], words, 10)


@pytest.mark.timeout(600)
async def test_a_200_turn_conversation_keeps_answering_on_a_256_token_context(live_daemon: LiveDaemon) -> None:
    """trim_history: every turn is answered, the persona is never dropped, the dropped count is reported."""
    system = {"role": "system", "content": "You are Salty Meg, the quartermaster."}
    history: list[dict[str, str]] = []
    dropped_total = 0
    async with bridge.connect(live_daemon.url, live_daemon.token) as client:
        for turn in range(200):
            history.append({"role": "user", "content": f"Turn {turn}: where is the rum hidden?"})
            r = await client.complete(messages=[system, *history], trim_history=True, max_tokens=16,
                                      temperature=0.0, adapters=["alpha"])
            assert r.finish_reason in ("stop", "length") and r.prompt_tokens + 16 <= 256
            history = history[r.dropped_messages:]  # the client keeps what the daemon kept
            dropped_total += r.dropped_messages
            history.append({"role": "assistant", "content": r.text or "..."})
    assert dropped_total > 100 and history[0]["role"] == "user"
