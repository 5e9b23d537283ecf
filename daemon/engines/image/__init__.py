"""The image engine: a diffusers text-to-image pipeline with per-request LoRA mixes.

`ImageEngine` takes `ImageRequest`s and answers with `ImageProgressEvent`s, then one
`ImageDoneEvent` or `base.EngineError`; `ensure_default_image_model` builds the placeholder model
(random weights, draws noise) used when no real model folder is given.
"""

from __future__ import annotations

from .default_pipeline import PLACEHOLDER_NAME, ensure_default_image_model, is_placeholder_model
from .engine import ImageEngine
from .request import ImageConfig, ImageCounters, ImageDoneEvent, ImageProgressEvent, ImageRequest, ImageTimings

__all__ = [
    "PLACEHOLDER_NAME",
    "ImageConfig",
    "ImageCounters",
    "ImageDoneEvent",
    "ImageEngine",
    "ImageProgressEvent",
    "ImageRequest",
    "ImageTimings",
    "ensure_default_image_model",
    "is_placeholder_model",
]
