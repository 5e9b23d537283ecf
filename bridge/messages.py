"""The wire protocol of loraloom: every message as a pydantic model, and nothing else.

These models are the single definition of the protocol. `bridge/PROTOCOL.md`, the golden frames
under `tests/fixtures/frames/` and the C# and GDScript protocol files are generated from them
(`python -m bridge.gen`); each field's `description` is what those files say about it.

A frame is one binary WebSocket message holding one msgpack map. Its `type` names the message.
Requests carry a client-chosen `id`; every event about that request carries the same `id`.
Optional fields that are absent mean their default (null for nullable ones).

Every number a client sends has bounds, and they are the ones the daemon can honour: integers fit
a signed 32-bit int (seeds: 63 bits), floats are finite. A value outside them is `bad_message`;
a value inside them that this daemon's settings refuse (say `max_tokens` above its limit) is
`invalid_parameter`.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from .info import AdapterInfo, Limits, Memory, ModelInfo, Timings, _Message

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "MAX_ADAPTERS",
    "MAX_INT32",
    "MAX_SEED",
    "PROTOCOL_VERSION",
    "AdapterEvent",
    "AdapterInfo",
    "AdapterRef",
    "Adapters",
    "Budget",
    "Cancel",
    "ChatMessage",
    "Chunk",
    "ClientMessage",
    "Error",
    "Frame",
    "FrameSync",
    "Generate",
    "GenerateImage",
    "Hello",
    "ImageProgress",
    "ImageResult",
    "Limits",
    "ListAdapters",
    "Memory",
    "ModelInfo",
    "Ping",
    "Pong",
    "Result",
    "ServerMessage",
    "SetBudget",
    "Subscribe",
    "Timings",
    "TokenRates",
    "Tool",
    "ToolCall",
    "Welcome",
]

PROTOCOL_VERSION = 1

# Adapter names are identifiers, never paths: no slash, no leading dot, at most 64 characters.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
MAX_INT32 = 2**31 - 1  # the integer range every client language has (C# int, GDScript int)
MAX_SEED = 2**63 - 1
MAX_ADAPTERS = 16  # adapters in one request's mix, at most (a daemon may allow fewer)
TOOL_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
AdapterName = Annotated[str, StringConstraints(pattern=ADAPTER_NAME_PATTERN)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _id(what: str = "the request's id") -> str:
    return f"{what} (client-chosen, 1-64 characters, unique among the connection's requests in flight)"


# ---------------------------------------------------------------- shared parts


class AdapterRef(_Message):
    """One adapter of a request and the scale its update is multiplied by (0 = no effect)."""

    name: AdapterName = Field(description="the adapter's name: its folder's name")
    scale: float = Field(default=1.0, ge=-8.0, le=8.0, description="multiplies the adapter's update")


class ChatMessage(_Message):
    """One turn of a conversation; rendered with the model's chat template."""

    role: Literal["system", "user", "assistant"]
    content: str


class Tool(_Message):
    """A function the model may call (`generate.tools`)."""

    name: Annotated[str, StringConstraints(pattern=TOOL_NAME_PATTERN)] = Field(
        description="what the game calls it: a letter or _, then letters, digits, _ . - (at most 64)")
    description: str = Field(default="", max_length=4096, description="what it does, for the model")
    parameters: dict[str, Any] = Field(default={"type": "object"},
                                       description="a JSON Schema object for its arguments")


class ToolCall(_Message):
    """A call the model made (`result.tool_calls`)."""

    name: str = Field(description="one of the request's tools")
    arguments: dict[str, Any] = Field(default={}, description="the arguments, valid against its parameters")


# ---------------------------------------------------------------- client -> daemon


class Hello(_Message):
    """The first frame of every connection: protocol version, token and a name for logs."""

    type: Literal["hello"] = "hello"
    protocol: int = Field(ge=0, le=MAX_INT32, description="the protocol version the client speaks")
    token: str = Field(max_length=256, description="the token from the daemon's runtime file")
    client: str = Field(default="unknown", max_length=64, description="a name for the daemon's logs")


