"""Parsing and validating PEFT LoRA adapters against a loaded base model.

Input: adapter_config.json (as a dict) and the tensors of adapter_model.safetensors. Output: a
`PreparedLora` with B transposed and alpha/r (or alpha/sqrt(r) for rsLoRA) folded in, or a
`ValueError` whose message says exactly what is wrong, in words a designer can act on.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from .config import LORA_TARGETS, ModelSpec
from .lora_pool import PreparedLora

__all__ = ["prepare_peft_lora"]

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out weights",
}


def _pattern_value(patterns: dict[str, Any], layer: int, target: str, default: float) -> float:
    # PEFT matches rank/alpha patterns against the end of the module's name.
    name = f"layers.{layer}.{target}"
    for key, value in patterns.items():
        if name.endswith(key) or target == key or re.search(key, name):
            return float(value)
    return default


def prepare_peft_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], spec: ModelSpec,
                      *, max_rank: int) -> PreparedLora:
    """Validate a PEFT LoRA for `spec` and turn it into slot-ready matrices."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"not a LoRA adapter (peft_type is '{config.get('peft_type')}', expected 'LORA')")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise ValueError(f"{what} is not supported; retrain without it")
    if config.get("modules_to_save"):
        raise ValueError(f"modules_to_save ({config['modules_to_save']}) is not supported: only LoRA "
                         f"matrices on {', '.join(LORA_TARGETS)} can be served per request")
    if str(config.get("bias", "none")) != "none":
        raise ValueError(f"trained biases (bias='{config['bias']}') are not supported")
    if not tensors:
        raise ValueError("the adapter has no tensors")

    dims = spec.target_dims()
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            what = key.split(".lora_")[0].rsplit(".", 1)[-1] if ".lora_" in key else key
            raise ValueError(f"unsupported tensor '{key}': loraloom serves LoRA on "
                             f"{', '.join(LORA_TARGETS)} only (found target '{what}')")
        layer, _group, target, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if target not in dims:
            raise ValueError(f"unknown target module '{target}' in '{key}' (supported: {', '.join(LORA_TARGETS)})")
        if layer >= spec.num_layers:
            raise ValueError(f"'{key}' is for layer {layer}, but the base model has {spec.num_layers} layers")
        pairs.setdefault((layer, target), {})[ab] = value

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(spec.num_layers)]
    max_seen = 0
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "B" not in ab else "lora_A"
            raise ValueError(f"layer {layer} {target} has no {missing} weight")
        a, b = ab["A"], ab["B"]
        d_in, d_out = dims[target]
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"layer {layer} {target}: LoRA weights must be matrices")
        r = a.shape[0]
        if a.shape[1] != d_in or b.shape != (d_out, r):
            raise ValueError(
                f"layer {layer} {target}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit this "
                f"base model (expected [r, {d_in}] / [{d_out}, r]): was the adapter trained for another model?"
            )
        if r > max_rank:
            raise ValueError(f"rank {r} (layer {layer} {target}) is above this daemon's maximum of {max_rank}")
        expected_r = int(_pattern_value(rank_pattern, layer, target, r_default))
        if expected_r != r:
            raise ValueError(f"layer {layer} {target} has rank {r}, but adapter_config.json says {expected_r}")
        alpha = _pattern_value(alpha_pattern, layer, target, alpha_default)
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        a32, b32 = a.float(), b.float()
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise ValueError(f"layer {layer} {target} holds NaN or infinite values")
        layers[layer][target] = (a32.contiguous(), (b32.t() * scaling).contiguous())
        max_seen = max(max_seen, r)
    targets = tuple(t for t in LORA_TARGETS if any(t in layer for layer in layers))
    return PreparedLora(rank=max_seen, targets=targets, layers=tuple(layers))
