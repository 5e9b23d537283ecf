"""The daemon's application core: engines, adapter registry and request intake, without sockets.

The server hands the service each request a session started, with a `post` function that carries
work back to the event loop (`post(make_message)`: the loop calls `make_message()` and delivers
the wire message it returns to the request's connection). So the loop never waits here:

- `submit` checks what is free to check, then passes the request to an intake thread, which
  resolves adapter names (reading a cold adapter's files again), renders and tokenises the
  prompt, and submits it to the engine;
- engine events come back on the engine's thread and are posted to the loop as they are, to be
  turned into wire messages there (`replies`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bridge import messages as m
from bridge.errors import ErrorCode, LoraloomError

from . import __version__
from .adapters.loader import AdapterFiles
from .adapters.registry import AdapterChange, AdapterRegistry
from .adapters.version import AdapterKind, AdapterVersion
from .adapters.watcher import AdapterWatcher
from .budget import BudgetSpec, FrameSync, GpuBudget
from .conversation import DoesNotFit, fit_messages
from .engines.base import Engine, TextEngineLike
from .memory import MemoryPlan, plan_for_settings
from .replies import ImageReplies, TextReplies, cancelled_before_start, error_message
from .session import RequestKey
from .settings import Settings
from .structured import OutputPlan, plan_output

__all__ = ["Post", "Service"]

log = logging.getLogger("loraloom")

Post = Callable[[Callable[[], BaseModel | None]], None]


@dataclass
class _Intake:
    """A request on its way to an engine: it can still be cancelled without the engine."""

    cancelled: bool = False


class Service:
    def __init__(self, settings: Settings, *, text_engine: TextEngineLike | None = None,
                 image_engine: Engine[Any] | None = None, image_off: str | None = None) -> None:
        self.settings = settings
        self.text = text_engine
        self.image = image_engine
        # Why images are off, for the error a client gets when it asks for one anyway.
        self.image_off = image_off or ("this daemon was started with --image-model none; start it with "
                                       "--image-model default (a placeholder that draws noise) or a diffusers folder")
        self.started = time.time()
        self.shutting_down = False
        self.on_adapter_event: Callable[[m.AdapterEvent], None] | None = None  # the server broadcasts these
        self.registry = AdapterRegistry(
            folders={"text": list(settings.text_adapters), "image": list(settings.image_adapters)},
            validators={"text": self._validator("text"), "image": self._validator("image")},
            on_change=self._adapter_changed, on_retire=self._retire, on_live=self._publish,
            capacity=settings.adapter_capacity, pinned=settings.pinned_adapters)
        self.watcher: AdapterWatcher | None = None
        # One GPU budget for both engines: they share the GPU with the game and with each other.
        self.budget = GpuBudget(budget_from_settings(settings))
        for engine in (self.text, self.image):
            if engine is not None and hasattr(engine, "budget"):
                engine.budget = self.budget
        self._intake = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loraloom-intake")
        self._pending: dict[RequestKey, _Intake] = {}
        self._lock = threading.Lock()
        self._limits: m.Limits | None = None
        self._infos: tuple[m.ModelInfo | None, m.ModelInfo | None] | None = None
        self.memory: MemoryPlan | None = None  # what the engines take on their device (from_settings plans it)

    # ---------------------------------------------------------------- life cycle

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        """Load the models the settings name (this takes a while for real models)."""
        if settings.pack is not None:  # a game pack: its model, adapters and settings, checked first
            from .pack import open_pack

            settings = open_pack(settings)
        text_folder = _local_text_model(settings)
        memory = plan_for_settings(settings, text_folder)  # OverBudget before anything is allocated
        text: TextEngineLike | None = None
        image: Engine[Any] | None = None
        image_off = None
        if settings.text_model != "none" and settings.text_engine == "remote":
            from .engines.remote import RemoteEngine

            text = RemoteEngine.from_settings(settings)
        elif settings.text_model != "none":
            from .engines.text.engine import TextEngine
            from .engines.text.request import EngineConfig

            fitted = memory.text
            assert fitted is not None and text_folder is not None
            cfg = EngineConfig(
                device=settings.device, dtype=settings.dtype, max_seqs=settings.max_seqs,
                max_context=settings.max_context, kv_cache_mb=fitted.kv_cache_mb, lora_slots=fitted.lora_slots,
                max_lora_rank=settings.max_lora_rank, max_adapters_per_request=settings.max_adapters_per_request,
                prefill_chunk=settings.prefill_chunk, pinned_adapters=tuple(settings.pinned_adapters),
                kernels=settings.kernels, max_step_tokens=settings.step_tokens, prefix_cache=settings.prefix_cache,
                priorities=settings.priorities, deterministic=settings.deterministic, quantize=settings.quantize)
            text = TextEngine.from_folder(text_folder, cfg, cache_dir=settings.cache_dir)
        if settings.image_model != "none":
            if settings.image_model == "default" and importlib.util.find_spec("diffusers") is None:
                # The placeholder is a convenience, not a reason to refuse to serve text.
                image_off = ("the image extra is not installed in the daemon's environment: "
                             "pip install -e '.[image]' (diffusers), then restart the daemon")
                log.warning("image generation is off: diffusers is not installed "
                            "(pip install -e '.[image]', or pass --image-model none to silence this)")
            else:
                image = _load_image_engine(settings)
        service = cls(settings, text_engine=text, image_engine=image, image_off=image_off)
        service.memory = memory
        return service

    def start(self) -> None:
        self.registry.scan()
        for engine in (self.text, self.image):
            if engine is not None:
                engine.start()
        if self.settings.watch:
            self.watcher = AdapterWatcher(self.registry, debounce_s=self.settings.reload_debounce_ms / 1000)
            self.watcher.start()

    def stop(self) -> None:
        """End every request with `shutting_down` and stop the engines. Idempotent."""
        self.shutting_down = True
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self._intake.shutdown(wait=True)  # requests on their way see `shutting_down` and answer so
        for engine in (self.text, self.image):
            if engine is not None:
                engine.stop()

    # ---------------------------------------------------------------- what sessions read

    def model_infos(self) -> tuple[m.ModelInfo | None, m.ModelInfo | None]:
        if self._infos is None:
            infos = []
            for engine in (self.text, self.image):
                d = engine.describe() if engine is not None else None
                name = d.name if d is not None else ""
                if engine is self.text and self.settings.pack is not None and d is not None:
                    from .pack import packed_model_name  # the pack's folder is model/: say which model it is

                    name = packed_model_name(self.settings.pack, self.settings.text_model, d.name)
                infos.append(None if d is None else m.ModelInfo(
                    name=name, kind=d.kind, device=d.device, dtype=d.dtype, placeholder=d.placeholder,
                    context_length=d.limits.get("context_length")))
            self._infos = (infos[0], infos[1])
        return self._infos

    def limits(self) -> m.Limits:
        if self._limits is None:
            s = self.settings
            context = self.text.describe().limits["context_length"] if self.text is not None else s.max_context
            image = self.image.describe().limits if self.image is not None else {}
            self._limits = m.Limits(
                max_frame_bytes=s.max_frame_bytes, max_inflight_per_connection=s.max_inflight_per_connection,
                max_prompt_tokens=min(s.max_prompt_tokens or context - 1, context - 1),
                max_new_tokens=s.max_new_tokens, max_adapters_per_request=s.max_adapters_per_request,
                max_image_pixels=image.get("max_pixels"), max_image_steps=image.get("max_steps"),
                max_image_count=image.get("max_count"),
                lora_slots=self.memory.text.lora_slots if self.memory and self.memory.text else None,
                kv_cache_tokens=self.memory.text.kv_cache_tokens if self.memory and self.memory.text else None)
        return self._limits

    def welcome(self) -> m.Welcome:
        text, image = self.model_infos()
        return m.Welcome(protocol=m.PROTOCOL_VERSION, server=__version__, text_model=text, image_model=image,
                         adapters=self.registry.list(), limits=self.limits(), memory=self.memory_info())

    def memory_report(self) -> dict[str, Any] | None:
        """What the engines take on their device (daemon/memory.py), for /healthz; None without a plan."""
        if self.memory is None:
            return None
        stats = self.text.stats() if self.memory.text is not None and self.text is not None else None
        return self.memory.describe(stats)

    def memory_info(self) -> m.Memory | None:
        report = self.memory_report()
        return None if report is None else m.Memory(**{k: v for k, v in report.items() if k in m.Memory.model_fields})

    def adapter_list(self) -> list[m.AdapterInfo]:
        return self.registry.list()

    def health(self, **server: Any) -> dict[str, Any]:
        text, image = self.model_infos()
        with self._lock:
            intake = len(self._pending)
        return {"status": "ok", "version": __version__, "protocol": m.PROTOCOL_VERSION,
                "uptime_s": round(time.time() - self.started, 3), "pid": os.getpid(), **server,
                "text_model": text.model_dump() if text else None,
                "image_model": image.model_dump() if image else None,
                "adapters": len(self.registry.list()), "requests_in_intake": intake,
                "text_engine": self.text.stats() if self.text is not None else None,
                "image_engine": self.image.stats() if self.image is not None else None,
                "gpu_budget": self.budget.describe(),
                "memory": self.memory_report(),
                "host_cache": {"capacity": self.registry.capacity, "warm": self.registry.warm_count(),
                               **self.registry.stats}}

    # ---------------------------------------------------------------- adapters

    def _validator(self, kind: AdapterKind) -> Callable[[AdapterFiles], tuple[Any, int, tuple[str, ...]]]:
        def validate(files: AdapterFiles) -> tuple[Any, int, tuple[str, ...]]:
            engine = self.text if kind == "text" else self.image
            if engine is None:
                raise ValueError(f"no {kind} model is loaded")
            prepared = engine.prepare_adapter(files)
            return prepared.payload, prepared.rank, prepared.targets

        return validate

    def _publish(self, version: AdapterVersion) -> None:
        engine = self.text if version.kind == "text" else self.image
        if engine is not None:
            engine.publish(version)

    def set_budget(self, conn: int, msg: m.SetBudget | None) -> m.Budget | None:
        """A client sets the GPU budget (until it sets another or disconnects), or its budget ends
        (None: the settings' budget returns). The answer says what is in force."""
        if msg is None:
            if self.budget.release(conn):
                log.info("connection %d closed: the GPU budget is the settings' again", conn)
            return None
        rates = msg.tokens_per_s.model_dump(exclude_none=True) if msg.tokens_per_s else {}
        sync = msg.frame_sync
        spec = BudgetSpec(duty_cap=msg.duty_cap, tokens_per_s=rates, max_step_ms=msg.max_step_ms,
                          frame_sync=None if sync is None else FrameSync(sync.period_ms, sync.game_ms, sync.margin_ms,
                                                                         sync.overlap_ms))
        self.budget.set(spec, owner=conn if spec.active else None)
        log.info("connection %d set the GPU budget: %s", conn, self.budget.describe())
        return m.Budget(id=msg.id, duty_cap=spec.duty_cap, tokens_per_s=msg.tokens_per_s, frame_sync=sync,
                        max_step_ms=spec.max_step_ms, set_by_client=spec.active)

    def _retire(self, version: AdapterVersion) -> None:
        engine = self.text if version.kind == "text" else self.image
        if engine is not None:
            engine.retire(version)

    def _adapter_changed(self, change: AdapterChange) -> None:
        event = m.AdapterEvent(event=change.event, adapter=change.info,  # type: ignore[arg-type]
                               previous_version=change.previous_version, reason=change.reason)
        if self.on_adapter_event is not None:
            self.on_adapter_event(event)

    def resolve(self, refs: list[m.AdapterRef], kind: AdapterKind) -> list[tuple[AdapterVersion, float]]:
        if len(refs) > self.settings.max_adapters_per_request:
            raise LoraloomError(f"{len(refs)} adapters in one request; the maximum is "
                                f"{self.settings.max_adapters_per_request}", code=ErrorCode.INVALID_PARAMETER)
        return [(self.registry.get(r.name, kind), r.scale) for r in refs]

    # ---------------------------------------------------------------- requests

    def submit(self, key: RequestKey, msg: m.Generate | m.GenerateImage, post: Post) -> None:
        """Start a request. Never blocks and never raises: every answer, errors included, is posted."""
        text = isinstance(msg, m.Generate)
        problem = self._refusal(msg)
        if problem is not None:
            post(lambda: error_message(key.id, *problem))
            return
        with self._lock:
            self._pending[key] = _Intake()
        prepare = self._prepare_text if text else self._prepare_image
        try:
            self._intake.submit(self._run_intake, key, msg, post, prepare)
        except RuntimeError:  # the intake was shut down meanwhile
            self._pending.pop(key, None)
            post(lambda: error_message(key.id, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"))

    def _refusal(self, msg: m.Generate | m.GenerateImage) -> tuple[ErrorCode, str] | None:
        """What is wrong with a request before any work, or None."""
        if self.shutting_down:
            return ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"
        if isinstance(msg, m.Generate):
            if self.text is None:
                return ErrorCode.MODEL_UNAVAILABLE, "no text model is loaded (started with --text-model none)"
            if msg.max_tokens > self.settings.max_new_tokens:
                return (ErrorCode.INVALID_PARAMETER, f"max_tokens {msg.max_tokens} is above this daemon's limit of "
                        f"{self.settings.max_new_tokens}")
        elif self.image is None:
            return ErrorCode.MODEL_UNAVAILABLE, f"no image model is loaded: {self.image_off}"
        if len(msg.adapters) > self.settings.max_adapters_per_request:
            return (ErrorCode.INVALID_PARAMETER, f"{len(msg.adapters)} adapters in one request; the maximum is "
                    f"{self.settings.max_adapters_per_request}")
        return None

    def cancel(self, key: RequestKey, kind: str) -> None:
        with self._lock:
            intake = self._pending.get(key)
            if intake is not None:  # not at the engine yet: the intake answers `cancelled`
                intake.cancelled = True
                return
        engine = self.text if kind == "text" else self.image
        if engine is not None:
            engine.cancel(key)

    def _run_intake(self, key: RequestKey, msg: Any, post: Post, prepare: Callable[..., Any]) -> None:
        """On an intake thread: build the engine request, then hand it over (or answer why not)."""
        try:
            request, replies, engine = prepare(key, msg)
        except LoraloomError as exc:
            code, text = exc.code, exc.message
            self._drop(key)
            post(lambda: error_message(key.id, code, text))
            return
        except Exception as exc:
            log.exception("preparing request %s failed", key.id)
            text = f"internal error: {exc}"
            self._drop(key)
            post(lambda: error_message(key.id, ErrorCode.INTERNAL, text))
            return
        with self._lock:  # a cancel arriving now either finds the request here or at the engine
            intake = self._pending.pop(key, None)
            if intake is None or intake.cancelled or self.shutting_down:
                stopping = self.shutting_down
                post(lambda: error_message(key.id, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
                     if stopping else cancelled_before_start(key.id, msg))
                return
            engine.submit(request, lambda event: post(lambda: replies(event)))

    def _drop(self, key: RequestKey) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _prepare_text(self, key: RequestKey, msg: m.Generate) -> tuple[Any, TextReplies, Any]:
        from .engines.text.request import SamplingParams, TextRequest
        from .engines.text.tokens import PromptTooLong

        adapters = self.resolve(msg.adapters, "text")
        messages = [c.model_dump() for c in msg.messages] if msg.messages is not None else None
        limit = self.limits().max_prompt_tokens
        text = self.text
        assert text is not None
        dropped = 0
        try:
            def planned(ms: list[dict[str, str]] | None) -> OutputPlan:
                return plan_output(msg, ms, renders_tools=text.prompts.renders_tools, tags=text.prompts.tool_call_tags)

            if messages is not None and msg.trim_history:
                # Room for the reply too (up to half the prompt budget), or the answer would be cut short;
                # counted as sent, with the tools' definitions.
                budget = limit - min(msg.max_tokens, limit // 2)

                def measure(ms: list[dict[str, str]]) -> int:
                    plan = planned(ms)
                    return len(text.encode_prompt(None, plan.messages, tools=plan.tools or None))

                try:
                    messages, dropped = fit_messages(messages, measure, budget)
                except DoesNotFit:  # not even the persona and the last line leave that room: less for the reply
                    messages, dropped = fit_messages(messages, measure, limit)
            output = planned(messages)
            ids = text.encode_prompt(msg.prompt, output.messages, limit=limit, tools=output.tools or None)
        except (PromptTooLong, DoesNotFit) as exc:
            raise LoraloomError(str(exc), code=ErrorCode.PROMPT_TOO_LONG) from None
        except Exception as exc:  # e.g. a chat template that rejects the roles given
            raise LoraloomError(f"cannot build the prompt: {exc}", code=ErrorCode.INVALID_PARAMETER) from None
        grammar = None
        if output.constraint is not None:
            try:
                grammar = text.prepare_constraint(output.constraint)
            except ValueError as exc:
                raise LoraloomError(str(exc), code=ErrorCode.INVALID_PARAMETER) from None
        seed = msg.seed if msg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p,
                                repetition_penalty=msg.repetition_penalty, seed=seed,
                                max_tokens=msg.max_tokens, stop=tuple(msg.stop))
        request = TextRequest(key=key, prompt_ids=ids, sampling=params, adapters=adapters, stream=msg.stream,
                              priority=msg.priority, constraint=grammar)
        return request, TextReplies(key.id, dropped_messages=dropped, output=output), text

    def _prepare_image(self, key: RequestKey, msg: m.GenerateImage) -> tuple[Any, ImageReplies, Any]:
        from .engines.image.request import ImageRequest

        adapters = self.resolve(msg.adapters, "image")
        request = ImageRequest(key=key, prompt=msg.prompt, negative_prompt=msg.negative_prompt, width=msg.width,
                               height=msg.height, steps=msg.steps, guidance=msg.guidance, seed=msg.seed,
                               count=msg.count, adapters=adapters)
        return request, ImageReplies(key.id), self.image


def _load_image_engine(settings: Settings) -> Engine[Any]:
    from .engines.image.engine import ImageEngine
    from .engines.image.request import ImageConfig
    from .engines.text.default_model import default_cache_dir

    model: str | Path = settings.image_model
    return ImageEngine.from_folder(model, ImageConfig(device=settings.device, dtype=settings.dtype,
                                                      max_batch=settings.image_max_batch),
                                   cache_dir=settings.cache_dir or default_cache_dir())


def _local_text_model(settings: Settings) -> Path | None:
    """The folder of the text model this process runs (`default` converted first), None for none or remote."""
    if settings.text_model == "none" or settings.text_engine != "builtin":
        return None
    if settings.text_model == "default":
        from .engines.text.default_model import ensure_default_text_model

        return ensure_default_text_model(settings.cache_dir)
    return Path(settings.text_model)


def budget_from_settings(settings: Settings) -> BudgetSpec:
    rates = {c: r for c, r in (("player", settings.tokens_per_s_player), ("normal", settings.tokens_per_s_normal),
                               ("background", settings.tokens_per_s_background)) if r is not None}
    return BudgetSpec(duty_cap=settings.gpu_duty_cap, tokens_per_s=rates, max_step_ms=settings.max_step_ms)
