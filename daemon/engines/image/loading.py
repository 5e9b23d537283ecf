"""Loading a diffusers pipeline from a folder, and checking image LoRAs against it.

`load_pipeline` reads a pipeline folder ("default": the placeholder, built on first use) without
any download; `LoraCheck` records the pipeline's LoRA-targetable shapes once, at load, so an
adapter can be validated from any thread while the engine's worker changes the pipeline.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from ..device import DTYPES, resolve_device, resolve_dtype
from .default_pipeline import PLACEHOLDER_NAME, ensure_default_image_model, is_placeholder_model
from .lora_format import build_shape_index, check_lora, normalize_lora
from .request import ImageConfig

__all__ = ["LoraCheck", "load_pipeline"]


def load_pipeline(model: str | Path, config: ImageConfig, *, cache_dir: Path) -> tuple[Any, str, bool]:
    """(pipeline, name, placeholder) for a diffusers folder or "default"."""
    diffusers = importlib.import_module("diffusers")
    path = ensure_default_image_model(Path(cache_dir)) if str(model) == "default" else Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    placeholder = is_placeholder_model(path)
    device = resolve_device(config.device, allow_mps=True)
    # Random placeholder weights overflow in half precision; real checkpoints are made for it.
    if placeholder:
        dtype = DTYPES.get(config.dtype, torch.float32)
    else:
        dtype = resolve_dtype(config.dtype, device, half=torch.float16)
    diffusers.utils.logging.disable_progress_bar()  # bars are not for the daemon's log
    if importlib.util.find_spec("transformers") is not None:  # it loads the pipeline's text encoder
        importlib.import_module("transformers").utils.logging.disable_progress_bar()
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(path, dtype=dtype, local_files_only=True)
    return pipe, PLACEHOLDER_NAME if placeholder else path.name, placeholder


class LoraCheck:
    """What an image LoRA must look like for one pipeline."""

    def __init__(self, pipe: Any, *, name: str, max_rank: int) -> None:
        self.name = name
        self.max_rank = max_rank
        self.pipeline = type(pipe)
        self.supported = hasattr(pipe, "load_lora_weights")
        self.shape_index = build_shape_index(pipe) if self.supported else {}
        unet = getattr(pipe, "unet", None)
        self.unet_config = getattr(unet, "config", None) if unet is not None else None

    def __call__(self, tensors: dict[str, torch.Tensor], files: dict[str, int] | None = None) -> tuple[int,
                                                                                                    tuple[str, ...]]:
        """(rank, target module names), or ValueError saying what is wrong. `files` (the folder's
        file names) only sharpen the message."""
        if not self.supported:
            raise ValueError(f"the image model {self.name} ({self.pipeline.__name__}) does not take LoRAs")
        try:
            if not tensors:
                raise ValueError("the adapter holds no tensors")
            parts = normalize_lora(self.pipeline, tensors, unet_config=self.unet_config)
            return check_lora(parts, self.shape_index, max_rank=self.max_rank)
        except ValueError as exc:
            hint = ""
            if files and "adapter_config.json" in files:
                hint = " (the folder has an adapter_config.json: it looks like a text adapter in PEFT format)"
            raise ValueError(f"{exc}{hint}") from None
