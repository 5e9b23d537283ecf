"""Incremental detokenization that never emits a broken UTF-8 sequence.

Byte-level tokenizers split characters (emoji, accents) across tokens. We decode a short window
of recent tokens and only emit text once it no longer ends in U+FFFD (an unfinished sequence).
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens up to here have been emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = self._tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self.ids)
            return full[len(prefix_text):]
        return ""
