"""The descriptive parts of the protocol: what the daemon says about its models, adapters, limits,
memory and a request's timings (nested in `welcome`, `adapters`, `result` and friends).

They live apart from the request and event messages of `bridge/messages.py`, which re-exports them,
so `from bridge.messages import Limits` keeps working; the generators reach them through the
messages that nest them. `_Message` is the base every wire model shares (unknown fields refused,
values frozen, no infinities).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdapterInfo", "Limits", "Memory", "ModelInfo", "Timings"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)



class AdapterInfo(_Message):
    """What the daemon knows about one adapter."""

    name: str
    kind: Literal["text", "image"]
    status: Literal["ready", "loading", "failed", "removed"] = Field(
        description="loading: its files are being read (first time, or again after it left host memory)")
    version: int | None = Field(default=None, description="the live version's number, counting from 1")
    hash: str | None = Field(default=None, description="sha256 of the live version's files, hex, first 16 digits")
    rank: int | None = None
    targets: list[str] = Field(default=[], description="the projections it changes (q_proj, v_proj, ...)")
    error: str | None = Field(
        default=None, description="why the newest version was rejected (the previous one may still serve)")


class ModelInfo(_Message):
    """A loaded model, as announced in the handshake."""

    name: str
    kind: Literal["text", "image"]
    device: str = Field(description="cpu, cuda, cuda:1, ...")
    dtype: str = Field(description="float32, bfloat16 or float16")
    context_length: int | None = Field(default=None, description="text: tokens per sequence, prompt included")
    placeholder: bool = Field(default=False, description="true for the built-in image model that draws noise")


class Limits(_Message):
    """The limits this daemon enforces, so clients can check before sending."""

    max_frame_bytes: int = Field(description="larger frames are refused with frame_too_large")
    max_inflight_per_connection: int = Field(description="requests in flight at once on one connection")
    max_prompt_tokens: int = Field(description="tokens of a text prompt after the chat template")
    max_new_tokens: int = Field(description="the largest max_tokens a generate may ask for")
    max_adapters_per_request: int = Field(description="adapters in one request's mix")
    max_image_pixels: int | None = Field(default=None, description="width x height of one image (null: no image model)")
    max_image_steps: int | None = Field(default=None, description="denoising steps of one image request")
    max_image_count: int | None = Field(default=None, description="images of one image request")
    lora_slots: int | None = Field(default=None, description=(
        "text adapters resident in compute memory at once (a request's mix needs at most this many distinct ones)"))
    kv_cache_tokens: int | None = Field(default=None, description=(
        "token positions of the KV cache, shared by every running sequence and the prefix cache"))


class Memory(_Message):
    """What the engines take on their device (GPU memory; RAM on a CPU), in MiB: reserved at start
    (what `gpu_memory_mb` caps), holding data now, and measured."""

    device: str = Field(description="cpu, cuda, cuda:1, ...")
    budget_mb: int | None = Field(default=None, description="the daemon's gpu_memory_mb (null: no cap)")
    reserved_mb: int = Field(description="weights + KV cache + LoRA pool + step workspace + image model")
    used_mb: int = Field(description=(
        "of that, what holds data now: the weights, the image model, KV blocks in use or cached, the LoRA "
        "rows of resident adapters"))
    measured_mb: int = Field(description=(
        "what the device's allocator holds (CUDA), or the process's resident memory (CPU, libraries included)"))
    weights_mb: int = Field(default=0, description="the text model's weights")
    kv_cache_mb: int = Field(default=0, description="the KV cache pool")
    lora_pool_mb: int = Field(default=0, description="the LoRA pool: lora_slots x max_lora_rank rank rows")
    workspace_mb: int = Field(default=0, description="one engine step's activations and logits (an estimate)")
    image_mb: int = Field(default=0, description="the image model's weights")


class Timings(_Message):
    """Where the time of one request went, in milliseconds."""

    queued_ms: float = Field(description="from arrival to the first engine step that worked on it")
    first_token_ms: float | None = Field(
        default=None, description="from arrival to the first generated token (or image step)")
    total_ms: float
    tokens_per_s: float | None = Field(default=None, description="generated tokens per second after the first")
