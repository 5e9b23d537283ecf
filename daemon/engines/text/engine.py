"""The multi-LoRA text engine: continuous batching of requests on different adapters.

Usable as a library:

    engine = TextEngine.from_folder(path)              # or TextEngine.from_folder("default")
    print(engine.generate("Hello", adapters=[(version, 1.0)], max_tokens=32))

and by the daemon, which calls `start()` (a worker thread runs the step loop) and `submit()` from
any thread; events come back through each request's callback, on the worker thread.

Each step: take commands (submit, cancel, retire), admit queued requests while cache rows and
adapter slots allow (arrival order; a request whose adapters need slots that are busy lets
requests with resident adapters pass), then run one forward pass over every running sequence:
one decode token each, plus prompt chunks within a token budget, so a long prompt never freezes
the others' streams.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bridge.errors import ErrorCode

from ...adapters.version import AdapterVersion
from . import cpu_lora
from .config import LORA_TARGETS, ModelSpec
from .detok import IncrementalDecoder, byte_table
from .graphs import DecodeGraphs
from .lora import LoraBatch, LoraSlotStorage, PreparedLora
from .model import KVCache, PrefillChunk, StepInput, TextModel
from .peft_format import prepare_peft_lora
from .sampler import SamplingParams, sample
from .slots import SlotTable

__all__ = [
    "EngineConfig",
    "TextChunkEvent",
    "TextDoneEvent",
    "TextEngine",
    "TextErrorEvent",
    "TextRequest",
]

log = logging.getLogger("loraloom.text")


@dataclass(frozen=True)
class EngineConfig:
    """Capacity settings of the text engine."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    max_seqs: int = 16  # sequences running at once (KV-cache rows)
    max_context: int = 2048  # tokens per sequence, prompt included
    kv_cache_mb: int | None = None  # if set, caps max_seqs to what fits
    lora_slots: int = 16  # adapters resident in compute memory at once
    max_lora_rank: int = 64
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_adapters_per_request: int = 4
    prefill_chunk: int = 256  # prompt tokens of one sequence per step
    cuda_graphs: bool = True  # replay recorded decode steps on CUDA (no effect on the CPU)
    lora_kernel: str = "auto"  # auto | dense | bgmv (see lora.py; auto picks per step)
    # Compiled kernels where installed: Triton on CUDA (LoRA expand, RMSNorm, RoPE), numba on the CPU (LoRA, float32).
    kernels: bool = True
    max_step_tokens: int = 512  # tokens of all sequences per step
    pinned_adapters: tuple[str, ...] = ()


@dataclass
class TextRequest:
    """One generation. `adapters` hold validated versions (with `prepared` LoRA matrices)."""

    key: Any
    prompt_ids: list[int]
    sampling: SamplingParams
    on_event: Callable[[Any], None]
    adapters: list[tuple[AdapterVersion, float]] = field(default_factory=list)
    stream: bool = True
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class TextChunkEvent:
    key: Any
    text: str
    tokens: int


@dataclass(frozen=True)
class TextDoneEvent:
    key: Any
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    adapter_versions: dict[str, int]
    queued_ms: float
    first_token_ms: float | None
    total_ms: float
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextErrorEvent:
    key: Any
    code: str
    message: str


_SERIALS = itertools.count()


class _Seq:
    """A running request."""

    def __init__(self, req: TextRequest, row: int, slots: list[int], tokenizer: Any, table: list[bytes] | None,
                 num_slots: int) -> None:
        self.req = req
        self.row = row
        self.slots = slots
        self.serial = next(_SERIALS)  # identifies this sequence for caches keyed by the batch's members
        self.scales = [s for _, s in req.adapters]
        self.uses_lora = any(x != 0.0 for x in self.scales)
        self.versions = [v for v, _ in req.adapters]
        self.slot_weights = torch.zeros(num_slots)  # this row's scale per slot (float32, host)
        for slot, scale in zip(slots, self.scales, strict=True):
            self.slot_weights[slot] += scale
        self.done_prompt = 0
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer, table)
        self.text = ""  # all text so far
        self.sent = 0  # characters of `text` already emitted
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.cancelled = False

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.done_prompt < self.prompt_len


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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype '{name}' (use auto, float32, bfloat16 or float16)")
    return table[name]


