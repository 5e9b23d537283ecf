"""The multi-LoRA text engine: the worker thread and its command loop, wiring the parts together.

    engine = TextEngine.from_folder(path)              # or TextEngine.from_folder("default")
    engine.start()
    engine.submit(TextRequest(key=1, prompt_ids=engine.encode_prompt("Hello"), sampling=...), on_event)

`offline.generate_many(engine, requests)` runs requests to the end on the calling thread. The
daemon calls `start()` (a worker thread runs the step loop) and `submit(request, on_event)`
from any thread; events come back through `on_event` on the worker thread. Each step: take the
commands (submit, cancel, retire), end cancelled sequences, admit queued requests and plan the
step (`scheduler`), run it on the device (`runner`), turn tokens into text and events (`output`).
How a planned step runs (one at a time, or overlapped with the one before on a GPU) and how a
failing step is retried in halves, so one sequence's failure ends only that sequence: `stepping`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...adapters.loader import AdapterFiles
from ...adapters.version import AdapterVersion
from ...budget import GpuBudget, StepTimer
from ..base import EngineError, EngineErrorCode, EngineInfo, EventSink, PreparedAdapter
from ..device import dtype_name, resolve_device, resolve_dtype
from .blocks import BlockPool
from .config import LORA_TARGETS
from .constraints import Constraint, Grammar, Grammars
from .detok import byte_table
from .graphs import MAX_CHUNKS, StepGraphs
from .invariant import InvariantKernels
from .kernels import select_kernels
from .kv import PagedKV
from .lora_pool import LoraSlotStorage, PreparedLora
from .model import TextModel
from .output import SequenceOutput
from .peft_format import prepare_peft_lora
from .request import EngineConfig, TextChunkEvent, TextDoneEvent, TextRequest, check_request
from .runner import Launched, ModelRunner
from .scheduler import Scheduler
from .slots import SlotTable
from .stepping import StepRunning
from .tokens import PromptEncoder, load_tokenizer

__all__ = ["TextEngine"]

log = logging.getLogger("loraloom.text")


class TextEngine(StepRunning):
    """One base model, many LoRA adapters, continuous batching."""

    def __init__(self, model: TextModel, tokenizer: Any, config: EngineConfig | None = None,
                 model_dir: Path | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        self.model = model
        self.device, self.dtype, self.spec = model.device, model.dtype, model.spec
        self.model_dir = model_dir
        self.prompts = PromptEncoder(tokenizer)
        self.tokenizer = tokenizer
        self.eos_ids = frozenset({*self.spec.eos_token_ids, *self.prompts.eos_ids})
        self.grammars = Grammars(tokenizer, self.spec.vocab_size, self.eos_ids)
        self.byte_table = byte_table(tokenizer)
        self.max_context = min(cfg.max_context, self.spec.max_position_embeddings)
        model.ensure_rope(self.max_context)
        bs = cfg.block_size
        width = -(-self.max_context // bs)  # blocks of one sequence at most
        per_block = PagedKV.bytes_per_token(self.spec, self.dtype) * bs
        blocks = (cfg.kv_cache_mb * 2**20 // per_block if cfg.kv_cache_mb is not None
                  else -(-cfg.max_seqs * self.max_context // (2 * bs)))
        blocks = max(blocks, width + 1) + 1  # room for one sequence of max_context at least; block 0 is padding
        self.kv = PagedKV(self.spec, num_blocks=blocks, block_size=bs, device=self.device, dtype=self.dtype)
        self.pool = BlockPool(blocks, bs, prefix_cache=cfg.prefix_cache)
        bad = [t for t in cfg.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad} (supported: {', '.join(LORA_TARGETS)})")
        self.storage = LoraSlotStorage(
            self.model, num_layers=self.spec.num_layers, target_dims=self.spec.target_dims(),
            targets=tuple(cfg.lora_targets), num_slots=cfg.lora_slots, max_rank=cfg.max_lora_rank,
            device=self.device, dtype=self.dtype)
        self.kernels = model.kernels = (InvariantKernels(self.device, self.dtype) if cfg.deterministic
                                        else select_kernels(self.device, self.dtype, enabled=cfg.kernels))
        self.slots = SlotTable(self.storage, pinned=cfg.pinned_adapters)
        # Deterministic mode records its decode steps too where its row counts are fixed (a GPU's layout).
        fixed = bool(getattr(self.kernels, "fixed_rows", False))
        self.graphs = (StepGraphs(self.model, self.kv, self.storage, max_rows=cfg.max_seqs, table_width=width,
                                  max_context=self.max_context, fixed_rows=cfg.deterministic)
                       if self.device.type == "cuda" and cfg.cuda_graphs and (not cfg.deterministic or fixed) else None)
        self.scheduler = Scheduler(max_seqs=cfg.max_seqs, slots=self.slots, pool=self.pool,
                                   max_step_tokens=cfg.max_step_tokens, prefill_chunk=cfg.prefill_chunk,
                                   priorities=cfg.priorities,
                                   max_chunks=MAX_CHUNKS if self.graphs is not None and not cfg.deterministic else None)
        self.runner = ModelRunner(self.model, self.kv, self.storage, self.kernels, cfg, self.graphs, table_width=width)
        self._outputs: dict[int, SequenceOutput] = {}  # sequence serial -> its output step
        self._events: dict[int, EventSink] = {}  # id(request) -> its callback
        self._commands: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.failed_steps = 0
        self.budget: GpuBudget | None = None  # the GPU budget the daemon shares between its engines
        self.step_timer = StepTimer()  # predicts a step's time (the budget's frame windows, chunk sizes)
        # Constrained rows' matchers take each token at the next step, behind its forward, where the
        # device runs that forward while the host works (`output`); on the CPU the forward is the host.
        self.defer_grammar = self.device.type == "cuda"
        self.grammar_late_stops = 0  # sequences whose grammar's end was seen a step late (a row's work thrown away)
        # Likewise the text of a token that does not end its sequence (detokenising, stop strings, the
        # chunk event) is made while the device runs the next step (`output`, `_catch_up`).
        self.defer_text = self.device.type == "cuda"
        self._behind: list[SequenceOutput] = []  # outputs whose text waits for `_catch_up`
        self.late_stops = 0  # sequences a stop string ended a step late
        # And each step is planned and launched before the last one's tokens reach the host: the host's
        # work of a step (planning, inputs, their copy, the launch, the tokens' text) runs while the
        # device runs the step before (`_run_overlapped`). The decode rows take their input tokens
        # from the device. A sequence whose token ends it (EOS, a stop string) has already run in
        # the next step: that row's token is dropped, as for a late stop above.
        self.overlap_steps = self.device.type == "cuda"
        self._in_flight: Launched | None = None  # the overlapped step whose tokens have not landed
        self.overlapped_steps = 0  # steps launched with the one before still in flight
        self._landed_at: float | None = None
        mb = 2**20
        log.info("text model %s: %d layers, %.0fM parameters, %s %s, %d sequences of up to %d tokens, %d LoRA "
                 "slots, %s kernels", self.spec.name, self.spec.num_layers, self.spec.num_parameters() / 1e6,
                 self.device, dtype_name(self.dtype), cfg.max_seqs, self.max_context, cfg.lora_slots,
                 self.kernels.name)
        log.info("text engine memory: weights %d MB (%s), KV cache %d MB (%d tokens in blocks of %d: kv_cache_mb), "
                 "LoRA pool %d MB (lora_slots %d x max_lora_rank %d); lower those settings to use less",
                 self.model.nbytes() // mb, self.model.scheme.label, self.kv.nbytes() // mb, (blocks - 1) * bs, bs,
                 self.storage.pool_nbytes() // mb, cfg.lora_slots, cfg.max_lora_rank)

    @classmethod
    def from_folder(cls, model: str | Path, config: EngineConfig | None = None,
                    cache_dir: Path | None = None) -> TextEngine:
        """`model` is a Hugging Face folder, or "default" for the embedded SmolLM2-135M-Instruct."""
        if str(model) == "default":
            from .default_model import ensure_default_text_model

            model = ensure_default_text_model(cache_dir)
        cfg = config or EngineConfig()
        device = resolve_device(cfg.device)
        folder = Path(model)
        log.info("loading the text model from %s", folder)
        text_model = TextModel.from_folder(folder, device=device,
                                           dtype=resolve_dtype(cfg.dtype, device, half=torch.bfloat16),
                                           quantize=cfg.quantize)
        return cls(text_model, load_tokenizer(folder), cfg, model_dir=folder)

    # ------------------------------------------------------------------ the contract (base.Engine)

    @property
    def max_rows(self) -> int:
        return self.config.max_seqs

    def describe(self) -> EngineInfo:
        return EngineInfo(kind="text", name=self.spec.name, device=str(self.device), dtype=dtype_name(self.dtype),
                          limits={"context_length": self.max_context, "max_seqs": self.max_rows,
                                  "lora_slots": self.config.lora_slots, "max_lora_rank": self.config.max_lora_rank,
                                  "max_adapters_per_request": self.config.max_adapters_per_request},
                          capabilities=frozenset({"mixes", "streaming", "seeds", "stop_strings"}))

    def encode_prompt(self, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None, *,
                      limit: int | None = None, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a raw prompt or of chat messages (the chat template, with `tools` where it
        renders them); PromptTooLong past `limit`."""
        return self.prompts.encode(prompt, messages, limit=limit, tools=tools)

    def prepare_constraint(self, constraint: Constraint) -> Grammar:
        """The compiled grammar a request carries (any thread; cached); ConstraintError if invalid."""
        return self.grammars.compile(constraint)

    def prepare_adapter(self, files: AdapterFiles) -> PreparedAdapter:
        """Validate a PEFT LoRA against this base model (raises ValueError with the reason)."""
        lora = self.prepare_lora(files.config, files.tensors)
        return PreparedAdapter(rank=lora.rank, targets=lora.targets, payload=lora)

    def prepare_lora(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PreparedLora:
        prepared = prepare_peft_lora(config, tensors, self.spec, max_rank=self.config.max_lora_rank)
        unused = [t for t in prepared.targets if t not in self.storage.targets]
        if unused:
            raise ValueError(f"targets {unused} are not enabled on this daemon (lora_targets: "
                             f"{', '.join(self.storage.targets)})")
        return prepared

    def submit(self, request: TextRequest, on_event: EventSink) -> None:
        """Queue a request (any thread). Problems are reported through `on_event`."""
        self._command("submit", (request, on_event))

    def cancel(self, key: Hashable) -> None:
        self._command("cancel", key)

    def publish(self, version: AdapterVersion) -> None:
        """Nothing ahead of time: a version is loaded into a slot by its first request."""

    def retire(self, version: AdapterVersion) -> None:
        """An adapter version was replaced or removed: free its slot once unused."""
        self._command("retire", version.key)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loraloom-text", daemon=True)
            self._thread.start()
            # The first constraint would pay for the tokenizer's conversion (~0.4 s for SmolLM2).
            threading.Thread(target=self.grammars.warm, name="loraloom-grammars", daemon=True).start()

    def stop(self, message: str = "the daemon is shutting down") -> None:
        """Stop the worker; every queued and running request ends with STOPPED. Idempotent."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._in_flight = None  # its tokens are not taken: every sequence ends here
        self._drain_commands()
        for waiting in list(self.scheduler.waiting):
            self._emit(waiting.request, EngineError(waiting.key, EngineErrorCode.STOPPED, message))
        self.scheduler.waiting.clear()
        for seq in list(self.scheduler.running):
            self._end(seq, EngineError(seq.key, EngineErrorCode.STOPPED, message))

    def stats(self) -> dict[str, Any]:
        """Counters for /healthz and benchmarks (read without locking: approximate while running)."""
        pool = self.pool.stats
        return {"running": len(self.scheduler.running), "queued": len(self.scheduler.waiting), "steps": self.steps,
                "failed_steps": self.failed_steps, "preemptions": self.scheduler.preempted,
                "kv_blocks": self.pool.num_blocks - 1, "kv_blocks_in_use": self.pool.in_use,
                "kv_blocks_cached": self.pool.cached, "kv_block_size": self.pool.block_size,
                "prefix_cache_hit_rate": round(pool.hits / pool.lookups, 4) if pool.lookups else None,
                "prefix_cache_hit_tokens": pool.hits, "prefix_cache_evictions": pool.evictions,
                "slot_loads": self.slots.stats.loads, "slot_evictions": self.slots.stats.evictions,
                "resident_adapters": len(self.slots.resident()),
                "grammars_compiled": self.grammars.stats["compiled"],
                "grammar_cache_hits": self.grammars.stats["cache_hits"],
                "constrained_tokens": self.runner.masks.masked_rows if self.runner.masks else 0,
                # pool rows a dense LoRA step reads (resident adapters from the front, holes included), pool size
                "lora_rows_in_use": self.storage.used, "lora_pool_rows": self.storage.pool_rows,
                "lora_pool_compactions": self.storage.compactions, "weights": self.model.scheme.label,
                "weight_bytes": self.model.nbytes(), **self.kernels.stats()}

    # ------------------------------------------------------------------ the loop

    def has_work(self) -> bool:
        return bool(self.scheduler.has_work() or self._commands or self._in_flight is not None)

    def run_until_idle(self) -> None:
        """Step on the calling thread until nothing is left (the engine must not be started)."""
        if self._thread is not None:
            raise RuntimeError("the engine's own thread is running; submit() and wait for the events")
        while self.has_work():
            self.step()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            if not self.step() and self.has_work():  # every running class is over its tokens/s budget
                with self._wake:
                    self._wake.wait(0.002)

    def _prompt_tokens(self) -> int | None:
        """The step's prompt tokens while a GPU budget bounds step time (None: no bound but the
        configured max_step_tokens)."""
        limit = self.budget.step_ms_limit() if self.budget else None
        return None if limit is None else self.step_timer.tokens_for(limit)

    def _command(self, kind: str, arg: Any) -> None:
        with self._wake:
            self._commands.append((kind, arg))
            self._wake.notify()

    def _drain_commands(self) -> None:
        while True:
            with self._wake:
                if not self._commands:
                    return
                kind, arg = self._commands.popleft()
            if kind == "submit":
                request, on_event = arg
                self._events[id(request)] = on_event
                problem = check_request(request, self.config, max_context=self.max_context,
                                        vocab_size=self.spec.vocab_size)
                if problem is not None:
                    self._emit(request, EngineError(request.key, *problem))
                else:
                    self.scheduler.enqueue(request)
            elif kind == "cancel":
                waiting = self.scheduler.cancel(arg)
                if waiting is not None and waiting.serial in self._outputs:  # paused mid-way
                    self._end(waiting, "cancelled")
                elif waiting is not None:
                    req = waiting.request
                    ms = (time.perf_counter() - req.arrival) * 1000
                    self._emit(req, TextDoneEvent(arg, "", "cancelled", len(req.prompt_ids), 0,
                                                  {v.name: v.number for v, _ in req.adapters}, ms, None, ms))
            elif kind == "retire":
                self.slots.retire(arg)

    def step(self) -> bool:
        """One scheduling round and forward pass. Returns False when there was nothing to do."""
        self._drain_commands()
        for seq in self.scheduler.take_cancelled():
            self._end(seq, "cancelled")
        overlap = self._may_overlap()
        if self._in_flight is not None and not overlap:
            self._land_now()  # this step needs its tokens on the host
        held = self.budget.held_classes() if self.budget else frozenset()
        started, plan = self.scheduler.schedule(hold=held, prompt_tokens=self._prompt_tokens())
        for seq in started:
            if seq.request.constraint is not None:
                seq.grammar = seq.request.constraint.start()
            self._outputs[seq.serial] = SequenceOutput(seq, self.tokenizer, self.byte_table, eos_ids=self.eos_ids,
                                                       max_context=self.max_context, defer_grammar=self.defer_grammar)
        if plan is None:
            if self._in_flight is not None:  # its sequences' last tokens are on the way: nothing to plan before
                self._land_now()
                return True
            self._catch_up()
            return False
        chunk_tokens = sum(c.length for c in plan.chunks)
        if self.budget is not None:  # held back by the GPU budget: the step as planned, predicted from recent ones
            wait = self.budget.delay(self.step_timer.predict(chunk_tokens))
            if wait > 0:
                time.sleep(wait)
                self.budget.record(0.0, waited=wait)
        started_at = time.perf_counter()
        if overlap:
            self._run_overlapped(plan)
        else:
            self._run_isolated(plan)
        now = time.perf_counter()
        # A step's time: sampling ends it on the host, so the device's time too. Overlapped, the host
        # sees steps end one after another: the time between two arrivals of tokens.
        seconds = now - (started_at if not overlap or self._landed_at is None else max(started_at, self._landed_at))
        self._landed_at = now
        self.step_timer.observe(seconds * 1000, chunk_tokens)
        if self.budget is not None:
            tokens: dict[str, int] = {}
            for seq in plan.sample:
                tokens[seq.request.priority] = tokens.get(seq.request.priority, 0) + 1
            self.budget.record(seconds, tokens)
        self.steps += 1
        return True

    def _emit(self, req: TextRequest, event: Any) -> None:
        final = not isinstance(event, TextChunkEvent)
        sink = self._events.pop(id(req), None) if final else self._events.get(id(req))
        if sink is None:
            return
        try:
            sink(event)
        except Exception:
            log.exception("an event callback failed for request %r", req.key)
