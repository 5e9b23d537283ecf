"""The transformer forward pass of the Llama / Qwen2 family over a flat batch of tokens.

One step runs every scheduled token of every sequence at once: decode tokens (one per sequence)
first, then prompt chunks. Linear layers see all tokens together ([T, hidden]); each targeted
projection adds its per-token LoRA update (`lora.lora_project`); keys and values go to each
token's slot of the paged cache and attention reads them through block tables (`kv`). No
per-sequence loop anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .config import ModelSpec, UnsupportedModel
from .kernels import Kernels, TorchKernels
from .kv import PagedKV, PrefillChunk, PrefillPack, decode_attention, gather_index, prefill_attention
from .lora import lora_project
from .lora_plan import LoraBatch
from .lora_pool import GroupSlots, LoraSlotStorage
from .quant import QuantWeight, Weight, cat_weights, weight_nbytes
from .quant_formats import DENSE, QuantScheme, load_linear, scheme_for

__all__ = ["StepInput", "TextModel"]


@dataclass
class StepInput:
    """Everything one forward step needs, already on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] the KV slot each token's keys and values go to
    num_decode: int  # tokens [0, num_decode) are decode tokens, one per sequence
    decode_tables: torch.Tensor  # [D, W] their block tables
    decode_lens: torch.Tensor  # [D] context length including the new token
    decode_index: torch.Tensor | None  # [D, L] the slots of their positions, for the PyTorch attention
    prefill: list[PrefillChunk]
    prefill_tables: torch.Tensor | None  # [C, W] block tables of the chunks' sequences
    logit_index: torch.Tensor  # [N] which tokens need next-token logits
    lora: LoraBatch
    prefill_meta: torch.Tensor | None = None  # [C, 3] each chunk's first flat token, token count, first position
    prefill_longest: int = 0  # the most tokens of one chunk (a bound for kernels' grids)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    if not files:
        raise UnsupportedModel(f"{path} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = handle.get_tensor(key)
    return tensors


class TextModel:
    """Weights of one base model, fused for speed (qkv, gate_up), and its forward step.

    The projections' weights are dense tensors, or `quant.QuantWeight`s where the folder is an AWQ
    or GPTQ checkpoint or the engine quantizes at load (`scheme`); everything else stays dense."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, scheme: QuantScheme = DENSE) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.scheme = scheme
        self.kernels: Kernels = TorchKernels(device)  # the engine sets its choice (kernels.select_kernels)

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise UnsupportedModel(f"weight '{name}' is missing from the model files")
            return tensors.pop(name).to(device=device, dtype=dtype)

        # Quantizing at load takes the embedding table and an untied head too (each 1 GiB of an 8B model
        # in bf16): rows are dequantized as they are looked up.
        self.embed: Weight = (take("model.embed_tokens.weight") if scheme.head_kind is None else
                              load_linear(tensors, "model.embed_tokens.", scheme, device=device, dtype=dtype))
        self.norm = take("model.norm.weight")
        self.lm_head: Weight = self.embed  # tied embeddings, unless the files hold a head
        if "lm_head.weight" in tensors or "lm_head.qweight" in tensors:  # GPTQModel may quantize the head
            quantized_head = "lm_head.qweight" in tensors or scheme.head_kind is not None
            self.lm_head = load_linear(tensors, "lm_head.", scheme if quantized_head else DENSE,
                                       device=device, dtype=dtype)

        def proj(name: str) -> Weight:
            return load_linear(tensors, name + ".", scheme, device=device, dtype=dtype)

        self.layers: list[dict[str, Weight | None]] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = [proj(p + f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")]
            bias = None
            if p + "self_attn.q_proj.bias" in tensors:
                bias = torch.cat([take(p + f"self_attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj")])
            gate_up = [proj(p + "mlp.gate_proj"), proj(p + "mlp.up_proj")]
            self.layers.append({
                "ln1": take(p + "input_layernorm.weight"),
                "qkv": cat_weights(qkv, dtype),
                "qkv_bias": bias,
                "o": proj(p + "self_attn.o_proj"),
                "ln2": take(p + "post_attention_layernorm.weight"),
                "gate_up": cat_weights(gate_up, dtype),
                "down": proj(p + "mlp.down_proj"),
            })
        inv_freq = torch.tensor(spec.rope_inv_freq(), dtype=torch.float64)
        self._inv_freq = inv_freq
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)
        self.ensure_rope(min(spec.max_position_embeddings, 4096))

    @classmethod
    def from_folder(cls, path: Path, *, device: torch.device, dtype: torch.dtype,
                    quantize: str | None = None) -> TextModel:
        """Load a folder (dense, AWQ or GPTQ); `quantize` (int8 | int4 | fp8) quantizes a dense one."""
        spec = ModelSpec.from_folder(path)
        scheme = scheme_for(path, quantize)
        return cls(spec, _load_tensors(path), device=device, dtype=dtype, scheme=scheme)

    def nbytes(self) -> int:
        """Bytes of the base weights (the fused LoRA rows, views past them, are the pool's)."""
        weights: list[Weight] = [self.embed, self.norm,
                                 *(t for layer in self.layers for t in layer.values() if t is not None)]
        if self.lm_head is not self.embed:
            weights.append(self.lm_head)
        return sum(weight_nbytes(w) for w in weights)

    def ensure_rope(self, length: int) -> None:
        """RoPE tables for positions up to `length` (the engine asks for its context once)."""
        if length <= self._rope_len:
            return
        pos = torch.arange(length, dtype=torch.float64)
        freqs = torch.outer(pos, self._inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos = emb.cos().to(device=self.device, dtype=torch.float32)
        self._sin = emb.sin().to(device=self.device, dtype=torch.float32)
        self._rope_len = length

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, weight, self.spec.rms_norm_eps)

    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append `rows` zero rows to weight `key` of a layer (LoRA A's go there: see `lora.GroupSlots`).

        Returns the fused weight and bias; the layer's own weight becomes a view of its first rows,
        so the base model costs no extra memory and base-only steps read exactly what they did.
        A quantized weight cannot take rows: the A rows get a tensor of their own (and no bias)."""
        params = self.layers[layer]
        weight = params[key]
        assert weight is not None
        if isinstance(weight, QuantWeight):
            return torch.zeros(rows, weight.in_features, device=self.device, dtype=self.dtype), None
        out = weight.shape[0]
        fused = torch.zeros(out + rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        fused[:out].copy_(weight)
        params[key] = fused[:out]
        bias = params.get(key + "_bias")
        assert not isinstance(bias, QuantWeight)
        fused_bias = None
        if bias is not None:
            fused_bias = torch.cat([bias, torch.zeros(rows, device=bias.device, dtype=bias.dtype)])
        return fused, fused_bias

    @torch.inference_mode()
    def forward(self, step: StepInput, kv: PagedKV, slots: LoraSlotStorage | None) -> torch.Tensor:
        """Run one step; returns float32 logits [N, vocab] for the tokens in `step.logit_index`."""
        self.kernels.begin_forward()
        spec = self.spec
        t = step.input_ids.shape[0]
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        qs = spec.q_size
        cos, sin = self._cos[step.positions], self._sin[step.positions]  # [T, D]
        lora = step.lora if slots is not None else LoraBatch(mode="none")
        d = step.num_decode
        h = (self.embed.rows(step.input_ids, self.dtype) if isinstance(self.embed, QuantWeight)
             else self.embed[step.input_ids])
        kernels = self.kernels
        chunks = step.prefill
        # A lone prompt chunk with nothing before it attends to itself only (flash attention, no gather).
        alone = len(chunks) == 1 and chunks[0].pos0 == 0
        packs: dict[int | None, PrefillPack] = {}  # one per window size the layers use
        # Each layer's attention output, one buffer for all (the o projection reads it before the next
        # layer writes): zeros, not garbage, in rows no attention writes (a graph's padding tokens), and
        # every layer writes the same rows, so one memset a step instead of one a layer.
        attn = torch.zeros(t, nh, hd, device=h.device, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            window = spec.window(i)
            groups: dict[str, GroupSlots] = slots.groups[i] if slots is not None else {}
            x = self._rms_norm(h, layer["ln1"])  # type: ignore[arg-type]
            qkv = lora_project(x, layer["qkv"], layer["qkv_bias"], groups.get("qkv"), lora, kernels)  # type: ignore[arg-type]
            q, k, v = kernels.rope_write(qkv, cos, sin, nh, nkv, hd, kv, i, step.slots)
            if d:
                out = kernels.paged_decode(q[:d], kv, i, step.decode_tables, step.decode_lens, window)
                if out is None:
                    index = step.decode_index
                    if index is None:  # the kernel gave up (logged): gather after all
                        index = gather_index(step.decode_tables, int(step.decode_lens.max()), kv.block_size)
                    out = decode_attention(q[:d], kv, i, index, step.decode_lens, window)
                attn[:d] = out
            c0 = chunks[0] if chunks else None
            if c0 is not None and step.prefill_meta is not None and step.prefill_tables is not None and \
                    kernels.paged_prefill(q, kv, i, step.prefill_tables, step.prefill_meta, attn, window,
                                          step.prefill_longest):
                pass  # written into `attn` from the paged cache
            elif c0 is not None and alone and (window is None or c0.end - c0.start <= window):
                qc, kc, vc = (x[c0.start:c0.end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
                out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=nkv != nh)
                attn[c0.start:c0.end] = out.squeeze(0).transpose(0, 1)
            elif chunks:
                if window not in packs:
                    assert step.prefill_tables is not None
                    packs[window] = PrefillPack.build(chunks, step.prefill_tables, kv.block_size, window)
                pack = packs[window]
                attn[pack.tokens] = prefill_attention(q, kv, i, pack)
            attn2 = attn.view(t, qs)
            h = lora_project(attn2, layer["o"], None, groups.get("o"), lora, kernels, residual=h)  # type: ignore[arg-type]
            x = self._rms_norm(h, layer["ln2"])  # type: ignore[arg-type]
            gu = lora_project(x, layer["gate_up"], None, groups.get("gate_up"), lora, kernels)  # type: ignore[arg-type]
            inter = spec.intermediate_size
            act = kernels.silu_mul(gu, inter)
            h = lora_project(act, layer["down"], None, groups.get("down"), lora, kernels, residual=h)  # type: ignore[arg-type]
        last = self._rms_norm(h[step.logit_index], self.norm)
        return kernels.linear(last, self.lm_head).float()  # the vocab projection: 9 vs 20 ms for 8 rows on 2 cores
