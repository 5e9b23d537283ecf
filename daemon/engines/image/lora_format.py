"""Checking an image LoRA against the loaded pipeline before anyone tries to serve it.

Image adapters are diffusers LoRA files (`pytorch_lora_weights.safetensors`): keys such as
`unet.<module>.lora_A.weight` / `.lora_B.weight`, plus the older diffusers and kohya spellings that
diffusers itself converts. This module owns the pipeline's *shape index* (which module of which
component takes what, captured once before any adapter is injected, so validation never walks a
model another thread is changing) and `check_lora`, which turns a state dict into (rank, targets)
or a `ValueError` that a designer can act on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModuleShape", "ShapeIndex", "build_shape_index", "check_lora", "normalize_lora"]

# The names diffusers uses for PEFT LoRA parameters once a file is converted.
_A, _B = "lora_A.weight", "lora_B.weight"
_EXTRA_SUFFIXES = ("lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight")


@dataclass(frozen=True)
class ModuleShape:
    """What a LoRA on one module must look like."""

    kind: str  # "linear" or "conv"
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()


ShapeIndex = dict[str, dict[str, ModuleShape]]  # component -> module path -> shape


def build_shape_index(pipe: Any) -> ShapeIndex:
    """Record every LoRA-capable module of the pipeline's LoRA-loadable components."""
    index: ShapeIndex = {}
    for component in getattr(pipe, "_lora_loadable_modules", ()):
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        shapes: dict[str, ModuleShape] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[name] = ModuleShape("linear", module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                shapes[name] = ModuleShape("conv", module.in_channels, module.out_channels, tuple(module.kernel_size))
        index[component] = shapes
    return index


def normalize_lora(
    pipe_cls: Any, tensors: Mapping[str, torch.Tensor], unet_config: Any = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Split a LoRA file into components with PEFT-style keys, the way diffusers will read it.

    Returns {component: {"<module>.lora_A.weight": tensor, ...}}. Raises ValueError when the
    file is not something diffusers can read as a LoRA.
    """
    import importlib

    convert: Any = importlib.import_module("diffusers.utils.state_dict_utils")

    lora_keys = [k for k in tensors if "lora" in k]
    if not lora_keys:
        examples = ", ".join(sorted(tensors)[:3]) or "none"
        raise ValueError(
            "not a LoRA: no LoRA matrices in the file (keys such as 'unet.<module>.lora_A.weight' "
            f"are expected; found {examples})"
        )
    kwargs: dict[str, Any] = {}
    if unet_config is not None:
        kwargs["unet_config"] = unet_config
    try:
        state_dict, _alphas = pipe_cls.lora_state_dict(dict(tensors), **kwargs)
    except Exception as exc:  # diffusers raises many types for files it cannot map
        raise ValueError(f"diffusers cannot read this LoRA: {exc}") from exc
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise ValueError(f"not a pure LoRA: {len(not_lora)} tensors are full weights, e.g. '{not_lora[0]}'")

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    for component, sd in list(parts.items()):
        if any(_A in k or _B in k for k in sd):
            continue
        # Older diffusers spellings (lora.down/up, lora_linear_layer, to_q_lora): let diffusers map them.
        if component.startswith("text_encoder"):
            parts[component] = convert.convert_state_dict_to_peft(convert.convert_state_dict_to_diffusers(sd))
        else:
            parts[component] = convert.convert_unet_state_dict_to_peft(sd)
    return parts


def _target_name(module_path: str) -> str:
    # "...attn1.to_out.0" -> "to_out.0": the name a designer would put in target_modules.
    bits = module_path.split(".")
    if len(bits) >= 2 and bits[-1].isdigit():
        return ".".join(bits[-2:])
    return bits[-1]


def check_lora(
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    index: ShapeIndex,
    *,
    max_rank: int,
) -> tuple[int, tuple[str, ...]]:
    """Check normalized LoRA matrices against the pipeline; return (rank, target module names)."""
    if not index:
        raise ValueError("this image model does not accept LoRA adapters")
    rank = 0
    targets: set[str] = set()
    modules = 0
    for component, sd in parts.items():
        shapes = index.get(component)
        if shapes is None:
            raise ValueError(
                f"the LoRA patches '{component}', which this model does not have "
                f"(it has {', '.join(sorted(index))}); was it made for another model family?"
            )
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in sd.items():
            if key.endswith("." + _A):
                pairs.setdefault(key[: -len(_A) - 1], {})["A"] = value
            elif key.endswith("." + _B):
                pairs.setdefault(key[: -len(_B) - 1], {})["B"] = value
            elif key.endswith(_EXTRA_SUFFIXES) or key.endswith(".alpha"):
                continue
            else:
                raise ValueError(f"unexpected tensor '{component}.{key}' in a LoRA file")
        for path, ab in pairs.items():
            where = f"{component}.{path}"
            if "A" not in ab or "B" not in ab:
                raise ValueError(f"'{where}' has only one of the two LoRA matrices (lora_A, lora_B)")
            shape = shapes.get(path)
            if shape is None:
                raise ValueError(
                    f"'{where}' does not exist in this model's {component}; the LoRA was made for a different model"
                )
            a, b = ab["A"], ab["B"]
            if not (a.is_floating_point() and b.is_floating_point()):
                raise ValueError(f"'{where}' holds {a.dtype}/{b.dtype} tensors; LoRA matrices are floats")
            r = int(a.shape[0]) if a.ndim >= 1 else 0
            if shape.kind == "linear":
                ok = a.ndim == 2 and b.ndim == 2 and a.shape[1] == shape.in_features
                ok = ok and b.shape[0] == shape.out_features and b.shape[1] == r
                want = f"A [r, {shape.in_features}] and B [{shape.out_features}, r]"
            else:
                ok = a.ndim == 4 and b.ndim == 4 and a.shape[1] == shape.in_features
                ok = ok and b.shape[0] == shape.out_features and b.shape[1] == r
                want = f"A [r, {shape.in_features}, kh, kw] and B [{shape.out_features}, r, 1, 1]"
            if not ok or r == 0:
                raise ValueError(
                    f"'{where}' has shapes A {list(a.shape)} and B {list(b.shape)}, but this model "
                    f"needs {want}; the LoRA was made for a different model"
                )
            if r > max_rank:
                raise ValueError(f"'{where}' has rank {r}, above the limit of {max_rank}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"'{where}' contains NaN or infinite values")
            rank = max(rank, r)
            targets.add(_target_name(path))
            modules += 1
    if modules == 0:
        raise ValueError("the file holds no complete LoRA matrix pair")
    return rank, tuple(sorted(targets))
