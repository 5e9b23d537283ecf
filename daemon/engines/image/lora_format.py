"""Checking an image LoRA against the loaded pipeline before anyone tries to serve it.

Image adapters are diffusers LoRA files (`pytorch_lora_weights.safetensors`): keys such as
`unet.<module>.lora_A.weight` / `.lora_B.weight`, plus the older diffusers and kohya spellings that
diffusers itself converts. This module owns the pipeline's *shape index* (which module of which
component takes what, captured once before any adapter is injected, so validation never walks a
model another thread is changing) and `check_lora`, which turns a state dict into (rank, targets)
or a `ValueError` that a designer can act on. It also folds the LoRA scale that diffusers keeps in
a weight file's safetensors header into the matrices (`fold_header_alpha`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "LORA_METADATA_KEY",
    "ModuleShape",
    "ShapeIndex",
    "build_shape_index",
    "check_lora",
    "fold_header_alpha",
    "normalize_lora",
]

# The names diffusers uses for PEFT LoRA parameters once a file is converted.
_A, _B = "lora_A.weight", "lora_B.weight"
_EXTRA_SUFFIXES = ("lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight")
# Where diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=...)` and `save_lora_adapter`
# put each component's LoraConfig (JSON, keys prefixed "unet.", "text_encoder." ...).
LORA_METADATA_KEY = "lora_adapter_metadata"
_PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default, which diffusers gets when the header omits it


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


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    # PEFT's rule for rank_pattern / alpha_pattern keys: an exact name, else a regex matching the
    # end of the module path at a dot boundary; the first match wins.
    if module in patterns:
        return patterns[module]
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def fold_header_alpha(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """Scale each `lora_B` (and its bias) by the LoRA scale a diffusers file declares in its header.

    diffusers saves `r`, `lora_alpha`, `alpha_pattern` and `use_rslora` per component in the
    safetensors header (`header` is that file's `__metadata__`) and honours them when it loads the
    file by path, but not from a state dict, which is how adapters reach the pipeline here. Folding
    the scale (alpha / r, or alpha / sqrt(r) with rsLoRA) into B gives the same update B @ A * scale
    at scale 1, which is what diffusers uses for a state dict without alphas. Without that header
    the tensors come back as they are. Raises ValueError for a header diffusers could not read.
    """
    raw = header.get(LORA_METADATA_KEY)
    if not raw:
        return tensors
    try:
        flat = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ValueError(f"the file's '{LORA_METADATA_KEY}' header is not valid JSON: {exc}") from None
    if not isinstance(flat, dict):
        raise ValueError(f"the file's '{LORA_METADATA_KEY}' header must hold a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        configs.setdefault(component, {})[field] = value

    out = dict(tensors)
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        config = configs.get(component)
        suffix = next((s for s in (".lora_B.weight", ".lora_B.bias") if rest.endswith(s)), None)
        if config is None or suffix is None:
            continue
        module = rest[: -len(suffix)]
        a = tensors.get(f"{component}.{module}.lora_A.weight")
        if a is None or a.ndim < 1 or a.shape[0] == 0:
            continue  # check_lora reports the broken pair
        rank = int(a.shape[0])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"'{component}.lora_alpha' in the file's header is not a number: {alpha!r}") from None
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        if scale != 1.0:
            out[key] = value * scale
    return out