class Generate(_Message):
    """Generate text on the base model plus a per-request mix of adapters.

    Exactly one of `prompt` (raw text, continued as is) or `messages` (chat, with the model's
    template) is given. `adapters` empty means the base model; several adapters are mixed with
    their scales.
    """

    type: Literal["generate"] = "generate"
    id: RequestId = Field(description=_id())
    adapters: list[AdapterRef] = Field(default=[], max_length=MAX_ADAPTERS,
                                       description="empty: the base model; several: a mix")
    prompt: str | None = Field(default=None, description="raw text, continued as is")
    messages: list[ChatMessage] | None = Field(default=None, max_length=4096,
                                               description="a conversation, rendered with the chat template")
    max_tokens: int = Field(default=256, ge=1, le=MAX_INT32, description="tokens to generate at most")
    temperature: float = Field(default=0.7, ge=0.0, le=5.0, description="0 = greedy")
    top_k: int = Field(default=0, ge=0, le=MAX_INT32, description="keep the k likeliest tokens; 0 = off")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="keep the likeliest tokens up to this mass; 1 = off")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=5.0, description="1 = off")
    seed: Seed | None = Field(default=None, description="the same seed gives the same text; null: random")
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        default=[], max_length=16, description="the text ends before the first of these strings")
    stream: bool = Field(default=True, description="false: only the final `result`, no `chunk` events")
    priority: Literal["player", "normal", "background"] = Field(
        default="normal", description="player lines are admitted and prefilled first, background last; "
        "a lower priority sequence may be paused (and resumed, text unchanged) to make room")
    trim_history: bool = Field(
        default=False, description="when `messages` do not fit the context with room for the reply, leave "
        "out the oldest turns (never system messages, never part of a turn); `result.dropped_messages` "
        "says how many")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="the output is JSON valid against this JSON Schema; `result.json` holds it "
        "parsed (at most one of json_schema, regex, choices, grammar)")
    regex: str | None = Field(default=None, min_length=1, max_length=16384,
                              description="the output matches this regular expression (Rust `regex` syntax)")
    choices: list[Annotated[str, StringConstraints(min_length=1, max_length=4096)]] | None = Field(
        default=None, min_length=1, max_length=1024, description="the output is exactly one of these strings")
    grammar: str | None = Field(default=None, min_length=1, max_length=65536,
                                description="the output matches this Lark grammar (llguidance's Lark dialect)")
    tools: list[Tool] | None = Field(
        default=None, min_length=1, max_length=128, description="functions the model may call (needs "
        "`messages`); a call comes back in `result.tool_calls`")
    tool_choice: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        default="auto", description="with `tools`: auto (text or one call), required (one call), none (text; "
        "the tools are not shown), or a tool's name (a call of that tool)")

    @model_validator(mode="after")
    def _one_input(self) -> Generate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        given = [n for n in ("json_schema", "regex", "choices", "grammar", "tools") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex, choices, grammar and tools (got {given})")
        if self.tools is not None:
            if self.messages is None:
                raise ValueError("'tools' need 'messages' (the chat template lays them out)")
            names = [t.name for t in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("two tools have the same name")
            if self.tool_choice not in ("auto", "required", "none", *names):
                raise ValueError(f"tool_choice {self.tool_choice!r} is none of auto, required, none or a tool's name")
        elif self.tool_choice != "auto":
            raise ValueError("'tool_choice' needs 'tools'")
        return self


class GenerateImage(_Message):
    """Generate images on the image model plus a per-request mix of image adapters."""

    type: Literal["generate_image"] = "generate_image"
    id: RequestId = Field(description=_id())
    prompt: str
    negative_prompt: str | None = None
    adapters: list[AdapterRef] = Field(default=[], max_length=MAX_ADAPTERS,
                                       description="empty: the base model; several: a mix")
    width: int = Field(default=512, ge=8, le=16384, description="a multiple of 8 (of the model's VAE factor)")
    height: int = Field(default=512, ge=8, le=16384, description="a multiple of 8 (of the model's VAE factor)")
    steps: int = Field(default=20, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(default=7.5, ge=0.0, le=50.0, description="classifier-free guidance scale")
    seed: Seed | None = Field(default=None, description="image i uses seed + i; null: the daemon picks one")
    count: int = Field(default=1, ge=1, le=64, description="images to generate")


class Cancel(_Message):
    """Stop a request; it ends with a `result` whose finish_reason is `cancelled`."""

    type: Literal["cancel"] = "cancel"
    id: RequestId = Field(description="the id of the request to stop")


class ListAdapters(_Message):
    """Ask for the current adapter list; answered by `adapters`."""

    type: Literal["list_adapters"] = "list_adapters"
    id: RequestId = Field(description=_id())


class Subscribe(_Message):
    """Receive `adapter_event`s from now on; answered by `adapters` with the current list."""

    type: Literal["subscribe"] = "subscribe"
    id: RequestId = Field(description=_id())
    topics: list[Literal["adapters"]] = Field(default=["adapters"], max_length=4)


class Ping(_Message):
    """Answered by `pong` with the same id."""

    type: Literal["ping"] = "ping"
    id: RequestId = Field(description=_id())


class TokenRates(_Message):
    """Tokens per second a priority class may generate, at most (null: no cap)."""

    player: float | None = Field(default=None, gt=0.0, le=1e6)
    normal: float | None = Field(default=None, gt=0.0, le=1e6)
    background: float | None = Field(default=None, gt=0.0, le=1e6)


class FrameSync(_Message):
    """The game's frame: the daemon's GPU work runs in the part of each frame the game leaves free."""

    period_ms: float = Field(ge=1.0, le=1000.0, description="frame time (16.7 at 60 Hz); `frame` messages mark starts")
    game_ms: float = Field(ge=0.0, le=1000.0, description="GPU time the game's own work takes from a frame's start")
    margin_ms: float = Field(default=0.5, ge=0.0, le=100.0, description="kept free before the next frame")
    overlap_ms: float = Field(default=0.0, ge=0.0, le=100.0, description=(
        "how far past that a step may run into the game's next frame (that frame then shares the GPU for up to "
        "this long: a little slower while it is well under the period); 0: never. A frame whose reported time "
        "is past the period less the margin halves it; each frame within gives a sixteenth back"))


class SetBudget(_Message):
    """Limit the GPU time the daemon takes (all limits off: no budget). Answered by `budget`. The
    budget holds until it is set again or this connection closes (then the settings' budget returns)."""

    type: Literal["set_budget"] = "set_budget"
    id: RequestId = Field(description=_id())
    duty_cap: float | None = Field(default=None, gt=0.0, le=1.0,
                                   description="the fraction of wall time the daemon's GPU work may occupy")
    tokens_per_s: TokenRates | None = Field(default=None, description="generated tokens per second per priority")
    frame_sync: FrameSync | None = Field(default=None, description="run in the free part of the game's frames")
    max_step_ms: float | None = Field(default=None, ge=0.5, le=10000.0,
                                      description="the longest step while a budget is set (prompt chunks shrink)")


class Frame(_Message):
    """A frame of the game started now (with `frame_sync`; no answer). A few bytes a frame."""

    type: Literal["frame"] = "frame"
    game_ms: float | None = Field(
        default=None, ge=0.0, le=1000.0,
        description="the GPU time the game's own work took in its last frame, as the engine measured it; with "
                    "these reports the daemon sizes the game's part of a frame from them (their 90th percentile "
                    "over recent frames) instead of `frame_sync.game_ms`")


# ---------------------------------------------------------------- daemon -> client


class Welcome(_Message):
    """The answer to a valid `hello`."""

    type: Literal["welcome"] = "welcome"
    protocol: int
    server: str = Field(description="the daemon's version")
    text_model: ModelInfo | None = None
    image_model: ModelInfo | None = None
    adapters: list[AdapterInfo] = []
    limits: Limits
    memory: Memory | None = Field(default=None, description="what the engines take on their device at start")


class Chunk(_Message):
    """New text of a streaming request."""

    type: Literal["chunk"] = "chunk"
    id: RequestId
    text: str = Field(description="the new text; the chunks of a request join to its result's text")
    index: int = Field(description="counts the request's chunks from 0")
    tokens: int = Field(description="tokens generated so far")


# `json` is the wire name the field must have; it shadows BaseModel's deprecated json() method.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class Result(_Message):
        """The end of a text request: the whole text and why it stopped."""

        type: Literal["result"] = "result"
        id: RequestId
        text: str
        finish_reason: Literal["stop", "length", "cancelled"] = Field(
            description="stop: end of text or a stop string; length: max_tokens or the context was reached")
        prompt_tokens: int
        completion_tokens: int
        adapter_versions: dict[str, int] = Field(default={}, description="which version of each adapter served it")
        timings: Timings
        cached_tokens: int = Field(default=0, description="prompt tokens whose keys and values came from the "
                                   "prefix cache (the same tokens on the same adapter versions and scales)")
        dropped_messages: int = Field(default=0, description="with `trim_history`: how many messages after the "
                                      "system messages were left out to fit, counted from the oldest")
        constraint: Literal["satisfied", "incomplete"] | None = Field(
            default=None, description="with a constraint or tools: satisfied, or incomplete when the output ended "
            "first (max_tokens, the context, a stop string or cancel)")
        json: Any = Field(default=None, description="with `json_schema`: the output parsed (absent when incomplete)")
        tool_calls: list[ToolCall] = Field(default=[], description="with `tools`: the call the model made, if any")


class Error(_Message):
    """A refused frame or a failed request."""

    type: Literal["error"] = "error"
    id: str | None = Field(default=None, description="absent when the frame had no readable id")
    code: str = Field(description="one of the error codes above")
    message: str = Field(description="what went wrong, for people")


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
    reason: str | None = Field(default=None, description="for `rejected`: what was wrong with the new files")


class Pong(_Message):
    """The answer to `ping`."""

    type: Literal["pong"] = "pong"
    id: RequestId
    server_time: float = Field(description="the daemon's wall clock, seconds since 1970")


class Budget(_Message):
    """The GPU budget in force (the answer to `set_budget`)."""

    type: Literal["budget"] = "budget"
    id: RequestId
    duty_cap: float | None = None
    tokens_per_s: TokenRates | None = None
    frame_sync: FrameSync | None = None
    max_step_ms: float | None = None
    set_by_client: bool = Field(default=False, description="false: the daemon's settings' budget")


class ImageProgress(_Message):
    """One denoising step of an image request finished."""

    type: Literal["image_progress"] = "image_progress"
    id: RequestId
    step: int = Field(description="counts from 1 to `total`")
    total: int


class ImageResult(_Message):
    """The end of an image request: PNG files as msgpack bin, plus the seed that made them."""

    type: Literal["image_result"] = "image_result"
    id: RequestId
    images: list[bytes] = Field(description="PNG files, one per image")
    seed: int = Field(description="the seed of the first image (image i used seed + i)")
    width: int
    height: int
    finish_reason: Literal["stop", "cancelled"] = "stop"
    adapter_versions: dict[str, int] = Field(default={}, description="which version of each adapter served it")
    timings: Timings


ClientMessage = Annotated[
    Hello | Generate | GenerateImage | Cancel | ListAdapters | Subscribe | Ping | SetBudget | Frame,
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
    | Budget
    | ImageProgress
    | ImageResult,
    Field(discriminator="type"),
]
