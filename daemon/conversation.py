"""Fitting a conversation into the context: which oldest turns to leave out, counted in real tokens.

`fit_messages(messages, count, budget)` keeps the leading system messages (the persona) and as many
of the most recent turns as fit, dropping whole turns from the front (a turn starts at a user
message), never the last user message. When it must drop, it drops down to `slack` of the budget,
so the next turns fit without dropping again: the conversation's prefix stays the same for several
turns, and so does its cached prefix (the prefix cache keys blocks by their tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["DoesNotFit", "fit_messages"]

Message = dict[str, str]


class DoesNotFit(ValueError):
    """Even the system messages and the last user message are too long."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"the system messages and the last user message alone have {tokens} tokens; "
                         f"the budget is {budget}")
        self.tokens, self.budget = tokens, budget


def fit_messages(messages: Sequence[Message], count: Callable[[list[Message]], int], budget: int, *,
                 slack: float = 0.75) -> tuple[list[Message], int]:
    """(the messages to send, how many were left out after the system messages)."""
    messages = list(messages)
    total = count(messages)
    if total <= budget:
        return messages, 0
    head = next((i for i, msg in enumerate(messages) if msg["role"] != "system"), len(messages))
    system, rest = messages[:head], messages[head:]
    last_user = max((i for i, msg in enumerate(rest) if msg["role"] == "user"), default=len(rest))
    cuts = [i for i in range(1, last_user + 1) if rest[i]["role"] == "user"]  # messages dropped at each cut

    def fits(i: int, limit: int) -> bool:
        return count(system + rest[cuts[i]:]) <= limit

    for limit in (int(budget * slack), budget):
        # Fewer tokens the more is dropped: the first cut that fits, by bisection.
        lo, hi = 0, len(cuts)
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid, limit):
                hi = mid
            else:
                lo = mid + 1
        if lo < len(cuts):
            return system + rest[cuts[lo]:], cuts[lo]
    raise DoesNotFit(count(system + rest[last_user:]) if rest else total, budget)
