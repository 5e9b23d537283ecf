"""From sampled tokens to text and events: detokenising, stop strings, finish reasons, chunks.

One `SequenceOutput` per running sequence. `on_token(token)` takes the next sampled token and
gives the chunk that may be streamed now (holding back a tail that could still turn into a stop
string) or the reason the sequence ends; `final_events(reason)` gives its last chunk and result.

A constrained sequence's matcher takes each token (`take_pending`) at once, or, with
`defer_grammar` (on a GPU), at the start of the next step, while the device runs that step's
forward: the matcher's work leaves the gap between steps. A grammar that completes with a token is
then seen one step late: that row's next token is thrown away and the sequence ends with `stop`,
its tokens and text what they would have been (the runner tells the engine, `grammar_done`).

With `defer_text` (the engine's choice on a GPU), a token that does not end its sequence by EOS or
length is only recorded at once (`on_token`: the next step needs it as input); its text, stop
strings and chunk come with `catch_up`, which the engine calls while the device runs the next
step. A stop string found then ends the sequence a step late, as a grammar's end does: the next
token is thrown away, and tokens, text and finish reason are what they would have been.
"""

from __future__ import annotations

from typing import Any

from .detok import IncrementalDecoder
from .request import TextChunkEvent, TextDoneEvent
from .scheduler import Sequence

__all__ = ["SequenceOutput", "take_pending"]


def take_pending(seq: Sequence) -> bool:
    """The matcher takes the sequence's token it has not taken yet, if any. True if the grammar is
    then complete and nothing more can follow (the sequence ends with that token)."""
    token = seq.grammar_pending
    if token is None:
        return False
    seq.grammar_pending = None
    if not seq.grammar.consume_token(token):  # the mask allowed only what it accepts: a bug if so
        raise RuntimeError(f"the constraint refused token {token}: {seq.grammar.get_error()}")
    return bool(seq.grammar.is_stopped())


class SequenceOutput:
    def __init__(self, seq: Sequence, tokenizer: Any, table: list[bytes] | None, *, eos_ids: frozenset[int],
                 max_context: int, defer_grammar: bool = False) -> None:
        self.seq = seq
        self.params = seq.request.sampling
        self.decoder = IncrementalDecoder(tokenizer, table)
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.grammar = seq.grammar  # the constraint's matcher, or None
        self.defer_grammar = defer_grammar  # the matcher takes a token at the next step (see the module doc)
        self.text = ""  # all text so far (cut before a stop string once one appears)
        self.sent = 0  # characters of `text` already streamed
        self._longest_stop = max((len(x) for x in self.params.stop), default=0)
        self._untexted: list[int] = []  # tokens recorded whose text waits for `catch_up`

    def on_token(self, token: int, now: float, *, defer_text: bool = False
                 ) -> tuple[TextChunkEvent | None, str | None]:
        """The chunk to stream now (or None), and the finish reason if the sequence ends here. With
        `defer_text`, a token that does not end the sequence gives its chunk at `catch_up`."""
        if self.seq.first_token is None:
            self.seq.first_token = now
        if self._untexted:  # not caught up (a step that did not run): an earlier token may end it
            reason = self._catch_up_text()
            if reason:
                return None, reason  # it ended before this token, which is dropped
        reason = self.push(token, defer_text=defer_text)
        if reason or self._untexted:
            return None, reason
        return self._chunk(), None

    @property
    def behind(self) -> bool:
        """Whether tokens wait for `catch_up`."""
        return bool(self._untexted)

    def catch_up(self) -> tuple[TextChunkEvent | None, str | None]:
        """The text of the tokens `on_token` deferred: their chunk, or the reason the sequence ends
        with them (a stop string)."""
        reason = self._catch_up_text()
        return (None, reason) if reason else (self._chunk(), None)

    def _catch_up_text(self) -> str | None:
        while self._untexted:
            reason = self._texted(self._untexted.pop(0))
            if reason:
                # Tokens after the one that ended it were never its own (at most one step behind).
                del self.seq.tokens[len(self.seq.tokens) - len(self._untexted):]
                self._untexted.clear()
                return reason
        return None

    def _chunk(self) -> TextChunkEvent | None:
        piece = self.take_chunk()
        return TextChunkEvent(self.seq.key, piece, len(self.seq.tokens)) if piece else None

    def final_events(self, reason: str, now: float) -> list[TextChunkEvent | TextDoneEvent]:
        """The text not streamed yet, then the result."""
        seq, req = self.seq, self.seq.request
        if self._untexted:
            reason = self._catch_up_text() or reason  # a stop string among them ends it as "stop"
        piece = self.take_chunk(final=True)
        if self.grammar is not None:
            take_pending(seq)  # whether the constraint is satisfied counts the last token
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

    def push(self, token: int, *, defer_text: bool = False) -> str | None:
        """Take the sequence's next token; the finish reason (stop, length) if it ends here. With
        `defer_text`, a token that cannot end it by EOS, length or (taken at once) its grammar is
        recorded and its text left to `catch_up`."""
        seq = self.seq
        if token in self.eos_ids and not self.params.ignore_eos:
            return "stop"
        seq.tokens.append(token)
        if self.grammar is not None:
            seq.grammar_pending = token
        if defer_text and (self.grammar is None or self.defer_grammar) and not self._length_reached():
            self._untexted.append(token)
            return None
        return self._texted(token)

    def _texted(self, token: int) -> str | None:
        """The text part of taking `token` (already in the sequence's tokens): detokenising, the
        grammar taken at once, stop strings and length."""
        seq = self.seq
        self.text += self.decoder.push(token)
        if self.grammar is not None and not self.defer_grammar and take_pending(seq):
            return "stop"  # complete, and nothing more can follow
        reason, cut = self._stop_string_or_length()
        if reason is not None and self.grammar is not None and self._grammar_ended():
            return "stop"  # the grammar's end first (text uncut), as when the matcher takes each token at once
        if cut is not None:
            self.text = self.text[:cut]
        return reason

    def _grammar_ended(self) -> bool:
        """The grammar is complete with the last token (taken now, or already by the runner)."""
        if take_pending(self.seq):
            return True
        return self.seq.grammar_pending is None and bool(self.grammar.is_stopped())

    def _length_reached(self) -> bool:
        seq = self.seq
        return len(seq.tokens) >= self.params.max_tokens or seq.prompt_len + len(seq.tokens) >= self.max_context

    def _stop_string_or_length(self) -> tuple[str | None, int | None]:
        """The reason the sequence ends here apart from its grammar, and where a stop string cuts the text."""
        if self._longest_stop:
            base = max(0, self.sent - self._longest_stop)
            window = self.text[base:]
            hits = [base + window.find(x) for x in self.params.stop if x in window]
            if hits:
                return "stop", min(hits)
        if self._length_reached():
            return "length", None
        return None, None

    def take_chunk(self, *, final: bool = False) -> str:
        """Text not streamed yet that no later token can take back ("" when there is none)."""
        if not self.seq.request.stream:
            return ""
        hold = 0 if final else max(self._longest_stop - 1, 0)
        upto = max(self.sent, len(self.text) - hold)
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece
