"""What the three remote engines share, and the seams where each speaks its own way.

All three serve the OpenAI completions API (`POST /v1/completions`, a prompt of token ids, SSE
chunks, usage at the end); they differ in how a request names its LoRA, how an adapter is
loaded and unloaded at run time, which sampling values they accept, and a few fields. A dialect
is a small subclass of `Dialect` (vllm.py, sglang.py, trtllm.py); nothing here does I/O except
through the `RemoteHttp` it is handed.

    body = dialect.completion_body(base, adapter, request, max_tokens)   # what to POST
    piece = dialect.read_chunk(event)                                    # one SSE event -> Piece
    dialect.load(http, adapter); dialect.unload(http, adapter)           # adapter life cycle
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..base import EngineErrorCode
from .http import HttpStatusError, RemoteHttp

if TYPE_CHECKING:
    from ..text.request import SamplingParams, TextRequest

__all__ = ["COMPLETIONS", "Dialect", "Piece", "RemoteAdapter", "RemoteFailure", "failure_from_status"]

COMPLETIONS = "/v1/completions"


class RemoteFailure(Exception):
    """A request cannot be served by the remote: an engine error code and a readable reason."""

    def __init__(self, code: EngineErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class RemoteAdapter:
    """One adapter as the remote knows it: its name there and the path the remote reads it from."""

    name: str  # e.g. "npc@2.3fa9c1d2e4b5a6f7" (a version) or "mix.<digest>" (a mix)
    path: str

    @property
    def int_id(self) -> int:
        """A stable 62-bit id for engines that key their LoRA cache by number (trtllm-serve). The name
        holds the content hash, so the same id always means the same weights, in any daemon's life."""
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big") >> 2


@dataclass
class Piece:
    """What one SSE event of a completion carried."""

    text: str = ""
    tokens: int = 0  # tokens this event added (0: unknown; counted from usage at the end)
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


def failure_from_status(exc: HttpStatusError, what: str) -> RemoteFailure:
    """An HTTP error of the remote, as the engine error a client can act on."""
    text = f"{what}: the remote answered {exc.status}: {exc.message}"
    low = exc.message.lower()
    if exc.status in (401, 403):
        return RemoteFailure(EngineErrorCode.FAILED, f"{what}: the remote refused our credentials "
                             f"(check remote_api_key): {exc.message}")
    if exc.status in (400, 413, 422):
        if "context length" in low or "context window" in low or ("prompt" in low and "too long" in low):
            return RemoteFailure(EngineErrorCode.PROMPT_TOO_LONG, text)
        return RemoteFailure(EngineErrorCode.INVALID, text)
    if exc.status in (429, 503):
        return RemoteFailure(EngineErrorCode.UNAVAILABLE, f"{what}: the remote is overloaded ({exc.status}): "
                             f"{exc.message}")
    return RemoteFailure(EngineErrorCode.FAILED, text)


class Dialect:
    """The OpenAI completions API as vLLM speaks it; subclasses override where theirs differ."""

    name: ClassVar[str] = "openai"
    top_k_off: ClassVar[int] = 0  # the value that means "no top-k"
    token_ids_field: ClassVar[str | None] = "return_token_ids"  # ask for each chunk's token ids
    # Sampling values the remote cannot honour: field -> (the largest it accepts, why).
    limits: ClassVar[dict[str, tuple[float, str]]] = {}

    # ------------------------------------------------------------- requests

    def refusal(self, params: SamplingParams) -> str | None:
        """Why this remote cannot sample as asked, or None."""
        for field, (most, why) in self.limits.items():
            value = getattr(params, field)
            if value > most:
                return f"{field} {value:g} is above what the {self.name} remote accepts ({most:g}): {why}"
        return None

    def model_field(self, base: str, adapter: RemoteAdapter | None) -> dict[str, Any]:
        """The fields that choose the base model or one adapter."""
        return {"model": adapter.name if adapter else base}

    def completion_body(self, base: str, adapter: RemoteAdapter | None, request: TextRequest,
                        max_tokens: int) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            **self.model_field(base, adapter),
            "prompt": list(request.prompt_ids), "max_tokens": max_tokens, "temperature": s.temperature,
            "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else self.top_k_off,
            "repetition_penalty": s.repetition_penalty, "seed": s.seed, "ignore_eos": s.ignore_eos,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if self.token_ids_field:
            body[self.token_ids_field] = True
        return body

    def read_chunk(self, event: Any) -> Piece:
        """One SSE event's text, tokens, finish reason and usage; RemoteFailure for an error event."""
        if not isinstance(event, dict):
            raise RemoteFailure(EngineErrorCode.FAILED, f"the remote sent an event that is not an object: {event!r}")
        if "error" in event:
            err = event["error"]
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            status = err.get("code") if isinstance(err, dict) else None
            raise failure_from_status(HttpStatusError(status if isinstance(status, int) else 500, str(message)),
                                      "the remote failed during the request")
        piece = Piece(usage=event.get("usage") or None)
        for choice in event.get("choices") or []:
            piece.text += choice.get("text") or ""
            ids = choice.get("token_ids")
            if ids:
                piece.token_ids += tuple(int(t) for t in ids)
            if choice.get("finish_reason"):
                piece.finish_reason = str(choice["finish_reason"])
        piece.tokens = len(piece.token_ids) if piece.token_ids else (1 if piece.text else 0)
        return piece

    @staticmethod
    def cached_tokens(usage: dict[str, Any] | None) -> int:
        details = (usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0

    # ------------------------------------------------------------- the base model

    def base_model(self, http: RemoteHttp) -> tuple[str, int | None]:
        """The name the remote serves its base model under, and its context length if it says."""
        listing = http.call("GET", "/v1/models", timeout=10)
        models = listing.get("data") if isinstance(listing, dict) else None
        if not models:
            raise RemoteFailure(EngineErrorCode.FAILED, f"the remote at {http.url} lists no model (/v1/models)")
        base = next((m for m in models if not m.get("parent")), models[0])
        length = base.get("max_model_len")
        return str(base["id"]), int(length) if isinstance(length, int) else None

    # ------------------------------------------------------------- adapters

    load_path: ClassVar[str | None] = "/v1/load_lora_adapter"
    unload_path: ClassVar[str | None] = "/v1/unload_lora_adapter"

    def load(self, http: RemoteHttp, adapter: RemoteAdapter) -> None:
        """Make the remote serve `adapter` (idempotent: loaded already is fine)."""
        if self.load_path is None:
            return
        try:
            http.call("POST", self.load_path, {"lora_name": adapter.name, "lora_path": adapter.path})
        except HttpStatusError as exc:
            if "already" in exc.message.lower():  # the name holds the content hash: same name, same weights
                return
            raise RemoteFailure(EngineErrorCode.ADAPTER, f"the remote could not load adapter {adapter.name} "
                                f"from {adapter.path}: {exc.message}") from None

    def unload(self, http: RemoteHttp, adapter: RemoteAdapter) -> None:
        """Let the remote forget `adapter` (idempotent: unknown already is fine)."""
        if self.unload_path is None:
            return
        try:
            http.call("POST", self.unload_path, {"lora_name": adapter.name})
        except HttpStatusError as exc:
            if exc.status != 404 and "not found" not in exc.message.lower():
                raise

    def unknown_model(self, exc: HttpStatusError) -> bool:
        """Whether a completion was refused because the remote does not know the adapter (it restarted)."""
        low = exc.message.lower()
        return exc.status == 404 or (exc.status == 400 and "lora" in low and "not" in low)
