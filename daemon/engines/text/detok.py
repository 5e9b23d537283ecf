"""Incremental detokenization that never emits a broken UTF-8 sequence.

Byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2, GPT-2 style) split characters such as emoji
across tokens. For them we map every token id to its bytes once (`byte_table`) and feed the bytes
of each new token to an incremental UTF-8 decoder: constant work per token, and a character is
emitted only once it is complete. Other tokenizers (SentencePiece: Llama 2, Mistral) decode a
short window of recent tokens and emit text once it no longer ends in U+FFFD.

U+0000 never leaves here: it comes out as U+FFFD. A model can emit the byte 0 (random or badly
tuned weights do), and game engines end strings at it (Godot's UTF-8 decoding stops there), so a
streamed NUL would make the chunks a client joined and the result's text disagree.
"""

from __future__ import annotations

import codecs
import logging
from typing import Any

__all__ = ["IncrementalDecoder", "byte_table"]

log = logging.getLogger("loraloom.text")


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte <-> printable-character map of byte-level BPE vocabularies.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def byte_table(tokenizer: Any) -> list[bytes] | None:
    """The bytes of every token id, or None when the tokenizer is not byte-level (or disagrees)."""
    try:
        decoder = tokenizer.backend_tokenizer.decoder
    except AttributeError:
        return None
    if decoder is None or "ByteLevel" not in repr(decoder):
        return None
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    table: list[bytes] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None:
            table.append(b"")
            continue
        try:
            table.append(bytes(inverse[c] for c in token))
        except KeyError:  # an added token written as plain text
            table.append(token.encode())
    # Trust the table only if it decodes like the tokenizer itself.
    probe = tokenizer.encode("Ahoy, traveller! Ça va? 🐉 Привет  x\n\ty 1234", add_special_tokens=False)
    expected = tokenizer.decode(probe, skip_special_tokens=True)
    if b"".join(table[i] for i in probe).decode("utf-8", "replace") != expected:
        log.info("tokenizer bytes do not round-trip; using windowed detokenization")
        return None
    return table


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, table: list[bytes] | None = None) -> None:
        self._tok = tokenizer
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if table is not None else None
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens up to here have been emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes (possibly empty), U+0000 as U+FFFD."""
        text = self._push(token_id)
        return text.replace("\x00", "\ufffd") if "\x00" in text else text

    def _push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._table is not None and self._utf8 is not None:
            piece = self._table[token_id] if 0 <= token_id < len(self._table) else b""
            return self._utf8.decode(piece)
        prefix_text = self._tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = self._tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self.ids)
            return str(full[len(prefix_text):])
        return ""
