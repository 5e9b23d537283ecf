"""A mix of adapters as one LoRA, and PEFT folders written for the remote to read.

A mix is itself a LoRA. With each adapter's scaling folded into its B (alpha/r, or alpha/sqrt(r)
for rsLoRA; `peft_format.prepare_peft_lora` does that) and its scale s_i in the mix:

    delta(x) = sum_i s_i * B_i (A_i x) = [s_1 B_1 | s_2 B_2 | ...] ([A_1; A_2; ...] x)

so the mix has A matrices stacked along the rank and scaled B matrices side by side: rank
r_1 + r_2 + ..., with lora_alpha = r (scaling 1). A module that one adapter lacks gets zeros
in that adapter's block, so every module of the mix has the same rank.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..text.config import LORA_TARGETS, ModelSpec
from ..text.lora_pool import PreparedLora

__all__ = ["mix_tensors", "write_peft_folder"]

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _key(layer: int, target: str, ab: str) -> str:
    group = "self_attn" if target in _ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{group}.{target}.lora_{ab}.weight"


def mix_tensors(parts: Sequence[tuple[PreparedLora, float]], spec: ModelSpec
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of one PEFT LoRA equal to the scaled sum of `parts`."""
    rank = sum(lora.rank for lora, _ in parts)
    targets = [t for t in LORA_TARGETS if any(t in lora.targets for lora, _ in parts)]
    dims = spec.target_dims()
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec.num_layers):
        for target in targets:
            d_in, d_out = dims[target]
            a = torch.zeros(rank, d_in, dtype=torch.float32)
            b = torch.zeros(d_out, rank, dtype=torch.float32)
            at = 0
            for lora, scale in parts:
                pair = lora.layers[layer].get(target) if layer < len(lora.layers) else None
                if pair is not None:
                    a_i, b_i = pair  # A [r, d_in]; B already scaled and transposed, [r, d_out]
                    r = a_i.shape[0]
                    a[at:at + r] = a_i
                    b[:, at:at + r] = b_i.t() * scale
                at += lora.rank
            tensors[_key(layer, target, "A")] = a
            tensors[_key(layer, target, "B")] = b
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False}
    return config, tensors


def write_peft_folder(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `folder`, atomically: a reader
    sees the whole folder or none of it. An existing folder of that name is kept as it is (names
    hold the content hash, so it holds the same files)."""
    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        (work / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "adapter_model.safetensors"))
        for path in (work, *work.iterdir()):  # the remote may run as another user on a shared folder
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            work.rename(folder)
        except OSError:
            if not (folder / "adapter_model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
