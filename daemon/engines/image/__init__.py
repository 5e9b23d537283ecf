"""The image engine: a diffusers text-to-image pipeline with per-request LoRA mixes.

The lead-facing API is `ImageEngine` with `ImageRequest` in and `ImageProgressEvent`,
`ImageDoneEvent` and `ImageErrorEvent` out; `ensure_default_image_model` builds the placeholder
model (random weights, draws noise) that is used when no real model folder is given.
"""

from __future__ import annotations

from .default_pipeline import PLACEHOLDER_NAME, ensure_default_image_model, is_placeholder_model
from .engine import (
    ImageDoneEvent,
    ImageEngine,
    ImageEngineStats,
    ImageErrorEvent,
    ImageEvent,
    ImageProgressEvent,
    ImageRequest,
    ImageTimings,
)

__all__ = [
    "PLACEHOLDER_NAME",
    "ImageDoneEvent",
    "ImageEngine",
    "ImageEngineStats",
    "ImageErrorEvent",
    "ImageEvent",
    "ImageProgressEvent",
    "ImageRequest",
    "ImageTimings",
    "ensure_default_image_model",
    "is_placeholder_model",
]
