"""What goes into the text engine and what comes out: its settings, requests and events.

Plain data, no torch: the scheduler and the service read these without loading a model.
A request's events arrive through the callback given to `TextEngine.submit`, in this order:
`TextChunkEvent`s (when streaming), then one `TextDoneEvent` or one `base.EngineError`.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..base import EngineErrorCode
from .config import LORA_TARGETS

if TYPE_CHECKING:
    from ...adapters.version import AdapterVersion

__all__ = ["EngineConfig", "SamplingParams", "TextChunkEvent", "TextDoneEvent", "TextRequest", "check_request"]


@dataclass(frozen=True)
class EngineConfig:
    """Capacity settings of the text engine."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    quantize: str | None = None  # None | int8 | int4 | fp8: weight-only quantization of a dense folder at load
    max_seqs: int = 16  # sequences running at once
    max_context: int = 2048  # tokens per sequence, prompt included
    kv_cache_mb: int | None = None  # the KV pool (default: room for max_seqs sequences of max_context / 2)
    lora_slots: int = 16  # adapters resident in compute memory at once
    max_lora_rank: int = 64
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_adapters_per_request: int = 4
    prefill_chunk: int = 256  # prompt tokens of one sequence per step
    max_step_tokens: int = 512  # tokens of all sequences per step (bounds the running streams' token gap)
    block_size: int = 16  # token positions per KV block
    prefix_cache: bool = True  # keep full blocks after a request ends, for later requests with the same prefix
    priorities: bool = True  # admit and prefill by priority, pause lower priorities for higher ones
    cuda_graphs: bool = True  # replay recorded decode steps on CUDA (no effect on the CPU)
    lora_layout: Literal["auto", "dense", "bgmv"] = "auto"  # how a step lays out its LoRA rows (lora_plan.py)
    kernels: bool = True  # compiled kernels where installed (kernels.py); False: PyTorch ops only
    deterministic: bool = False  # a row's logits independent of its batch (invariant.py; CPU and CUDA)
    pinned_adapters: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


@dataclass
class TextRequest:
    """One generation. `adapters` hold validated versions (with their prepared LoRA matrices)."""

    key: Hashable
    prompt_ids: list[int]
    sampling: SamplingParams
    adapters: list[tuple[AdapterVersion, float]] = field(default_factory=list)
    stream: bool = True
    priority: str = "normal"  # player | normal | background (scheduler.PRIORITIES)
    constraint: Any = None  # what the output must match (constraints.Grammar, from engine.prepare_constraint)
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class TextChunkEvent:
    key: Hashable
    text: str
    tokens: int  # generated so far


@dataclass(frozen=True)
class TextDoneEvent:
    key: Hashable
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    adapter_versions: dict[str, int]
    queued_ms: float
    first_token_ms: float | None
    total_ms: float
    token_ids: tuple[int, ...] = ()
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    constraint: str | None = None  # with a constraint: satisfied, or incomplete (it ended first)


def check_request(req: TextRequest, config: EngineConfig, *, max_context: int,
                  vocab_size: int) -> tuple[EngineErrorCode, str] | None:
    """Why the request can never run on this engine, or None."""
    n = len(req.prompt_ids)
    if n == 0:
        return EngineErrorCode.INVALID, "the prompt is empty"
    if n >= max_context:
        return (EngineErrorCode.PROMPT_TOO_LONG, f"the prompt has {n} tokens; this daemon's context is "
                f"{max_context} tokens and at least one must be left to generate")
    if len(req.adapters) > config.max_adapters_per_request:
        return (EngineErrorCode.INVALID, f"{len(req.adapters)} adapters in one request; the maximum is "
                f"{config.max_adapters_per_request}")
    if len({v.key for v, _ in req.adapters}) > config.lora_slots:
        return EngineErrorCode.INVALID, "more distinct adapters than LoRA slots"
    for v, _ in req.adapters:
        if v.kind != "text" or v.prepared is None:
            return EngineErrorCode.ADAPTER, f"adapter '{v.name}' is not a text adapter"
    if any(not 0 <= t < vocab_size for t in req.prompt_ids):
        return EngineErrorCode.INVALID, f"a prompt token id is outside the vocabulary (0..{vocab_size - 1})"
    return None
