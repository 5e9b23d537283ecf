"""From sampled tokens to text and events: detokenising, stop strings, finish reasons, chunks.

One `SequenceOutput` per running sequence. `on_token(token)` takes the next sampled token and
gives the chunk that may be streamed now (holding back a tail that could still turn into a stop
string) or the reason the sequence ends; `final_events(reason)` gives its last chunk and result.
"""

from __future__ import annotations

from typing import Any

from .detok import IncrementalDecoder
from .request import TextChunkEvent, TextDoneEvent
from .scheduler import Sequence

__all__ = ["SequenceOutput"]


class SequenceOutput:
    def __init__(self, seq: Sequence, tokenizer: Any, table: list[bytes] | None, *, eos_ids: frozenset[int],
                 max_context: int) -> None:
        self.seq = seq
        self.params = seq.request.sampling
        self.decoder = IncrementalDecoder(tokenizer, table)
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.grammar = seq.grammar  # the constraint's matcher, or None
        self.text = ""  # all text so far (cut before a stop string once one appears)
        self.sent = 0  # characters of `text` already streamed
        self._longest_stop = max((len(x) for x in self.params.stop), default=0)

    def on_token(self, token: int, now: float) -> tuple[TextChunkEvent | None, str | None]:
        """The chunk to stream now (or None), and the finish reason if the sequence ends here."""
        if self.seq.first_token is None:
            self.seq.first_token = now
        reason = self.push(token)
        if reason:
            return None, reason
        piece = self.take_chunk()
        return (TextChunkEvent(self.seq.key, piece, len(self.seq.tokens)) if piece else None), None

    def final_events(self, reason: str, now: float) -> list[TextChunkEvent | TextDoneEvent]:
        """The text not streamed yet, then the result."""
        seq, req = self.seq, self.seq.request
        piece = self.take_chunk(final=True)
        events: list[TextChunkEvent | TextDoneEvent] = []
        if piece:
            events.append(TextChunkEvent(seq.key, piece, len(seq.tokens)))
        events.append(TextDoneEvent(
            key=req.key, text=self.text, finish_reason=reason, prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.tokens), adapter_versions={v.name: v.number for v in seq.versions},
            queued_ms=((seq.started or now) - req.arrival) * 1000, cached_tokens=seq.cached_tokens,
            first_token_ms=None if seq.first_token is None else (seq.first_token - req.arrival) * 1000,
            total_ms=(now - req.arrival) * 1000, token_ids=tuple(seq.tokens),
            constraint=None if self.grammar is None else "satisfied" if self.grammar.is_accepting() else "incomplete"))
        return events

    def push(self, token: int) -> str | None:
        """Take the sequence's next token; the finish reason (stop, length) if it ends here."""
        seq = self.seq
        if token in self.eos_ids and not self.params.ignore_eos:
            return "stop"
        seq.tokens.append(token)
        self.text += self.decoder.push(token)
        if self.grammar is not None:
            if not self.grammar.consume_token(token):  # the mask allowed only what it accepts: a bug if so
                raise RuntimeError(f"the constraint refused token {token}: {self.grammar.get_error()}")
            if self.grammar.is_stopped():  # complete, and nothing more can follow
                return "stop"
        if self._longest_stop:
            base = max(0, self.sent - self._longest_stop)
            window = self.text[base:]
            hits = [base + window.find(x) for x in self.params.stop if x in window]
            if hits:
                self.text = self.text[:min(hits)]
                return "stop"
        if len(seq.tokens) >= self.params.max_tokens or seq.prompt_len + len(seq.tokens) >= self.max_context:
            return "length"
        return None

    def take_chunk(self, *, final: bool = False) -> str:
        """Text not streamed yet that no later token can take back ("" when there is none)."""
        if not self.seq.request.stream:
            return ""
        hold = 0 if final else max(self._longest_stop - 1, 0)
        upto = max(self.sent, len(self.text) - hold)
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece
