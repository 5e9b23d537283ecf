"""Reading a Hugging Face model folder's config.json into the few numbers the engine needs.

Owns the list of supported architectures; anything else is refused with a clear error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LORA_TARGETS", "SUPPORTED_ARCHITECTURES", "ModelSpec", "UnsupportedModel"]

# model_type -> family. Mistral and the Llama variants share one implementation.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModel(ValueError):
    """The folder holds a model this engine cannot run."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer of the Llama or Qwen2 family."""

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # each query sees only the last `sliding_window` keys (Mistral v0.1)
    window_layers: tuple[bool, ...] = ()  # which layers the window applies to (empty: all; Qwen2 windows some)

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None where it attends to every earlier key."""
        if self.sliding_window is None or (self.window_layers and not self.window_layers[layer]):
            return None
        return self.sliding_window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def target_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def num_parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.target_dims().values()) + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + self.hidden_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, name: str = "model",
                  generation_config: dict[str, Any] | None = None) -> ModelSpec:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = ", ".join(cfg.get("architectures") or []) or "unknown"
            raise UnsupportedModel(
                f"unsupported model architecture '{model_type}' ({archs}); loraloom runs the Llama "
                "family (Llama 2/3, Mistral, SmolLM2, TinyLlama) and Qwen2/Qwen2.5"
            )
        family = SUPPORTED_ARCHITECTURES[model_type]
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        # transformers v5 writes rope settings under rope_parameters; v4 used rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = dict(cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"unsupported RoPE scaling '{rope_type}' (supported: default, linear, llama3)")
        scaling = {**scaling, **{k: v for k, v in rope.items() if k != "rope_theta"}, "rope_type": rope_type}
        window = cfg.get("sliding_window")
        layers = int(cfg["num_hidden_layers"])
        windowed: tuple[bool, ...] = ()
        if family == "qwen2" and not cfg.get("use_sliding_window"):
            window = None  # Qwen2 configs name a window they do not use unless asked to
        layer_types = cfg.get("layer_types")
        if layer_types:  # transformers v5 writes each layer's attention kind
            unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
            if unknown:
                raise UnsupportedModel(f"unsupported attention layer types {unknown} "
                                       "(supported: full_attention, sliding_attention)")
            if len(layer_types) != layers:
                raise UnsupportedModel(f"layer_types names {len(layer_types)} layers, the model has {layers}")
            windowed = tuple(t == "sliding_attention" for t in layer_types)
        elif window and family == "qwen2":  # layers from max_window_layers on use the window
            first = int(cfg.get("max_window_layers", layers))
            windowed = tuple(i >= first for i in range(layers))
        if window and windowed and not any(windowed):
            window, windowed = None, ()
        eos: list[int] = []
        for source in (cfg, generation_config or {}):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                eos.append(value)
            elif isinstance(value, list):
                eos.extend(int(v) for v in value)
        return cls(
            name=name,
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; the loader also trusts the weights it finds.
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            sliding_window=int(window) if window else None,
            window_layers=windowed if window else (),
        )

    @classmethod
    def from_folder(cls, path: Path) -> ModelSpec:
        config_path = path / "config.json"
        if not config_path.exists():
            raise UnsupportedModel(f"{path} has no config.json: not a Hugging Face model folder")
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else None
        return cls.from_dict(cfg, name=path.name, generation_config=gen)

    def rope_inv_freq(self) -> list[float]:
        """Inverse frequencies of RoPE after this model's scaling (default, linear or llama3)."""
        d = self.head_dim
        inv = [1.0 / (self.rope_theta ** (2 * i / d)) for i in range(d // 2)]
        kind = self.rope_scaling.get("rope_type", "default")
        if kind == "linear":
            factor = float(self.rope_scaling.get("factor", 1.0))
            inv = [f / factor for f in inv]
        elif kind == "llama3":
            factor = float(self.rope_scaling["factor"])
            low = float(self.rope_scaling.get("low_freq_factor", 1.0))
            high = float(self.rope_scaling.get("high_freq_factor", 4.0))
            old_ctx = float(self.rope_scaling.get("original_max_position_embeddings", 8192))
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            out = []
            for f in inv:
                wavelen = 2 * math.pi / f
                if wavelen < high_wavelen:
                    out.append(f)
                elif wavelen > low_wavelen:
                    out.append(f / factor)
                else:
                    smooth = (old_ctx / wavelen - low) / (high - low)
                    out.append((1 - smooth) * f / factor + smooth * f)
            inv = out
        return inv
