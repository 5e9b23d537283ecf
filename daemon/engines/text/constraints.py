"""Constrained output: llguidance grammars for requests, and each constrained row's token mask.

A request may carry one constraint (`Constraint`: a JSON schema, a regex, a list of choices, a
Lark grammar, or a tool call). `Grammars` turns it into an llguidance grammar for this model's
tokenizer, validated and cached by its exact text (compiling is milliseconds; the tokenizer's
conversion, once per engine, a fraction of a second). Each running sequence gets its own matcher,
a copy of the cached one (`Grammar.start`).

Torch is imported only by `RowMasks` (the service compiles constraints on its intake threads).

Every step, after the forward pass is launched and before its logits are read, `RowMasks` asks
llguidance for the allowed tokens of every constrained row (on its own threads, one bit per token),
and sets the others to -inf on the logits' device; unconstrained rows are not touched and cost
nothing. On CUDA that host work overlaps the device's step. After sampling, the sequence's matcher
consumes the token (`output.SequenceOutput`); when the grammar is complete and admits nothing more,
the sequence ends with `stop`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["JSON_OPTIONS", "Constraint", "ConstraintError", "Grammar", "Grammars", "RowMasks", "available"]

log = logging.getLogger("loraloom.text")

ConstraintKind = Literal["json_schema", "regex", "choices", "grammar", "tool_call"]
# Compact JSON with the spacing models see in their training data (`{"a": 1, "b": [2, 3]}`);
# flexible whitespace would let a sampled row spend its tokens on blank lines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class ConstraintError(ValueError):
    """The constraint cannot be used (an invalid schema, regex or grammar): the library's reason."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match. `source` is the exact text: a JSON schema (as JSON), a
    regex, the choices (a JSON list), a Lark grammar, or for tool calls the Lark grammar built by
    `daemon/structured.py`."""

    kind: ConstraintKind
    source: str

    def grammar_text(self) -> str:
        import llguidance as llg

        if self.kind == "json_schema":
            return str(llg.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS))  # type: ignore[arg-type]
        if self.kind == "regex":
            return str(llg.LLMatcher.grammar_from_regex(self.source))
        if self.kind == "choices":
            options = json.loads(self.source)
            return str(llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options)))
        return str(llg.LLMatcher.grammar_from_lark(self.source))  # grammar, tool_call: Lark


class Grammar:
    """A compiled, validated grammar; `start()` gives a fresh matcher for one sequence."""

    def __init__(self, constraint: Constraint, matcher: Any, compile_ms: float) -> None:
        self.constraint = constraint
        self._template = matcher
        self.compile_ms = compile_ms

    def start(self) -> Any:
        return self._template.deep_copy()


class Grammars:
    """This engine's llguidance tokenizer and a cache of compiled grammars (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], *, capacity: int = 256) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(i for i in eos_ids if 0 <= i < vocab_size)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: OrderedDict[Constraint, Grammar] = OrderedDict()
        self.stats = {"compiled": 0, "cache_hits": 0, "compile_ms_total": 0.0}

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf, n_vocab=self.vocab_size, eos_token=self._eos or None)
                except TypeError:  # llguidance before 1.9 takes one end token (pyproject asks for 1.9)
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf, n_vocab=self.vocab_size, eos_token=self._eos[0] if self._eos else None)
            return self._tokenizer

    def warm(self) -> None:
        """Convert the tokenizer now (a background thread at start), if llguidance is installed."""
        if available():
            try:
                self.tokenizer()
            except Exception:  # the first constraint reports it
                pass

    def compile(self, constraint: Constraint) -> Grammar:
        """The grammar of `constraint` (cached); ConstraintError with the library's reason if invalid."""
        if not available():
            raise ConstraintError("constrained output needs the llguidance package (pip install llguidance)")
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
                self.stats["cache_hits"] += 1
                return hit
        import llguidance as llg

        tokenizer = self.tokenizer()
        started = time.perf_counter()
        try:
            text = constraint.grammar_text()
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"invalid {constraint.kind}: {exc}") from None
        matcher = llg.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {constraint.kind}: {matcher.get_error().strip()}")
        grammar = Grammar(constraint, matcher, (time.perf_counter() - started) * 1000)
        with self._lock:
            self._cache[constraint] = grammar
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            self.stats["compiled"] += 1
            self.stats["compile_ms_total"] += grammar.compile_ms
        return grammar


class RowMasks:
    """Token masks of a step's constrained rows, computed on llguidance's threads into one pinned
    buffer and applied on the logits' device."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        import llguidance as llg
        import torch

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.device = device
        self._executor = llg.LLExecutor()
        self._buffer = torch.empty(0, self.words, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)
        self._kernel: Any = None  # triton_ops.mask_tokens_ on CUDA
        self._kernel_failed = False
        if device.type == "cuda":
            with contextlib.suppress(ImportError):
                from . import triton_ops

                if triton_ops.triton is not None:
                    self._kernel = triton_ops.mask_tokens_
        self.mask_ms = 0.0  # host time spent computing masks
        self.masked_rows = 0

    def _rows(self, n: int) -> torch.Tensor:
        import torch

        if self._buffer.shape[0] < n:
            size = max(n, 2 * self._buffer.shape[0], 8)
            self._buffer = torch.empty(size, self.words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        return self._buffer[:n]

    def take_pending(self, seqs: list[Any]) -> list[bool]:
        """Each sequence's matcher takes its token not taken yet (`Sequence.grammar_pending`), all at
        once on llguidance's threads (about 8 us a row one by one). True where the grammar is then
        complete and nothing more can follow: that sequence ends with its previous token."""
        pending = [s for s in seqs if s.grammar_pending is not None]
        if pending:
            taken = self._executor.consume_token_par([(s.grammar, s.grammar_pending) for s in pending])
            for s, ok in zip(pending, taken, strict=True):
                if not ok:  # the mask allowed only what it accepts: a bug if so
                    raise RuntimeError(f"the constraint refused token {s.grammar_pending}: {s.grammar.get_error()}")
                s.grammar_pending = None
        took = {id(s) for s in pending}
        return [id(s) in took and bool(s.grammar.is_stopped()) for s in seqs]

    def compute(self, matchers: list[Any]) -> torch.Tensor:
        """The [len(matchers), words] bitmask of the tokens each matcher allows next (host)."""
        started = time.perf_counter()
        buffer = self._rows(len(matchers))
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], buffer.data_ptr(),
                                               self.words * 4, len(matchers))
        self.mask_ms += (time.perf_counter() - started) * 1000
        self.masked_rows += len(matchers)
        return buffer

    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
        """`logits` [B, V] with the tokens rows[i] may not take set to -inf (out of place): on CUDA one
        Triton launch (`triton_ops.mask_tokens_`), else PyTorch ops."""
        from .transfer import longs

        bits = bitmask.to(logits.device, non_blocking=True)
        if self._kernel is not None and not self._kernel_failed:
            out = logits.clone()
            try:
                self._kernel(out, longs(rows, logits.device), bits)
                return out
            except Exception as exc:  # e.g. a Triton that cannot build here: the same math in PyTorch ops
                log.warning("the token-mask kernel failed (%s: %s); using PyTorch ops", type(exc).__name__, exc)
                self._kernel_failed = True
        allowed = ((bits.unsqueeze(-1) >> self._shifts) & 1).view(len(rows), -1)[:, :logits.shape[1]].bool()
        index = longs(rows, logits.device)
        out = logits.clone()
        out[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return out
