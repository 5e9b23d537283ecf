"""Prompts to token ids: the model's chat template, the tokenizer, and a length check that costs
nothing for prompts far too long.

No token covers more bytes than the vocabulary's longest token, so a text of B bytes has at least
B / longest tokens: a 1 MiB prompt against a 2,047-token limit is refused from its length alone,
before the chat template or the tokenizer read it. Prompts that may fit are tokenised in full.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PromptEncoder", "PromptTooLong", "load_tokenizer"]


class PromptTooLong(ValueError):
    """The prompt has more tokens than allowed (`tokens` is exact, or a lower bound when `estimated`)."""

    def __init__(self, tokens: int, limit: int, *, estimated: bool = False) -> None:
        self.tokens, self.limit, self.estimated = tokens, limit, estimated
        count = f"at least {tokens}" if estimated else f"{tokens}"
        super().__init__(f"the prompt has {count} tokens; the limit is {limit}")


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer. A plain tokenizer.json loads without AutoTokenizer, which first
    imports the model's whole transformers config module (about 2 s of a 5 s start on a CPU)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    if (folder / "tokenizer.json").exists() and config.get("tokenizer_class") in (
            None, "PreTrainedTokenizerFast", "TokenizersBackend"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class PromptEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_ids = frozenset() if eos is None else frozenset({int(eos)})
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        vocab = tokenizer.get_vocab()
        # Token strings spell bytes one character each (byte-level BPE) or use a one-character
        # space marker (SentencePiece): their UTF-8 length bounds the bytes a token covers.
        self.longest_token = max((len(t.encode("utf-8")) for t in vocab), default=1) or 1

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template lays out function definitions itself (`tools=`)."""
        return self.chat and "tools" in str(self.tokenizer.chat_template)

    @property
    def tool_call_tags(self) -> tuple[str, str]:
        """How this model's template marks a tool call: Hermes/Qwen-style `<tool_call>` tags, or a
        bare JSON object."""
        if self.renders_tools and "<tool_call>" in str(self.tokenizer.chat_template):
            return "<tool_call>\n", "\n</tool_call>"
        return "", ""

    def encode(self, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None, *,
               limit: int | None = None, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered with the model's chat template
        (with `tools`, OpenAI-style function definitions, where the template renders them: the
        caller describes them in a message otherwise); PromptTooLong when there are more than `limit`."""
        if limit is not None:
            raw = sum(len(m["content"].encode("utf-8")) for m in messages) if messages is not None \
                else len((prompt or "").encode("utf-8"))
            at_least = raw // self.longest_token
            if at_least > limit:
                raise PromptTooLong(at_least, limit, estimated=True)
        tok = self.tokenizer
        if messages is not None:
            if self.chat:
                extra = {"tools": list(tools)} if tools and self.renders_tools else {}
                text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **extra)
                ids = list(tok.encode(text, add_special_tokens=False))
            else:
                ids = list(tok.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"))
        else:
            ids = list(tok.encode(prompt or ""))
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(len(ids), limit)
        return ids
