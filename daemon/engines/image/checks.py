"""Is an image request one this engine can run, and which batch group does it join?

`check_request` refuses what the model or the limits cannot do (with a message that says what
would work) and normalises the adapter mix: scales of one version add up, scale 0 leaves the
adapter out, so a request at scale 0 is the base model exactly and batches with it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

from ...adapters.version import AdapterVersion
from ..base import EngineErrorCode
from .request import ImageConfig, ImageRequest

__all__ = ["Checked", "Refused", "check_request"]

MAX_SEED = 2**63 - 1


class Refused(Exception):
    def __init__(self, code: EngineErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Checked:
    seed: int | None  # the request's own (None: the engine picks one when it queues the images)
    versions: dict[str, AdapterVersion] = field(default_factory=dict)  # version key -> version
    mix: tuple[tuple[str, float], ...] = ()  # (version key, scale), sorted, zero scales left out
    batch_key: Hashable = None  # requests with equal keys can share a pipeline call


def check_request(r: ImageRequest, config: ImageConfig, *, size_multiple: int, supports_lora: bool,
                  model_name: str) -> Checked:
    """The normalised request, or Refused."""
    bad = EngineErrorCode.INVALID
    if not isinstance(r.prompt, str):
        raise Refused(bad, "prompt must be a string")
    if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
        raise Refused(bad, "negative_prompt must be a string or absent")
    m = size_multiple
    for what, value in (("width", r.width), ("height", r.height)):
        if not isinstance(value, int) or value < m:
            raise Refused(bad, f"{what} must be an integer of at least {m}, got {value!r}")
        if value % m:
            lower, upper = value - value % m, value - value % m + m
            raise Refused(bad, f"{what} {value} is not a multiple of {m}; try {lower} or {upper}")
    if r.width * r.height > config.max_pixels:
        raise Refused(bad, f"{r.width}x{r.height} is {r.width * r.height} pixels, more than this daemon's limit of "
                           f"{config.max_pixels} (e.g. 1024x1024)")
    if not isinstance(r.steps, int) or not 1 <= r.steps <= config.max_steps:
        raise Refused(bad, f"steps must be between 1 and {config.max_steps}, got {r.steps!r}")
    if not isinstance(r.count, int) or not 1 <= r.count <= config.max_count:
        raise Refused(bad, f"count must be between 1 and {config.max_count}, got {r.count!r}")
    if not isinstance(r.guidance, (int, float)) or not math.isfinite(r.guidance) or r.guidance < 0:
        raise Refused(bad, f"guidance must be a finite number >= 0, got {r.guidance!r}")
    if r.seed is not None and (not isinstance(r.seed, int) or not 0 <= r.seed <= MAX_SEED):
        raise Refused(bad, f"seed must be an integer between 0 and {MAX_SEED}, got {r.seed!r}")
    checked = Checked(seed=r.seed)
    scales: dict[str, float] = {}
    for item in r.adapters:
        version, scale = item
        if not isinstance(version, AdapterVersion):
            raise Refused(bad, f"adapters must be (AdapterVersion, scale) pairs, got {type(version).__name__}")
        if version.kind != "image":
            raise Refused(EngineErrorCode.ADAPTER,
                          f"adapter '{version.name}' is a {version.kind} adapter and cannot be used for images")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise Refused(bad, f"the scale of adapter '{version.name}' must be a finite number")
        if not supports_lora:
            raise Refused(EngineErrorCode.ADAPTER, f"the image model {model_name} does not take LoRA adapters")
        checked.versions[version.key] = version
        scales[version.key] = scales.get(version.key, 0.0) + float(scale)
    if len(checked.versions) > config.max_adapters:
        raise Refused(bad, f"{len(checked.versions)} adapters in one request; the limit is {config.max_adapters}")
    checked.mix = tuple(sorted((k, w) for k, w in scales.items() if w != 0.0))
    checked.batch_key = (checked.mix, r.width, r.height, r.steps, float(r.guidance), r.negative_prompt is None)
    return checked
