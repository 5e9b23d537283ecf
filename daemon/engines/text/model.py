"""The transformer forward pass of the Llama / Qwen2 family over a flat batch of tokens.

One step runs every scheduled token of every sequence at once: decode tokens (one per sequence)
first, then prefill chunks. Linear layers see all tokens together ([T, hidden]); each targeted
projection adds its per-token LoRA update (`lora.lora_project`); attention reads and writes the
KV cache by (cache row, position). No per-sequence loop on the decode path.
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
from .lora import linear, lora_project
from .lora_plan import LoraBatch
from .lora_pool import GroupSlots, LoraSlotStorage

__all__ = ["KVCache", "PrefillChunk", "StepInput", "TextModel"]


class KVCache:
    """Keys and values of every layer: [rows, kv_heads, max_len, head_dim], one row per sequence."""

    def __init__(self, spec: ModelSpec, *, rows: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (rows, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.rows = rows
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def bytes_per_row(spec: ModelSpec, max_len: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * spec.num_kv_heads * max_len * spec.head_dim * itemsize


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, end) of the flat batch are prompt positions pos0.. of cache row `row`."""

    start: int
    end: int
    row: int
    pos0: int


@dataclass
class StepInput:
    """Everything one forward step needs, already on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    cache_rows: torch.Tensor  # [T]
    num_decode: int  # tokens [0, num_decode) are decode tokens, one per sequence
    decode_rows: torch.Tensor  # [D]
    decode_lens: torch.Tensor  # [D] context length including the new token
    max_decode_len: int
    prefill: list[PrefillChunk]
    logit_index: torch.Tensor  # [N] which tokens need next-token logits
    lora: LoraBatch
    decode_row_range: tuple[int, int] | None = None  # decode rows are exactly r0..r1-1, in order


@dataclass(frozen=True)
class _PackedPrefill:
    """Prompt chunks of one step padded into a [C, L] block, so attention is one call per layer
    (a Python loop over chunks costs more than the attention itself at game-sized prompts)."""

    q_index: torch.Tensor  # [C, L] flat token of each chunk position (padding repeats the chunk's first)
    rows: torch.Tensor  # [C] cache rows
    keys: int  # context length to read (longest chunk end)
    mask: torch.Tensor  # [C, 1, L, keys]: causal from each chunk's first position; padding sees key 0
    tokens: torch.Tensor  # [N] flat tokens of all chunks, in chunk order
    valid: torch.Tensor  # [N] their places in the flattened [C*L] block

    @staticmethod
    def build(chunks: list[PrefillChunk], device: torch.device, window: int | None) -> _PackedPrefill:
        lens = torch.tensor([c.end - c.start for c in chunks])
        width = int(lens.max())
        pos = torch.arange(width)
        starts = torch.tensor([c.start for c in chunks])
        pos0 = torch.tensor([c.pos0 for c in chunks])
        real = pos[None, :] < lens[:, None]  # [C, L]
        q_index = torch.where(real, starts[:, None] + pos[None, :], starts[:, None])
        keys = int((pos0 + lens).max())
        qpos = pos0[:, None] + pos[None, :]  # absolute position of each query
        key_pos = torch.arange(keys)[None, None, :]
        mask = key_pos <= qpos[:, :, None]
        if window is not None:  # a sliding window (Mistral): only the last `window` keys
            mask &= key_pos > qpos[:, :, None] - window
        mask &= real[:, :, None]
        mask[:, :, 0] |= ~real  # padding queries see key 0 (a row with no key at all gives NaN)
        valid = real.flatten().nonzero().squeeze(1)
        tokens = q_index.flatten()[valid]
        return _PackedPrefill(q_index.to(device), torch.tensor([c.row for c in chunks], device=device), keys,
                              mask[:, None].to(device), tokens.to(device), valid.to(device))


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
    """Weights of one base model, fused for speed (qkv, gate_up), and its forward step."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.kernels: Kernels = TorchKernels(device)  # the engine sets its choice (kernels.select_kernels)

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise UnsupportedModel(f"weight '{name}' is missing from the model files")
            return tensors.pop(name).to(device=device, dtype=dtype)

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        if "lm_head.weight" in tensors:
            self.lm_head = take("lm_head.weight")
        else:
            self.lm_head = self.embed  # tied embeddings
        self.layers: list[dict[str, torch.Tensor | None]] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            q, k, v = (take(p + f"self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj"))
            bias = None
            if p + "self_attn.q_proj.bias" in tensors:
                bias = torch.cat([take(p + f"self_attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj")])
            gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
            self.layers.append({
                "ln1": take(p + "input_layernorm.weight"),
                "qkv": torch.cat([q, k, v]).contiguous(),
                "qkv_bias": bias,
                "o": take(p + "self_attn.o_proj.weight"),
                "ln2": take(p + "post_attention_layernorm.weight"),
                "gate_up": torch.cat([gate, up]).contiguous(),
                "down": take(p + "mlp.down_proj.weight"),
            })
        inv_freq = torch.tensor(spec.rope_inv_freq(), dtype=torch.float64)
        self._inv_freq = inv_freq
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)
        self._ensure_rope(min(spec.max_position_embeddings, 4096))

    @classmethod
    def from_folder(cls, path: Path, *, device: torch.device, dtype: torch.dtype) -> TextModel:
        spec = ModelSpec.from_folder(path)
        return cls(spec, _load_tensors(path), device=device, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes of the base weights (the fused LoRA rows, views past them, are the pool's)."""
        tensors = [self.embed, self.norm, *(t for layer in self.layers for t in layer.values() if t is not None)]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _ensure_rope(self, length: int) -> None:
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
        so the base model costs no extra memory and base-only steps read exactly what they did."""
        params = self.layers[layer]
        weight = params[key]
        assert weight is not None
        out = weight.shape[0]
        fused = torch.zeros(out + rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        fused[:out].copy_(weight)
        params[key] = fused[:out]
        bias = params.get(key + "_bias")
        fused_bias = None
        if bias is not None:
            fused_bias = torch.cat([bias, torch.zeros(rows, device=bias.device, dtype=bias.dtype)])
        return fused, fused_bias

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: KVCache, slots: LoraSlotStorage | None) -> torch.Tensor:
        """Run one step; returns float32 logits [N, vocab] for the tokens in `step.logit_index`."""
        spec = self.spec
        self._ensure_rope(cache.max_len)
        t = step.input_ids.shape[0]
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        qs, kvs = spec.q_size, spec.kv_size
        cos, sin = self._cos[step.positions], self._sin[step.positions]  # [T, D]
        lora = step.lora if slots is not None else LoraBatch(mode="none")
        d = step.num_decode
        h = self.embed[step.input_ids]
        kernels = self.kernels
        packs: dict[int | None, _PackedPrefill] = {}  # one per window size the layers use
        for i, layer in enumerate(self.layers):
            window = spec.window(i)
            if len(step.prefill) > 1 and window not in packs:
                packs[window] = _PackedPrefill.build(step.prefill, h.device, window)
            packed = packs.get(window)
            groups: dict[str, GroupSlots] = slots.groups[i] if slots is not None else {}
            x = self._rms_norm(h, layer["ln1"])  # type: ignore[arg-type]
            qkv = lora_project(x, layer["qkv"], layer["qkv_bias"], groups.get("qkv"), lora, kernels)  # type: ignore[arg-type]
            q, k = kernels.rope_qk(qkv, cos, sin, nh, nkv, hd)
            v = qkv[:, qs + kvs:qs + 2 * kvs].view(t, nkv, hd)
            kc, vc = cache.k[i], cache.v[i]
            kc[step.cache_rows, :, step.positions] = k
            vc[step.cache_rows, :, step.positions] = v
            attn = torch.empty(t, nh, hd, device=h.device, dtype=h.dtype)
            if d:
                n = step.max_decode_len
                if step.decode_row_range is not None:  # a view: no copy of the cache
                    r0, r1 = step.decode_row_range
                    keys, values = kc[r0:r1, :, :n], vc[r0:r1, :, :n]
                else:
                    keys, values = kc[step.decode_rows, :, :n], vc[step.decode_rows, :, :n]
                key_pos = torch.arange(n, device=h.device)[None, :]
                mask = key_pos < step.decode_lens[:, None]
                if window is not None:
                    mask &= key_pos >= step.decode_lens[:, None] - window
                out = F.scaled_dot_product_attention(
                    q[:d].unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], enable_gqa=nkv != nh)
                attn[:d] = out.squeeze(2)
            if packed is not None:  # several prompt chunks: one attention call for all of them
                qc = q[packed.q_index].transpose(1, 2)  # [C, heads, L, D]
                keys, values = kc[packed.rows, :, :packed.keys], vc[packed.rows, :, :packed.keys]
                out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=packed.mask, enable_gqa=nkv != nh)
                attn[packed.tokens] = out.transpose(1, 2).reshape(-1, nh, hd)[packed.valid]
            for c in step.prefill if packed is None else ():
                end = c.pos0 + (c.end - c.start)
                keys = kc[c.row, :, :end].unsqueeze(0)
                values = vc[c.row, :, :end].unsqueeze(0)
                qc = q[c.start:c.end].transpose(0, 1).unsqueeze(0)
                if c.pos0 == 0 and (window is None or end <= window):
                    out = F.scaled_dot_product_attention(qc, keys, values, is_causal=True, enable_gqa=nkv != nh)
                else:
                    qpos = torch.arange(c.pos0, end, device=h.device)[:, None]
                    key_pos = torch.arange(end, device=h.device)[None, :]
                    mask = key_pos <= qpos
                    if window is not None:
                        mask &= key_pos > qpos - window
                    out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, enable_gqa=nkv != nh)
                attn[c.start:c.end] = out.squeeze(0).transpose(0, 1)
            attn2 = attn.view(t, qs)
            h = lora_project(attn2, layer["o"], None, groups.get("o"), lora, kernels, residual=h)  # type: ignore[arg-type]
            x = self._rms_norm(h, layer["ln2"])  # type: ignore[arg-type]
            gu = lora_project(x, layer["gate_up"], None, groups.get("gate_up"), lora, kernels)  # type: ignore[arg-type]
            inter = spec.intermediate_size
            act = F.silu(gu[:, :inter]) * gu[:, inter:2 * inter]
            h = lora_project(act, layer["down"], None, groups.get("down"), lora, kernels, residual=h)  # type: ignore[arg-type]
        last = self._rms_norm(h[step.logit_index], self.norm)
        return linear(last, self.lm_head).float()  # the vocab projection: 9 vs 20 ms for 8 rows on 2 cores
