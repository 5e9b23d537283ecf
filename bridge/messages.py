"""The wire protocol of loraloom: every message as a pydantic model, and nothing else.

These models are the single definition of the protocol. `bridge/PROTOCOL.md` and the golden frames
under `tests/fixtures/frames/` are generated from them (`python -m bridge.gen`); the C# and GDScript
codecs are tested against those frames.

A frame is one binary WebSocket message holding one msgpack map. Its `type` names the message.
Requests carry a client-chosen `id`; every event about that request carries the same `id`.
Optional fields that are absent mean their default (null for nullable ones).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "PROTOCOL_VERSION",
    "AdapterEvent",
    "AdapterInfo",
    "AdapterRef",
    "Adapters",
    "Cancel",
    "ChatMessage",
    "Chunk",
    "ClientMessage",
    "Error",
    "Generate",
    "GenerateImage",
    "Hello",
    "ImageProgress",
    "ImageResult",
    "Limits",
    "ListAdapters",
    "ModelInfo",
    "Ping",
    "Pong",
    "Result",
    "ServerMessage",
    "Subscribe",
    "Timings",
    "Welcome",
]

PROTOCOL_VERSION = 1

# Adapter names are identifiers, never paths: no slash, no leading dot, at most 64 characters.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
AdapterName = Annotated[str, StringConstraints(pattern=ADAPTER_NAME_PATTERN)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- shared parts


class AdapterRef(_Message):
    """One adapter of a request and the scale its update is multiplied by (0 = no effect)."""

    name: AdapterName
    scale: float = Field(default=1.0, ge=-8.0, le=8.0)


class ChatMessage(_Message):
    """One turn of a conversation; rendered with the model's chat template."""

    role: Literal["system", "user", "assistant"]
    content: str


class AdapterInfo(_Message):
    """What the daemon knows about one adapter."""

    name: str
    kind: Literal["text", "image"]
    status: Literal["ready", "loading", "failed", "removed"]
    version: int | None = None  # the live version's number, counting from 1
    hash: str | None = None  # sha256 of the live version's files, hex, first 16 digits
    rank: int | None = None
    targets: list[str] = []
    error: str | None = None  # why the newest version was rejected (the previous may still serve)


class ModelInfo(_Message):
    """A loaded model, as announced in the handshake."""

    name: str
    kind: Literal["text", "image"]
    device: str
    dtype: str
    context_length: int | None = None
    placeholder: bool = False  # true for the built-in noise-drawing image model


class Limits(_Message):
    """The limits this daemon enforces, so clients can check before sending."""

    max_frame_bytes: int
    max_inflight_per_connection: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_adapters_per_request: int


class Timings(_Message):
    """Where the time of one request went, in milliseconds."""

    queued_ms: float  # from arrival to the first engine step that worked on it
    first_token_ms: float | None = None  # from arrival to the first generated token (or image step)
    total_ms: float
    tokens_per_s: float | None = None


# ---------------------------------------------------------------- client -> daemon


class Hello(_Message):
    """The first frame of every connection: protocol version, token and a name for logs."""

    type: Literal["hello"] = "hello"
    protocol: int
    token: str = Field(max_length=256)
    client: str = Field(default="unknown", max_length=64)


class Generate(_Message):
    """Generate text on the base model plus a per-request mix of adapters.

    Exactly one of `prompt` (raw text, continued as is) or `messages` (chat, with the model's
    template) is given. `adapters` empty means the base model; several adapters are mixed with
    their scales.
    """

    type: Literal["generate"] = "generate"
    id: RequestId
    adapters: list[AdapterRef] = []
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)  # 0 = greedy
    top_k: int = Field(default=0, ge=0)  # 0 = off
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=5.0)
    seed: Seed | None = None
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        default=[], max_length=16
    )
    stream: bool = True  # false: only the final `result`, no `chunk` events

    @model_validator(mode="after")
    def _one_input(self) -> Generate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self