class TextEngine:
    """One base model, many LoRA adapters, continuous batching."""

    def __init__(self, model: TextModel, tokenizer: Any, config: EngineConfig | None = None,
                 model_dir: Path | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.model_dir = model_dir
        self.spec: ModelSpec = model.spec
        self.tokenizer = tokenizer
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        self.byte_table = byte_table(tokenizer)
        self.max_context = min(cfg.max_context, self.spec.max_position_embeddings)
        rows = cfg.max_seqs
        if cfg.kv_cache_mb is not None:
            per_row = KVCache.bytes_per_row(self.spec, self.max_context, self.dtype)
            rows = max(1, min(rows, cfg.kv_cache_mb * 2**20 // per_row))
        # One extra row: CUDA-graph padding rows write their keys and values there.
        self.cache = KVCache(self.spec, rows=rows + 1, max_len=self.max_context, device=self.device,
                             dtype=self.dtype)
        bad = [t for t in cfg.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad} (supported: {', '.join(LORA_TARGETS)})")
        self.storage = LoraSlotStorage(
            self.model, num_layers=self.spec.num_layers, target_dims=self.spec.target_dims(),
            targets=tuple(cfg.lora_targets), num_slots=cfg.lora_slots, max_rank=cfg.max_lora_rank,
            device=self.device, dtype=self.dtype)
        if cfg.kernels and self.device.type == "cuda":
            from .triton_lora import available

            if available(self.device):
                self.storage.kernel = "triton"
                self.model.triton_ops = True
        elif cfg.kernels and self.dtype == torch.float32 and cpu_lora.available():
            self.storage.kernel = "numba"
        self.slots = SlotTable(self.storage, pinned=cfg.pinned_adapters)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and cfg.cuda_graphs:
            self.graphs = DecodeGraphs(self.model, self.cache, self.storage, max_rows=rows, scratch_row=rows)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._queue: deque[TextRequest] = deque()
        self._running: list[_Seq] = []
        self._commands: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.last_batch_size = 0
        # Test and debugging hook: called with (request keys, float32 logits) after every forward.
        self.on_logits: Callable[[list[Any], torch.Tensor], None] | None = None
        log.info("text model %s: %s layers, %.0fM parameters, %s %s, %d sequences x %d tokens, %d LoRA slots, "
                 "%s LoRA kernel", self.spec.name, self.spec.num_layers, self.spec.num_parameters() / 1e6,
                 self.device, str(self.dtype).removeprefix("torch."), rows, self.max_context, cfg.lora_slots,
                 self.storage.kernel)
        mb = 2**20
        log.info("text engine memory: weights %d MB, KV cache %d MB (max_seqs %d x max_context %d tokens), "
                 "LoRA pool %d MB (lora_slots %d x max_lora_rank %d); lower those settings to use less",
                 self.model.nbytes() // mb, self.cache.nbytes() // mb, rows, self.max_context,
                 self.storage.pool_nbytes() // mb, cfg.lora_slots, cfg.max_lora_rank)

    @classmethod
    def from_folder(cls, model: str | Path, config: EngineConfig | None = None,
                    cache_dir: Path | None = None) -> TextEngine:
        """`model` is a Hugging Face folder, or "default" for the embedded SmolLM2-135M-Instruct."""
        if str(model) == "default":
            from .default_model import ensure_default_text_model

            model = ensure_default_text_model(cache_dir)
        cfg = config or EngineConfig()
        device = _resolve_device(cfg.device)
        folder = Path(model)
        text_model = TextModel.from_folder(folder, device=device, dtype=_resolve_dtype(cfg.dtype, device))
        return cls(text_model, load_tokenizer(folder), cfg, model_dir=folder)

    # ------------------------------------------------------------------ inputs

    @property
    def max_rows(self) -> int:
        return self.cache.rows - 1

    def encode_prompt(self, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered with the model's chat template."""
        if messages is not None:
            if getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(prompt or ""))

    def prepare_adapter(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PreparedLora:
        """Validate a PEFT LoRA against this base model (raises ValueError with the reason)."""
        prepared = prepare_peft_lora(config, tensors, self.spec, max_rank=self.config.max_lora_rank)
        unused = [t for t in prepared.targets if t not in self.storage.targets]
        if unused:
            raise ValueError(f"targets {unused} are not enabled on this daemon (lora_targets: "
                             f"{', '.join(self.storage.targets)})")
        return prepared

    def check_request(self, req: TextRequest) -> tuple[str, str] | None:
        """(code, message) if the request can never run here, else None."""
        n = len(req.prompt_ids)
        if n == 0:
            return ErrorCode.INVALID_PARAMETER.value, "the prompt is empty"
        if n >= self.max_context:
            return (ErrorCode.PROMPT_TOO_LONG.value,
                    f"the prompt has {n} tokens; this daemon's context is {self.max_context} tokens "
                    f"and at least one must be left to generate")
        if len(req.adapters) > self.config.max_adapters_per_request:
            return (ErrorCode.INVALID_PARAMETER.value,
                    f"{len(req.adapters)} adapters in one request; the maximum is "
                    f"{self.config.max_adapters_per_request}")
        if len({v.key for v, _ in req.adapters}) > self.config.lora_slots:
            return ErrorCode.INVALID_PARAMETER.value, "more distinct adapters than LoRA slots"
        for v, _ in req.adapters:
            if not isinstance(v.prepared, PreparedLora):
                return ErrorCode.ADAPTER_UNAVAILABLE.value, f"adapter '{v.name}' is not a text adapter"
        return None

    # ------------------------------------------------------------------ thread-safe API

    def submit(self, req: TextRequest) -> None:
        """Queue a request (any thread). Problems are reported through its callback."""
        self._command("submit", req)

    def cancel(self, key: Any) -> None:
        self._command("cancel", key)

    def retire(self, version_key: str) -> None:
        """An adapter version was replaced or removed: free its slot once unused."""
        self._command("retire", version_key)

    def _command(self, kind: str, arg: Any) -> None:
        with self._wake:
            self._commands.append((kind, arg))
            self._wake.notify()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loraloom-text", daemon=True)
            self._thread.start()

    def stop(self, message: str = "the daemon is shutting down") -> None:
        """Stop the worker; every queued and running request ends with `shutting_down`. Idempotent."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drain_commands()
        for req in list(self._queue):
            self._emit(req, TextErrorEvent(req.key, ErrorCode.SHUTTING_DOWN.value, message))
        self._queue.clear()
        for seq in list(self._running):
            self._finish(seq, None, error=(ErrorCode.SHUTTING_DOWN.value, message))

    def stats(self) -> dict[str, int]:
        """Counters for /healthz and benchmarks (read without locking: approximate while running)."""
        return {"running": len(self._running), "queued": len(self._queue), "steps": self.steps,
                "free_rows": len(self._free_rows), "slot_loads": self.slots.stats.loads,
                "slot_evictions": self.slots.stats.evictions, "resident_adapters": len(self.slots.resident()),
                # pool rows a dense LoRA step reads (resident adapters from the front, holes included), pool size
                "lora_rows_in_use": self.storage.used, "lora_pool_rows": self.storage.pool_rows,
                "lora_pool_compactions": self.storage.compactions}

    def has_work(self) -> bool:
        return bool(self._running or self._queue or self._commands)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    # ------------------------------------------------------------------ library convenience

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                 adapters: Sequence[tuple[AdapterVersion, float]] = (), **sampling: Any) -> str:
        """Run one request to the end on the calling thread (engine not started) and return its text."""
        return self.generate_many([dict(prompt=prompt, messages=messages, adapters=adapters, **sampling)])[0].text

    def generate_many(self, requests: Sequence[dict[str, Any]]) -> list[TextDoneEvent]:
        """Run several requests batched together on the calling thread; their final events, in order."""
        if self._thread is not None:
            raise RuntimeError("generate_many() runs the engine itself; use submit() while it is started")
        results: dict[int, Any] = {}
        for i, r in enumerate(requests):
            r = dict(r)
            ids = r.pop("prompt_ids", None) or self.encode_prompt(r.pop("prompt", None), r.pop("messages", None))
            r.pop("prompt", None)
            r.pop("messages", None)
            adapters = list(r.pop("adapters", ()))
            seed = r.pop("seed", None)
            params = SamplingParams(seed=seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1,
                                    **{k: (tuple(v) if k == "stop" else v) for k, v in r.items()})

            def keep_final(event: Any) -> None:
                if not isinstance(event, TextChunkEvent):
                    results[event.key] = event

            self.submit(TextRequest(key=i, prompt_ids=ids, sampling=params, adapters=adapters, on_event=keep_final))
        while self.has_work():
            self.step()
        out = []
        for i in range(len(requests)):
            e = results[i]
            if isinstance(e, TextErrorEvent):
                raise ValueError(f"{e.code}: {e.message}")
            out.append(e)
        return out

    # ------------------------------------------------------------------ the step

    def _emit(self, req: TextRequest, event: Any) -> None:
        try:
            req.on_event(event)
        except Exception:
            log.exception("an event callback failed for request %r", req.key)

    def _drain_commands(self) -> None:
        while True:
            with self._wake:
                if not self._commands:
                    return
                kind, arg = self._commands.popleft()
            if kind == "submit":
                problem = self.check_request(arg)
                if problem:
                    self._emit(arg, TextErrorEvent(arg.key, *problem))
                else:
                    self._queue.append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "retire":
                self.slots.retire(arg)

    def _cancel(self, key: Any) -> None:
        for req in self._queue:
            if req.key == key:
                self._queue.remove(req)
                now = time.perf_counter()
                ms = (now - req.arrival) * 1000
                self._emit(req, TextDoneEvent(key, "", "cancelled", len(req.prompt_ids), 0,
                                              {v.name: v.number for v, _ in req.adapters}, ms, None, ms))
                return
        for seq in self._running:
            if seq.req.key == key:
                seq.cancelled = True

    def _admit(self) -> None:
        blocked_on_slots = False
        for req in list(self._queue):
            if not self._free_rows:
                return
            versions = [v for v, _ in req.adapters]
            needs_load = any(v.key not in self.slots.resident() for v in versions)
            if blocked_on_slots and needs_load:
                continue  # keep arrival order among requests that wait for slots
            slots = self.slots.acquire(versions)
            if slots is None:
                blocked_on_slots = True
                continue
            self._queue.remove(req)
            self._running.append(_Seq(req, self._free_rows.pop(), slots, self.tokenizer, self.byte_table,
                                      self.storage.num_slots))

    def step(self) -> bool:
        """One scheduling round and forward pass. Returns False when there was nothing to do."""
        self._drain_commands()
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, "cancelled")
        self._admit()
        if not self._running:
            return False
        try:
            self._forward_and_sample()
        except Exception as exc:
            log.error("engine step failed: %s\n%s", exc, traceback.format_exc())
            for seq in list(self._running):
                self._finish(seq, None, error=(ErrorCode.INTERNAL.value, f"engine step failed: {exc}"))
        self.steps += 1
        return True

    def _forward_and_sample(self) -> None:
        cfg = self.config
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        sample_seqs: list[_Seq] = []
        logit_index: list[int] = []
        decode = sorted((s for s in self._running if not s.in_prefill), key=lambda s: s.row)
        for s in decode:
            ctx = s.prompt_len + len(s.generated)
            ids.append(s.generated[-1])
            pos.append(ctx - 1)
            rows.append(s.row)
            logit_index.append(len(ids) - 1)
            sample_seqs.append(s)
        if self.graphs is not None and decode and len(decode) == len(self._running):  # decode only
            self.last_batch_size = len(ids)
            # A sequence's slot scales never change while it runs, so the graph's copy of them is
            # reused for as long as the same sequences decode together.
            uses_lora = any(s.uses_lora for s in decode)
            logits = self.graphs.run(ids, pos, rows, (lambda: self._slot_weights(decode)) if uses_lora else None,
                                     weights_key=tuple(s.serial for s in decode))
            self._sample_and_accept(sample_seqs, logits)
            return
        budget = max(cfg.max_step_tokens - len(decode), 1)
        chunks: list[PrefillChunk] = []
        counts = [1] * len(decode)  # tokens of each sequence in this step, in order
        step_seqs = list(decode)
        for s in self._running:
            if not s.in_prefill or budget <= 0:
                continue
            n = min(s.prompt_len - s.done_prompt, cfg.prefill_chunk, budget)
            start = len(ids)
            ids.extend(s.req.prompt_ids[s.done_prompt:s.done_prompt + n])
            pos.extend(range(s.done_prompt, s.done_prompt + n))
            rows.extend([s.row] * n)
            chunks.append(PrefillChunk(start=start, end=start + n, row=s.row, pos0=s.done_prompt))
            counts.append(n)
            step_seqs.append(s)
            s.done_prompt += n
            budget -= n
            if not s.in_prefill:
                logit_index.append(len(ids) - 1)
                sample_seqs.append(s)
        dev = self.device
        step = StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            cache_rows=torch.tensor(rows, dtype=torch.long, device=dev),
            num_decode=len(decode),
            decode_rows=torch.tensor([s.row for s in decode], dtype=torch.long, device=dev),
            decode_lens=torch.tensor([p + 1 for p in pos[:len(decode)]], dtype=torch.long, device=dev),
            max_decode_len=max((p + 1 for p in pos[:len(decode)]), default=0),
            prefill=chunks,
            logit_index=torch.tensor(logit_index, dtype=torch.long, device=dev),
            decode_row_range=(decode[0].row, decode[-1].row + 1)
            if decode and decode[-1].row - decode[0].row + 1 == len(decode) else None,
            lora=self._lora_batch(step_seqs, counts),
        )
        self.last_batch_size = len(ids)
        logits = self.model.forward(step, self.cache, self.storage)
        if sample_seqs:  # else: only prompt chunks that end mid-prompt
            self._sample_and_accept(sample_seqs, logits)

    def _lora_batch(self, seqs: list[_Seq], counts: list[int]) -> LoraBatch:
        """The step's LoRA plan from each sequence's slot vector (no per-token Python). On a GPU:
        dense over the pool rows in use (`lora_project` fuses the shrink into the base GEMM); so
        are CPU decode steps with the numba kernel. Otherwise on a CPU, where prompt tokens are
        compute-bound, `LoraBatch.plan` picks per step."""
        per_seq = self._slot_weights(seqs)
        if per_seq is None:
            return LoraBatch(mode="none")
        per_token = per_seq.repeat_interleave(torch.tensor(counts), dim=0)
        kernel = self.config.lora_kernel
        # The numba loop reads only the rows each token uses, so the prefix costs nothing extra.
        prefix = self.device.type == "cuda" or (self.storage.kernel == "numba" and len(per_token) <= cpu_lora.MAX_ROWS)
        return LoraBatch.plan(per_token, self.storage, dtype=self.dtype,
                              prefer_prefix=prefix and kernel in ("auto", "dense"),
                              force=None if kernel == "auto" else kernel)  # type: ignore[arg-type]

    def _slot_weights(self, decode: list[_Seq]) -> torch.Tensor | None:
        """[rows, slots] scale of every slot for each row, or None when no row uses an adapter."""
        if not any(s.uses_lora for s in decode):
            return None
        return torch.stack([s.slot_weights for s in decode])

    def _sample_and_accept(self, sample_seqs: list[_Seq], logits: torch.Tensor) -> None:
        if self.on_logits is not None:
            self.on_logits([s.req.key for s in sample_seqs], logits)
        params = [s.req.sampling for s in sample_seqs]
        # Token histories only for the rows with a repetition penalty (the others never read them).
        histories = [s.req.prompt_ids + s.generated if p.repetition_penalty != 1.0 else []
                     for s, p in zip(sample_seqs, params, strict=True)]
        tokens = sample(logits, params, [len(s.generated) for s in sample_seqs], histories)
        now = time.perf_counter()
        for s, tok in zip(sample_seqs, tokens, strict=True):
            self._accept(s, tok, now)

    def _accept(self, s: _Seq, tok: int, now: float) -> None:
        if s.first_token is None:
            s.first_token = now
        if tok in self.eos_ids and not s.req.sampling.ignore_eos:
            self._finish(s, "stop")
            return
        s.generated.append(tok)
        s.text += s.decoder.push(tok)
        stops = s.req.sampling.stop
        if stops:
            window = s.text[max(0, s.sent - max(len(x) for x in stops)):]
            base = max(0, s.sent - max(len(x) for x in stops))
            hits = [base + window.find(x) for x in stops if x in window]
            if hits:
                s.text = s.text[:min(hits)]
                self._finish(s, "stop")
                return
        if len(s.generated) >= s.req.sampling.max_tokens or s.prompt_len + len(s.generated) >= self.max_context:
            self._finish(s, "length")
            return
        self._flush(s, final=False)

    def _flush(self, s: _Seq, *, final: bool) -> None:
        if not s.req.stream:
            return
        # Hold back a tail that could still become a stop string.
        hold = 0 if final or not s.req.sampling.stop else max(len(x) for x in s.req.sampling.stop) - 1
        upto = max(s.sent, len(s.text) - hold)
        if upto > s.sent:
            piece = s.text[s.sent:upto]
            s.sent = upto
            self._emit(s.req, TextChunkEvent(s.req.key, piece, len(s.generated)))

    def _finish(self, s: _Seq, reason: str | None, *, error: tuple[str, str] | None = None) -> None:
        self._running.remove(s)
        self._free_rows.append(s.row)
        self.slots.release(s.versions)
        if error is not None:
            self._emit(s.req, TextErrorEvent(s.req.key, *error))
            return
        assert reason is not None
        self._flush(s, final=True)
        now = time.perf_counter()
        req = s.req
        self._emit(req, TextDoneEvent(
            key=req.key, text=s.text, finish_reason=reason, prompt_tokens=s.prompt_len,
            completion_tokens=len(s.generated), adapter_versions={v.name: v.number for v in s.versions},
            queued_ms=(s.started - req.arrival) * 1000,
            first_token_ms=None if s.first_token is None else (s.first_token - req.arrival) * 1000,
            total_ms=(now - req.arrival) * 1000, token_ids=tuple(s.generated)))
