"""The engine contract: what every engine implements and the service relies on.

An engine owns one model and the thread that runs it. The service hands it requests whose
adapter names are already resolved to immutable versions, and gets events back through the
callback given with each request, on the engine's thread:

    engine.start()
    engine.submit(request, on_event)     # any thread; every problem comes back as an event
    engine.cancel(request.key)           # the request ends with a cancelled result
    engine.publish(version)              # a version went live: get it ready ahead of its first request
    engine.retire(version)               # a replaced or removed adapter version: free it once unused
    engine.stop()                        # every request still in flight ends with EngineError(STOPPED)

The built-in text engine, the image engine and (later) a remote or TensorRT-LLM engine all
implement `Engine`. Engines speak `EngineErrorCode`; the service maps those to wire codes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from ..adapters.loader import AdapterFiles
    from ..adapters.version import AdapterVersion
    from .text.tokens import PromptEncoder

__all__ = ["Engine", "EngineError", "EngineErrorCode", "EngineInfo", "EventSink", "PreparedAdapter", "TextEngineLike"]

R_contra = TypeVar("R_contra", contravariant=True)
EventSink = Callable[[Any], None]


class EngineErrorCode(StrEnum):
    """Why an engine ended a request without a result."""

    INVALID = "invalid"  # the request asks for something this engine cannot do (limits, shapes)
    PROMPT_TOO_LONG = "prompt_too_long"
    ADAPTER = "adapter"  # an adapter cannot be used by this engine (wrong kind, failed to load)
    DUPLICATE = "duplicate"  # a request with this key is already in flight
    STOPPED = "stopped"  # the engine is stopping
    UNAVAILABLE = "unavailable"  # the engine cannot serve now (its remote server is down or overloaded)
    FAILED = "failed"  # the engine failed on this request (the log says why)


@dataclass(frozen=True)
class EngineError:
    """The last event of a request that failed."""

    key: Hashable
    code: EngineErrorCode
    message: str


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter version's files validated against an engine's model, in the engine's own form."""

    rank: int
    targets: tuple[str, ...]
    payload: Any = None  # what the engine keeps for serving (e.g. per-layer LoRA matrices); None: the tensors


@dataclass(frozen=True)
class EngineInfo:
    """What an engine tells about itself, for the handshake and /healthz."""

    kind: Literal["text", "image"]
    name: str  # the model's name
    device: str
    dtype: str
    placeholder: bool = False  # a model that only stands in for a real one (the noise-drawing image model)
    limits: Mapping[str, int] = field(default_factory=dict)  # e.g. context_length, max_pixels
    capabilities: frozenset[str] = frozenset()  # e.g. "mixes", "streaming", "seeds"


class Engine(Protocol[R_contra]):
    """One model, its worker thread and its adapters. R is the engine's request type."""

    def describe(self) -> EngineInfo: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, request: R_contra, on_event: EventSink) -> None: ...

    def cancel(self, key: Hashable) -> None: ...

    def publish(self, version: AdapterVersion) -> None: ...

    def retire(self, version: AdapterVersion) -> None: ...

    def prepare_adapter(self, files: AdapterFiles) -> PreparedAdapter: ...

    def stats(self) -> dict[str, Any]: ...


class TextEngineLike(Engine[Any], Protocol):
    """A text engine: the contract plus prompts to token ids (its own tokenizer and chat template)."""

    prompts: PromptEncoder  # its tokenizer and chat template (what the template does with tools)

    def encode_prompt(self, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None, *,
                      limit: int | None = None, tools: Sequence[dict[str, Any]] | None = None) -> list[int]: ...

    def prepare_constraint(self, constraint: Any) -> Any:
        """A request's constraint (`constraints.Constraint`) compiled for this engine (ValueError if invalid)."""
        ...
