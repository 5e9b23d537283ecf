"""The daemon's application core: engines, adapter registry and subscribers, without any sockets.

Sessions (one per connection) call into the service; the service turns protocol requests into
engine requests and engine events back into protocol messages, delivered through the session's
`send` callback (which the server makes thread-safe).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge import messages as m
from bridge.errors import ErrorCode, LoraloomError

from . import __version__
from .adapters.loader import AdapterFiles
from .adapters.registry import AdapterChange, AdapterRegistry
from .adapters.version import AdapterKind, AdapterVersion
from .adapters.watcher import AdapterWatcher
from .settings import Settings

__all__ = ["RequestKey", "Service"]

log = logging.getLogger("loraloom")

Send = Callable[[Any], None]


@dataclass(frozen=True)
class RequestKey:
    """Engines see requests under (connection, client id): ids are only unique per connection."""

    conn: int
    id: str


class Service:
    def __init__(self, settings: Settings, *, text_engine: Any | None = None, image_engine: Any | None = None,
                 image_off: str | None = None) -> None:
        self.settings = settings
        self.text = text_engine
        self.image = image_engine
        # Why images are off, for the error a client gets when it asks for one anyway.
        self.image_off = image_off or ("this daemon was started with --image-model none; start it with "
                                       "--image-model default (a placeholder that draws noise) or a diffusers folder")
        self.started = time.time()
        self._subscribers: dict[int, Send] = {}
        self._lock = threading.Lock()
        self._senders: dict[RequestKey, Callable[[Any], None]] = {}
        validators: dict[AdapterKind, Any] = {"text": self._validate_text, "image": self._validate_image}
        self.registry = AdapterRegistry(
            folders={"text": list(settings.text_adapters), "image": list(settings.image_adapters)},
            validators=validators, on_change=self._broadcast, on_retire=self._retire,
            capacity=settings.adapter_capacity, pinned=settings.pinned_adapters)
        self.watcher: AdapterWatcher | None = None
        self.shutting_down = False

    # ---------------------------------------------------------------- life cycle

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        """Load the models the settings name (this takes a while for real models)."""
        text = image = None
        image_off = None
        cache = settings.cache_dir
        if settings.text_model != "none":
            from .engines.text.engine import EngineConfig, TextEngine

            cfg = EngineConfig(
                device=settings.device, dtype=settings.dtype, max_seqs=settings.max_seqs,
                max_context=settings.max_context, kv_cache_mb=settings.kv_cache_mb, lora_slots=settings.lora_slots,
                max_lora_rank=settings.max_lora_rank, max_adapters_per_request=settings.max_adapters_per_request,
                prefill_chunk=settings.prefill_chunk, pinned_adapters=tuple(settings.pinned_adapters),
                kernels=settings.kernels)
            text = TextEngine.from_folder(settings.text_model, cfg, cache_dir=cache)
        if settings.image_model != "none":
            if settings.image_model == "default" and importlib.util.find_spec("diffusers") is None:
                # The placeholder is a convenience, not a reason to refuse to serve text.
                image_off = ("the image extra is not installed in the daemon's environment: "
                             "pip install -e '.[image]' (diffusers), then restart the daemon")
                log.warning("image generation is off: diffusers is not installed "
                            "(pip install -e '.[image]', or pass --image-model none to silence this)")
            else:
                image = _load_image_engine(settings)
        return cls(settings, text_engine=text, image_engine=image, image_off=image_off)

    def start(self) -> None:
        self.registry.scan()
        if self.text is not None:
            self.text.start()
        if self.image is not None:
            self.image.start()
        if self.settings.watch:
            self.watcher = AdapterWatcher(self.registry, debounce_s=self.settings.reload_debounce_ms / 1000)
            self.watcher.start()

    def stop(self) -> None:
        """End every request with `shutting_down` and stop the engines. Idempotent."""
        self.shutting_down = True
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.text is not None:
            self.text.stop()
        if self.image is not None:
            self.image.stop()

    # ---------------------------------------------------------------- info

    def model_infos(self) -> tuple[m.ModelInfo | None, m.ModelInfo | None]:
        text = image = None
        if self.text is not None:
            text = m.ModelInfo(name=self.text.spec.name, kind="text", device=str(self.text.device),
                               dtype=str(self.text.dtype).removeprefix("torch."),
                               context_length=self.text.max_context)
        if self.image is not None:
            info = self.image.info
            image = m.ModelInfo(name=str(info["name"]), kind="image", device=str(info["device"]),
                                dtype=str(info["dtype"]), placeholder=bool(info.get("placeholder", False)))
        return text, image

    def limits(self) -> m.Limits:
        s = self.settings
        context = self.text.max_context if self.text is not None else s.max_context
        return m.Limits(max_frame_bytes=s.max_frame_bytes, max_inflight_per_connection=s.max_inflight_per_connection,
                        max_prompt_tokens=min(s.max_prompt_tokens or context - 1, context - 1),
                        max_new_tokens=s.max_new_tokens, max_adapters_per_request=s.max_adapters_per_request)

    def welcome(self) -> m.Welcome:
        text, image = self.model_infos()
        return m.Welcome(protocol=m.PROTOCOL_VERSION, server=__version__, text_model=text, image_model=image,
                         adapters=self.registry.list(), limits=self.limits())

    def health(self) -> dict[str, Any]:
        text, image = self.model_infos()
        return {"status": "ok", "version": __version__, "protocol": m.PROTOCOL_VERSION,
                "uptime_s": round(time.time() - self.started, 3), "pid": os.getpid(),
                "text_model": text.model_dump() if text else None,
                "image_model": image.model_dump() if image else None,
                "adapters": len(self.registry.list()),
                "text_engine": self.text.stats() if self.text is not None else None,
                "host_cache": {"capacity": self.registry.capacity, "warm": self.registry.warm_count(),
                               **self.registry.stats}}

    # ---------------------------------------------------------------- adapters

    def _validate_text(self, files: AdapterFiles) -> tuple[Any, int, tuple[str, ...]]:
        if self.text is None:
            raise ValueError("no text model is loaded")
        prepared = self.text.prepare_adapter(files.config, files.tensors)
        return prepared, prepared.rank, prepared.targets

    def _validate_image(self, files: AdapterFiles) -> tuple[Any, int, tuple[str, ...]]:
        if self.image is None:
            raise ValueError("no image model is loaded")
        rank, targets = self.image.validate_adapter(files.tensors, {n: b"" for n in files.files})
        return None, rank, tuple(targets)

    def _retire(self, version: AdapterVersion) -> None:
        if version.kind == "text" and self.text is not None:
            self.text.retire(version.key)

    def subscribe(self, conn: int, send: Send) -> None:
        with self._lock:
            self._subscribers[conn] = send

    def unsubscribe(self, conn: int) -> None:
        with self._lock:
            self._subscribers.pop(conn, None)

    def _broadcast(self, change: AdapterChange) -> None:
        event = m.AdapterEvent(event=change.event, adapter=change.info,  # type: ignore[arg-type]
                               previous_version=change.previous_version, reason=change.reason)
        with self._lock:
            targets = list(self._subscribers.values())
        for send in targets:
            send(event)

    def resolve(self, refs: list[m.AdapterRef], kind: AdapterKind) -> list[tuple[AdapterVersion, float]]:
        if len(refs) > self.settings.max_adapters_per_request:
            raise LoraloomError(f"{len(refs)} adapters in one request; the maximum is "
                                f"{self.settings.max_adapters_per_request}", code=ErrorCode.INVALID_PARAMETER)
        return [(self.registry.get(r.name, kind), r.scale) for r in refs]

    # ---------------------------------------------------------------- text

    def submit_text(self, key: RequestKey, msg: m.Generate, send: Send, on_end: Callable[[], None]) -> None:
        """Start a generation; raises LoraloomError for problems known before it starts."""
        from .engines.text.engine import TextChunkEvent, TextDoneEvent, TextRequest
        from .engines.text.sampler import SamplingParams

        if self.shutting_down:
            raise LoraloomError("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN)
        if self.text is None:
            raise LoraloomError("no text model is loaded (started with --text-model none)",
                                code=ErrorCode.MODEL_UNAVAILABLE)
        if msg.max_tokens > self.settings.max_new_tokens:
            raise LoraloomError(f"max_tokens {msg.max_tokens} is above this daemon's limit of "
                                f"{self.settings.max_new_tokens}", code=ErrorCode.INVALID_PARAMETER)
        adapters = self.resolve(msg.adapters, "text")
        messages = [c.model_dump() for c in msg.messages] if msg.messages is not None else None
        try:
            ids = self.text.encode_prompt(msg.prompt, messages)
        except Exception as exc:  # e.g. a chat template that rejects the roles given
            raise LoraloomError(f"cannot build the prompt: {exc}", code=ErrorCode.INVALID_PARAMETER) from None
        limit = self.limits().max_prompt_tokens
        if len(ids) > limit:
            raise LoraloomError(f"the prompt has {len(ids)} tokens; the limit is {limit}",
                                code=ErrorCode.PROMPT_TOO_LONG)
        seed = msg.seed if msg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p,
                                repetition_penalty=msg.repetition_penalty, seed=seed,
                                max_tokens=msg.max_tokens, stop=tuple(msg.stop))
        index = [0]

        def on_event(event: Any) -> None:
            if isinstance(event, TextChunkEvent):
                send(m.Chunk(id=key.id, text=event.text, index=index[0], tokens=event.tokens))
                index[0] += 1
                return
            on_end()
            if isinstance(event, TextDoneEvent):
                total_s = event.total_ms / 1000
                first = event.first_token_ms
                rate = None
                if event.completion_tokens > 1 and first is not None and event.total_ms > first:
                    rate = (event.completion_tokens - 1) / ((event.total_ms - first) / 1000)
                send(m.Result(
                    id=key.id, text=event.text, finish_reason=event.finish_reason,  # type: ignore[arg-type]
                    prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                    adapter_versions=event.adapter_versions,
                    timings=m.Timings(queued_ms=round(event.queued_ms, 3),
                                      first_token_ms=None if first is None else round(first, 3),
                                      total_ms=round(total_s * 1000, 3),
                                      tokens_per_s=None if rate is None else round(rate, 2))))
            else:
                send(m.Error(id=key.id, code=event.code, message=event.message))

        self.text.submit(TextRequest(key=key, prompt_ids=ids, sampling=params, adapters=adapters,
                                     stream=msg.stream, on_event=_guarded(key, send, on_end, on_event)))

    def cancel(self, key: RequestKey, kind: str) -> None:
        engine = self.text if kind == "text" else self.image
        if engine is not None:
            engine.cancel(key)

    # ---------------------------------------------------------------- images

    def submit_image(self, key: RequestKey, msg: m.GenerateImage, send: Send, on_end: Callable[[], None]) -> None:
        if self.shutting_down:
            raise LoraloomError("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN)
        if self.image is None:
            raise LoraloomError(f"no image model is loaded: {self.image_off}", code=ErrorCode.MODEL_UNAVAILABLE)
        adapters = self.resolve(msg.adapters, "image")
        from .engines.image.engine import ImageDoneEvent, ImageProgressEvent, ImageRequest

        def on_event(event: Any) -> None:
            if isinstance(event, ImageProgressEvent):
                send(m.ImageProgress(id=key.id, step=event.step, total=event.total))
                return
            on_end()
            if isinstance(event, ImageDoneEvent):
                send(m.ImageResult(
                    id=key.id, images=list(event.images), seed=event.seed, width=event.width, height=event.height,
                    finish_reason=event.finish_reason,  # type: ignore[arg-type]
                    adapter_versions=dict(event.adapter_versions),
                    timings=m.Timings(queued_ms=round(event.timings.queued_ms, 3),
                                      first_token_ms=None if event.timings.first_step_ms is None
                                      else round(event.timings.first_step_ms, 3),
                                      total_ms=round(event.timings.total_ms, 3))))
            else:
                send(m.Error(id=key.id, code=str(event.code), message=event.message))

        self.image.submit(ImageRequest(
            key=key, prompt=msg.prompt, negative_prompt=msg.negative_prompt, width=msg.width, height=msg.height,
            steps=msg.steps, guidance=msg.guidance, seed=msg.seed, count=msg.count, adapters=adapters),
            _guarded(key, send, on_end, on_event))


def _guarded(key: RequestKey, send: Send, on_end: Callable[[], None],
             handler: Callable[[Any], None]) -> Callable[[Any], None]:
    """Turn a failure while translating an engine event into an `internal` error for that request,
    so the client is answered instead of waiting forever."""

    def on_event(event: Any) -> None:
        try:
            handler(event)
        except Exception as exc:
            log.exception("request %s: turning %s into a message failed", key.id, type(event).__name__)
            on_end()
            send(m.Error(id=key.id, code=ErrorCode.INTERNAL.value, message=f"internal error: {exc}"))

    return on_event


def _load_image_engine(settings: Settings) -> Any:
    from .engines.image.engine import ImageEngine
    from .engines.text.default_model import default_cache_dir

    model: str | Path = settings.image_model
    return ImageEngine(model, cache_dir=settings.cache_dir or default_cache_dir(), device=settings.device,
                       dtype=settings.dtype, max_batch=settings.image_max_batch)
