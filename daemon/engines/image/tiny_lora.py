"""Random image LoRAs in diffusers format, made on the spot for tests, benchmarks and samples.

An image adapter is a folder holding `pytorch_lora_weights.safetensors` as written by diffusers'
`save_lora_weights`. This module writes such folders for any Stable Diffusion style pipeline with
non-zero weights (a freshly initialised PEFT LoRA has B = 0 and would change nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["LORA_WEIGHT_FILE", "UNET_TARGETS", "make_lora_state_dict", "write_image_lora"]

LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def make_lora_state_dict(
    model: torch.nn.Module,
    *,
    rank: int = 4,
    seed: int = 0,
    targets: Iterable[str] = UNET_TARGETS,
    std: float = 0.2,
) -> dict[str, torch.Tensor]:
    """PEFT-style LoRA matrices (`<module>.lora_A.weight`, `<module>.lora_B.weight`) for `model`.

    Both matrices are random so the update B @ A is visibly non-zero; `std` sets its strength.
    """
    gen = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not _matches(name, targets):
            continue
        out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * std
        out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * std
    if not out:
        raise ValueError(f"no Linear module of {type(model).__name__} matches {targets}")
    return out


def write_image_lora(
    folder: Path,
    pipe: Any,
    *,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.2,
    unet_targets: Iterable[str] = UNET_TARGETS,
    text_encoder: bool = False,
) -> Path:
    """Write a diffusers-format LoRA for `pipe` into `folder`; returns the weight file's path."""
    unet_layers = make_lora_state_dict(pipe.unet, rank=rank, seed=seed, targets=unet_targets, std=std)
    text_layers = None
    if text_encoder:
        text_layers = make_lora_state_dict(
            pipe.text_encoder, rank=rank, seed=seed + 1, targets=TEXT_ENCODER_TARGETS, std=std
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        weight_name=LORA_WEIGHT_FILE,
    )
    return folder / LORA_WEIGHT_FILE
