"""`Conversation`: a persona and the recent turns of one chat, kept for a game script (the Python
twin of the plugins' conversations; the table of docs/ARCHITECTURE.md lists the parity)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .messages import ChatMessage, Result

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Conversation"]

_ROLES = ("system", "user", "assistant")
# Client.generate arguments a conversation sets itself.
_CONVERSATION_OWN = frozenset({"prompt", "messages", "system", "trim_history", "stream", "request_id"})


def _chat_message(message: ChatMessage | dict[str, str]) -> dict[str, str]:
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
    if role not in _ROLES or not isinstance(content, str):
        raise ValueError(f"not a chat message: {message!r} (expected {{'role': {'|'.join(_ROLES)}, 'content': str}})")
    return {"role": str(role), "content": content}


class Conversation:
    """A persona (system prompt) and the recent turns of one chat, for a game script.

        meg = Conversation(client, system_prompt="You are Meg, a pirate.", adapters=["pirate"], max_tokens=64)
        reply = await meg.ask("Where is the rum?")
        save["meg"] = meg.to_json()                  # {"system_prompt": ..., "history": [...]}
        meg.load_json(save["meg"])

    `ask` sends the persona, the whole history and the new line with `trim_history=True`. When they
    do not fit the daemon's context with room for the reply, the daemon leaves out the oldest whole
    turns, counted in its own tokens, cutting down to 3/4 of the budget so the following turns keep
    the same prefix (and its cached keys and values); the conversation then forgets the same
    messages (`result.dropped_messages`, counted after the leading system messages). The persona
    and system messages at the start of the history are never dropped. Asks on one conversation run
    one at a time in the order they were made, each sent with the exchanges before it. A failed or
    cancelled ask leaves the history as it was; so does an answer that arrives after `history` was
    replaced (a save game loaded meanwhile). Keyword arguments are `Client.generate`'s (adapters,
    max_tokens, temperature, priority, ...), used for every ask.
    """

    def __init__(self, client: Client, *, system_prompt: str = "",
                 history: Iterable[ChatMessage | dict[str, str]] = (), **settings: Any) -> None:
        if clash := sorted(_CONVERSATION_OWN & settings.keys()):
            raise TypeError(f"a Conversation sets {clash} itself")
        self.client = client
        self.system_prompt = system_prompt
        self.settings = settings
        self.last_result: Result | None = None
        self._history: list[dict[str, str]] = []
        self._generation = 0
        self._turn = asyncio.Lock()
        self.history = list(history)

    @property
    def history(self) -> list[dict[str, str]]:
        """The turns so far, oldest first, as `{"role": ..., "content": ...}` (a copy)."""
        return [dict(m) for m in self._history]

    @history.setter
    def history(self, messages: Iterable[ChatMessage | dict[str, str]]) -> None:
        self._history = [_chat_message(m) for m in messages]
        self._generation += 1

    def messages(self, text: str) -> list[dict[str, str]]:
        """What `ask(text)` sends: the persona, the history and the new line."""
        persona = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*persona, *self.history, {"role": "user", "content": text}]

    async def ask(self, text: str, *, on_chunk: Callable[[str], None] | None = None) -> str:
        """Say `text` and return the reply; `on_chunk` gets its text as it streams."""
        async with self._turn:
            generation = self._generation
            stream = self.client.generate(messages=self.messages(text), trim_history=True,
                                          stream=on_chunk is not None, **self.settings)
            try:
                async for chunk in stream:
                    if on_chunk is not None:
                        on_chunk(chunk)
            finally:
                await stream.aclose()
            result = stream.result
            assert result is not None
            self.last_result = result
            if generation == self._generation:
                lead = next((i for i, m in enumerate(self._history) if m["role"] != "system"), len(self._history))
                del self._history[lead:lead + result.dropped_messages]
                self._history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
            return result.text

    def clear(self) -> None:
        """Forget the turns (the persona stays)."""
        self.history = []

    def to_json(self) -> str:
        """The persona and the history as plain JSON, for a save game (the plugins read the same form)."""
        return json.dumps({"system_prompt": self.system_prompt, "history": self._history}, ensure_ascii=False)

    def load_json(self, text: str) -> None:
        """Restore what `to_json` wrote; ValueError (and nothing changed) when `text` is not such a save."""
        data = json.loads(text)
        if (not isinstance(data, dict) or not isinstance(data.get("history"), list)
                or not isinstance(data.get("system_prompt", ""), str)):
            raise ValueError('not a saved conversation: expected {"system_prompt": str, "history": [...]}')
        history = [_chat_message(m) for m in data["history"]]
        self.system_prompt = data.get("system_prompt", "")
        self.history = history