class GenerateImage(_Message):
    """Generate images on the image model plus a per-request mix of image adapters."""

    type: Literal["generate_image"] = "generate_image"
    id: RequestId
    prompt: str
    negative_prompt: str | None = None
    adapters: list[AdapterRef] = []
    width: int = Field(default=512, ge=8)
    height: int = Field(default=512, ge=8)
    steps: int = Field(default=20, ge=1)
    guidance: float = Field(default=7.5, ge=0.0, le=50.0)
    seed: Seed | None = None
    count: int = Field(default=1, ge=1, le=8)


class Cancel(_Message):
    """Stop a request; it ends with a `result` whose finish_reason is `cancelled`."""

    type: Literal["cancel"] = "cancel"
    id: RequestId


class ListAdapters(_Message):
    """Ask for the current adapter list; answered by `adapters`."""

    type: Literal["list_adapters"] = "list_adapters"
    id: RequestId


class Subscribe(_Message):
    """Receive `adapter_event`s from now on; answered by `adapters` with the current list."""

    type: Literal["subscribe"] = "subscribe"
    id: RequestId
    topics: list[Literal["adapters"]] = ["adapters"]


class Ping(_Message):
    """Answered by `pong` with the same id."""

    type: Literal["ping"] = "ping"
    id: RequestId


# ---------------------------------------------------------------- daemon -> client


class Welcome(_Message):
    """The answer to a valid `hello`."""

    type: Literal["welcome"] = "welcome"
    protocol: int
    server: str  # the daemon's version
    text_model: ModelInfo | None = None
    image_model: ModelInfo | None = None
    adapters: list[AdapterInfo] = []
    limits: Limits


class Chunk(_Message):
    """New text of a streaming request. `index` counts chunks from 0; `tokens` is the total so far."""

    type: Literal["chunk"] = "chunk"
    id: RequestId
    text: str
    index: int
    tokens: int


class Result(_Message):
    """The end of a text request: the whole text and why it stopped."""

    type: Literal["result"] = "result"
    id: RequestId
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    adapter_versions: dict[str, int] = {}  # which version of each adapter served this request
    timings: Timings


class Error(_Message):
    """A refused frame or a failed request. `id` is absent when the frame had no readable id."""

    type: Literal["error"] = "error"
    id: str | None = None
    code: str  # one of bridge.errors.ErrorCode
    message: str


class Adapters(_Message):
    """The current adapter list (answer to `list_adapters` and `subscribe`)."""

    type: Literal["adapters"] = "adapters"
    id: RequestId
    adapters: list[AdapterInfo]


class AdapterEvent(_Message):
    """An adapter changed on disk and the daemon acted on it (sent to subscribers)."""

    type: Literal["adapter_event"] = "adapter_event"
    event: Literal["added", "updated", "removed", "rejected"]
    adapter: AdapterInfo
    previous_version: int | None = None
    reason: str | None = None  # for `rejected`: what was wrong with the new files


class Pong(_Message):
    """The answer to `ping`; `server_time` is the daemon's wall clock in seconds."""

    type: Literal["pong"] = "pong"
    id: RequestId
    server_time: float


class ImageProgress(_Message):
    """One denoising step of an image request finished (`step` counts from 1 to `total`)."""

    type: Literal["image_progress"] = "image_progress"
    id: RequestId
    step: int
    total: int


class ImageResult(_Message):
    """The end of an image request: PNG files as msgpack bin, plus the seed that made them."""

    type: Literal["image_result"] = "image_result"
    id: RequestId
    images: list[bytes]
    seed: int
    width: int
    height: int
    finish_reason: Literal["stop", "cancelled"] = "stop"
    adapter_versions: dict[str, int] = {}
    timings: Timings


ClientMessage = Annotated[
    Hello | Generate | GenerateImage | Cancel | ListAdapters | Subscribe | Ping,
    Field(discriminator="type"),
]
ServerMessage = Annotated[
    Welcome
    | Chunk
    | Result
    | Error
    | Adapters
    | AdapterEvent
    | Pong
    | ImageProgress
    | ImageResult,
    Field(discriminator="type"),
]
