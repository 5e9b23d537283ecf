"""The remote text engine: the engine contract over a vLLM, SGLang or trtllm-serve server.

    engine = RemoteEngine.from_settings(settings)       # --text-engine remote --remote-url URL
    engine.start()
    engine.submit(TextRequest(...), on_event)           # any thread; events from the request's thread

The daemon keeps what makes it loraloom: prompts are rendered and tokenised here (the local
`text_model` folder gives the tokenizer, the chat template and the shapes adapters are validated
against; its weights are not read), the registry and its versions stay ours (`adapters.py`),
and the remote gets token ids and immutable adapter snapshots. Each request is one streamed
`POST /v1/completions` on a thread of a pool of `max_seqs`; cancelling closes that connection
(the remote aborts the request), stopping closes them all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapters.loader import AdapterFiles
from ...adapters.version import AdapterVersion
from ..base import EngineError, EngineErrorCode, EngineInfo, EventSink, PreparedAdapter
from ..text.config import ModelSpec
from ..text.request import EngineConfig, TextChunkEvent, TextDoneEvent, TextRequest, check_request
from .adapters import RemoteAdapters
from .dialect import COMPLETIONS, Dialect, RemoteFailure, failure_from_status
from .http import HttpStatusError, RemoteHttp, RemoteUnreachable, SseStream
from .sglang import SglangDialect
from .trtllm import TrtllmDialect
from .vllm import VllmDialect

if TYPE_CHECKING:
    from ...settings import Settings

__all__ = ["DIALECTS", "RemoteConfig", "RemoteEngine"]

log = logging.getLogger("loraloom.remote")

DIALECTS: dict[str, type[Dialect]] = {"vllm": VllmDialect, "sglang": SglangDialect, "trtllm": TrtllmDialect}


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    dialect: str = "vllm"
    api_key: str | None = None
    model: str | None = None  # the base model's name on the remote; None: the first /v1/models lists
    adapter_dir: Path | None = None  # where adapters are written for the remote; None: refused
    adapter_path: str | None = None  # that folder as the remote sees it; None: the same path
    mix_cache: int = 8
    timeout_s: float = 60.0
    max_streams: int = 16
    max_context: int = 2048
    max_lora_rank: int = 64
    max_adapters_per_request: int = 4


class _Job:
    def __init__(self, request: TextRequest, on_event: EventSink) -> None:
        self.request, self.on_event = request, on_event
        self.cancelled = self.stopped = False
        self.stream: SseStream | None = None
        self.lock = threading.Lock()

    def abort(self) -> None:
        with self.lock:
            stream = self.stream
        if stream is not None:
            stream.close()


class RemoteEngine:
    """A text engine whose model runs in another server, reached over HTTP."""

    def __init__(self, spec: ModelSpec, tokenizer: Any, config: RemoteConfig) -> None:
        from ..text.tokens import PromptEncoder

        self.spec, self.config = spec, config
        self.prompts = PromptEncoder(tokenizer)
        self.http = RemoteHttp(config.url, api_key=config.api_key, timeout=config.timeout_s)
        self.dialect = DIALECTS[config.dialect]()
        self.base: str | None = config.model
        self.max_context = min(config.max_context, spec.max_position_embeddings)
        self._pool = ThreadPoolExecutor(max_workers=config.max_streams, thread_name_prefix="loraloom-remote")
        self.adapters = RemoteAdapters(self.http, self.dialect, spec, folder=config.adapter_dir,
                                       remote_folder=config.adapter_path, mix_cache=config.mix_cache,
                                       background=self._background)
        self._checks = EngineConfig(max_adapters_per_request=config.max_adapters_per_request,
                                    lora_slots=config.max_adapters_per_request)
        self._jobs: dict[Hashable, _Job] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._discovered = False
        self.counts = {"requests": 0, "failed": 0, "cancelled": 0}

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteEngine:
        """The engine `loraloom serve --text-engine remote` runs (settings.py says what each setting means)."""
        from ..text.tokens import load_tokenizer

        if not settings.remote_url:
            raise ValueError("text_engine remote needs remote_url (the remote server, e.g. http://127.0.0.1:8000)")
        folder = Path(settings.text_model)
        if settings.text_model == "default":
            from ..text.default_model import ensure_default_text_model

            folder = ensure_default_text_model(settings.cache_dir)
        http = RemoteHttp(settings.remote_url, timeout=settings.remote_timeout_s)
        adapter_dir = settings.remote_adapter_dir
        if adapter_dir is None and http.on_loopback:
            from ..text.default_model import default_cache_dir

            adapter_dir = (settings.cache_dir or default_cache_dir()) / "remote-adapters"
        config = RemoteConfig(
            url=settings.remote_url, dialect=settings.remote_dialect, api_key=settings.remote_api_key,
            model=settings.remote_model, adapter_dir=adapter_dir, adapter_path=settings.remote_adapter_path,
            mix_cache=settings.remote_mix_cache, timeout_s=settings.remote_timeout_s, max_streams=settings.max_seqs,
            max_context=settings.max_context, max_lora_rank=settings.max_lora_rank,
            max_adapters_per_request=settings.max_adapters_per_request)
        return cls(ModelSpec.from_folder(folder), load_tokenizer(folder), config)

    # ------------------------------------------------------------------ the contract (base.Engine)

    def describe(self) -> EngineInfo:
        limits = {"context_length": self.max_context, "max_seqs": self.config.max_streams,
                  "max_adapters_per_request": self.config.max_adapters_per_request}
        return EngineInfo(kind="text", name=self.base or self.spec.name, dtype="remote", limits=limits,
                          device=f"{self.dialect.name} at {self.http.url}",
                          capabilities=frozenset({"mixes", "streaming", "seeds", "stop_strings", "remote"}))

    def encode_prompt(self, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None, *,
                      limit: int | None = None, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        return self.prompts.encode(prompt, messages, limit=limit, tools=tools)

    def prepare_constraint(self, constraint: Any) -> Any:
        raise ValueError("the remote text engine does not take constraints (json_schema, regex, choices, "
                         "grammar, tools) yet; the built-in engine does")

    def prepare_adapter(self, files: AdapterFiles) -> PreparedAdapter:
        """Validate a PEFT LoRA against the base model's shapes, and check the remote can be given it."""
        from ..text.peft_format import prepare_peft_lora

        if self.adapters.problem is not None:
            raise ValueError(self.adapters.problem)
        lora = prepare_peft_lora(files.config, files.tensors, self.spec, max_rank=self.config.max_lora_rank)
        return PreparedAdapter(rank=lora.rank, targets=lora.targets, payload=lora)

    def start(self) -> None:
        """Ask the remote for its base model and context length (a remote not up yet is asked again later)."""
        try:
            self._discover()
            log.info("remote text engine: %s at %s serves %s (context %d tokens)", self.dialect.name, self.http.url,
                     self.base, self.max_context)
        except (RemoteFailure, RemoteUnreachable, HttpStatusError) as exc:
            log.warning("the remote text engine at %s is not answering yet: %s", self.http.url, exc)

    def _discover(self) -> str:
        if not self._discovered:
            try:
                name, length = self.dialect.base_model(self.http)
            except HttpStatusError as exc:
                raise failure_from_status(exc, "asking the remote for its models (/v1/models)") from None
            self.base = self.config.model or name
            if length:
                self.max_context = min(self.config.max_context, self.spec.max_position_embeddings, length)
            self._discovered = True
        assert self.base is not None
        return self.base

    def submit(self, request: TextRequest, on_event: EventSink) -> None:
        job = _Job(request, on_event)
        problem = check_request(request, self._checks, max_context=self.max_context, vocab_size=self.spec.vocab_size)
        if problem is None and self.dialect.refusal(request.sampling):
            problem = (EngineErrorCode.INVALID, str(self.dialect.refusal(request.sampling)))
        if problem is None and self._stopping:
            problem = (EngineErrorCode.STOPPED, "the daemon is shutting down")
        if problem is None:
            with self._lock:
                if request.key in self._jobs:
                    problem = (EngineErrorCode.DUPLICATE, "a request with this key is already in flight")
                else:
                    self._jobs[request.key] = job
        if problem is not None:
            self._emit(job, EngineError(request.key, *problem))
            return
        try:
            self._pool.submit(self._run, job)
        except RuntimeError:  # stopped meanwhile
            self._forget(job)
            self._emit(job, EngineError(request.key, EngineErrorCode.STOPPED, "the daemon is shutting down"))

    def cancel(self, key: Hashable) -> None:
        with self._lock:
            job = self._jobs.get(key)
        if job is not None:
            job.cancelled = True
            job.abort()

    def publish(self, version: AdapterVersion) -> None:
        """Register a new version with the remote now, off the caller's thread, so its first request
        does not pay for it (a request arriving meanwhile waits for the same registration)."""
        if version.kind != "text" or self.adapters.problem is not None or self._stopping:
            return
        try:
            self._pool.submit(self._register, version)
        except RuntimeError:  # stopped meanwhile
            pass

    def _register(self, version: AdapterVersion) -> None:
        try:
            entry = self.adapters.acquire([(version, 1.0)])
        except Exception as exc:  # logged, never raised: its first request registers it again
            log.warning("registering %s ahead of its first request failed (its first request tries again): %s",
                        version.key, getattr(exc, "message", exc))
            return
        self.adapters.release(entry)

    def retire(self, version: AdapterVersion) -> None:
        self.adapters.retire(version)

    def stop(self, message: str = "the daemon is shutting down") -> None:
        """End every request with STOPPED and unload our adapters from the remote. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stopped = True
            job.abort()
        self._pool.shutdown(wait=True)
        self.adapters.close()

    def stats(self) -> dict[str, Any]:
        return {"remote": self.http.url, "dialect": self.dialect.name, "base": self.base, "running": len(self._jobs),
                **self.counts, "adapters": self.adapters.stats()}

    # ------------------------------------------------------------------ one request, on a pool thread

    def _background(self, fn: Any) -> None:
        try:
            self._pool.submit(fn)
        except RuntimeError:
            fn()

    def _run(self, job: _Job) -> None:
        req = job.request
        started = time.perf_counter()
        text, tokens = "", 0
        ids: list[int] = []
        first: float | None = None
        usage: dict[str, Any] | None = None
        reason: str | None = None
        entry = None
        self.counts["requests"] += 1
        try:
            if job.cancelled or job.stopped or self._stopping:
                raise _Ended
            base = self._discover()
            entry = self.adapters.acquire(req.adapters)
            room = self.max_context - len(req.prompt_ids)
            body = self.dialect.completion_body(base, entry.adapter if entry else None, req,
                                                min(req.sampling.max_tokens, room))
            stream = self._open(body, entry)
            with job.lock:
                job.stream = stream
            if job.cancelled or job.stopped:
                stream.close()
            for event in stream.events():
                piece = self.dialect.read_chunk(event)
                usage = piece.usage or usage
                reason = piece.finish_reason or reason
                if piece.text or piece.tokens:
                    text += piece.text
                    tokens += piece.tokens
                    ids.extend(piece.token_ids)
                    if first is None:
                        first = time.perf_counter()
                    if req.stream and piece.text:
                        self._emit(job, TextChunkEvent(req.key, piece.text, tokens))
            if not (job.cancelled or job.stopped) and reason not in ("stop", "length"):
                raise RemoteFailure(EngineErrorCode.FAILED, f"the remote ended the request without finishing it "
                                                            f"(finish reason {reason!r})")
        except _Ended:
            pass
        except RemoteFailure as exc:
            if not (job.cancelled or job.stopped):
                self._fail(job, entry, exc.code, exc.message)
                return
        except RemoteUnreachable as exc:
            if not (job.cancelled or job.stopped):
                self._fail(job, entry, EngineErrorCode.UNAVAILABLE, str(exc))
                return
        except (HttpStatusError, ValueError) as exc:
            if not (job.cancelled or job.stopped):
                self._fail(job, entry, EngineErrorCode.FAILED, f"the remote engine failed: {exc}")
                return
        except Exception as exc:  # a bug here must end this request, not hang it
            log.exception("remote request %r failed", req.key)
            self._fail(job, entry, EngineErrorCode.FAILED, f"internal error: {exc}")
            return
        self.adapters.release(entry)
        self._forget(job)
        if job.stopped or (self._stopping and not job.cancelled and reason is None):
            self._emit(job, EngineError(req.key, EngineErrorCode.STOPPED, "the daemon is shutting down"))
            return
        if job.cancelled:
            self.counts["cancelled"] += 1
            reason = "cancelled"
        now = time.perf_counter()
        completion = int((usage or {}).get("completion_tokens") or tokens) if reason != "cancelled" else tokens
        self._emit(job, TextDoneEvent(
            key=req.key, text=text, finish_reason=reason or "cancelled", prompt_tokens=len(req.prompt_ids),
            completion_tokens=completion, adapter_versions={v.name: v.number for v, _ in req.adapters},
            queued_ms=(started - req.arrival) * 1000, total_ms=(now - req.arrival) * 1000,
            first_token_ms=None if first is None else (first - req.arrival) * 1000, token_ids=tuple(ids),
            cached_tokens=self.dialect.cached_tokens(usage)))

    def _open(self, body: dict[str, Any], entry: Any) -> SseStream:
        """Start the completion; if the remote forgot our adapter (it restarted), register it again once."""
        for attempt in (0, 1):
            try:
                return self.http.stream(COMPLETIONS, body)
            except HttpStatusError as exc:
                if entry is not None and attempt == 0 and self.dialect.unknown_model(exc):
                    log.info("the remote does not know %s (did it restart?); registering it again", entry.adapter.name)
                    self.adapters.ensure_loaded(entry, again=True)
                    continue
                raise failure_from_status(exc, "the remote refused the request") from None
        raise AssertionError("unreachable")

    def _fail(self, job: _Job, entry: Any, code: EngineErrorCode, message: str) -> None:
        self.counts["failed"] += 1
        self.adapters.release(entry)
        self._forget(job)
        self._emit(job, EngineError(job.request.key, code, message))

    def _forget(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.get(job.request.key) is job:
                del self._jobs[job.request.key]

    def _emit(self, job: _Job, event: Any) -> None:
        try:
            job.on_event(event)
        except Exception:
            log.exception("an event callback failed for request %r", job.request.key)


class _Ended(Exception):
    """The request ended before it reached the remote (cancelled or stopping)."""
