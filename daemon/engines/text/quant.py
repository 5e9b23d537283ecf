"""Weight-only quantized base weights: one layout for every format, its dequantization and matmul.

A quantized projection is a `QuantWeight`: codes for W [out, in] plus one scale (and for int4 one
zero point) per group of `group` consecutive input columns of each output row:

    W[o, i] = (q[o, i] - zero[o, i // group]) * scale[o, i // group]        (int8, fp8: zero = 0)

- int4: two codes per byte along the input dim (column 2k in the low nibble, 2k+1 in the high one),
  zero points as bytes. AWQ and GPTQ checkpoints are repacked into this when they load
  (`quant_formats`); `--quantize int4` builds it by round-to-nearest, asymmetric, group 128.
- int8: int8 codes, symmetric, one scale per output row (per-channel).
- fp8: float8 e4m3 codes, one scale per group of 128 inputs.

The matmul dequantizes group-wise into the compute dtype, a block of output rows at a time, then
multiplies: correct on any device, and on CUDA it records into graphs like any other op (no host
syncs, no data-dependent shapes). `dequantize(torch.float32)` is the reference every path is held to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .config import UnsupportedModel

__all__ = ["QUANTIZE_KINDS", "QuantKind", "QuantWeight", "Weight", "cat_weights", "choose_group", "fp8_dtype",
           "planned_nbytes", "quantize_rtn", "weight_nbytes"]

QuantKind = Literal["int4", "int8", "fp8"]
QUANTIZE_KINDS: tuple[QuantKind, ...] = ("int8", "int4", "fp8")
GROUP = 128  # inputs per scale for int4 and fp8 (the AWQ/GPTQ checkpoints' own group size)
_BLOCK_ELEMENTS = 1 << 24  # dequantize at most this many weights at once (64 MB in float32)
_FP8_MAX = 448.0  # the largest finite float8 e4m3 value


def fp8_dtype() -> torch.dtype:
    """torch's float8 e4m3 dtype, or a clear refusal where this torch has none."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise UnsupportedModel(f"quantize 'fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")
    return dtype


@dataclass
class QuantWeight:
    """A quantized weight [out_features, in_features] (see the module docstring for the layout)."""

    kind: QuantKind
    codes: torch.Tensor  # int4: uint8 [out, in // 2]; int8: int8 [out, in]; fp8: float8 [out, in]
    scales: torch.Tensor  # [out, in // group], the compute dtype
    zeros: torch.Tensor | None  # int4: uint8 [out, in // group]; else None
    group: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def nbytes(self) -> int:
        tensors = [self.codes, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> QuantWeight:
        zeros = None if self.zeros is None else self.zeros.to(device)
        return QuantWeight(self.kind, self.codes.to(device), self.scales.to(device), zeros, self.group,
                           self.in_features)

    def dequantize(self, dtype: torch.dtype, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Output rows [lo, hi) as a dense [rows, in] tensor of `dtype`."""
        hi = self.out_features if hi is None else hi
        codes = self.codes[lo:hi]
        rows = hi - lo
        if self.kind == "int4":
            q = torch.stack([codes & 0xF, codes >> 4], dim=-1).view(rows, self.in_features).to(dtype)
        else:
            q = codes.to(dtype)
        q = q.view(rows, -1, self.group)
        if self.zeros is not None:
            q = q - self.zeros[lo:hi].to(dtype).unsqueeze(-1)
        return (q * self.scales[lo:hi].to(dtype).unsqueeze(-1)).view(rows, self.in_features)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `index` dequantized, [len(index), in]: a quantized embedding table's lookup."""
        zeros = None if self.zeros is None else self.zeros[index]
        return QuantWeight(self.kind, self.codes[index], self.scales[index], zeros, self.group,
                           self.in_features).dequantize(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] @ W^T (+ bias): [T, out] in x's dtype, dequantizing a block of rows at a time."""
        step = max(1, _BLOCK_ELEMENTS // self.in_features)
        out = self.out_features
        if out <= step:
            return F.linear(x, self.dequantize(x.dtype), bias)
        parts = [F.linear(x, self.dequantize(x.dtype, lo, min(lo + step, out)),
                          None if bias is None else bias[lo:lo + step]) for lo in range(0, out, step)]
        return torch.cat(parts, dim=1)

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Weights with the same inputs stacked along the outputs (q/k/v, gate/up)."""
        first = parts[0]
        if any((p.kind, p.group, p.in_features) != (first.kind, first.group, first.in_features) for p in parts):
            raise UnsupportedModel("projections that share an input are quantized differently "
                                   f"({sorted({(p.kind, p.group) for p in parts})}); loraloom fuses them")
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts if p.zeros is not None])
        return QuantWeight(first.kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           zeros, first.group, first.in_features)


Weight = torch.Tensor | QuantWeight  # a projection's base weight, dense or quantized


def weight_nbytes(weight: Weight) -> int:
    if isinstance(weight, QuantWeight):
        return weight.nbytes()
    return weight.numel() * weight.element_size()


def planned_nbytes(out_features: int, in_features: int, kind: QuantKind | None, itemsize: int) -> int:
    """Bytes one projection's weight will hold in a format (what `QuantWeight.nbytes` counts once it
    is loaded), for planning memory before loading: dense, or codes plus scales of `itemsize` (the
    compute dtype's) plus int4's one-byte zero points. AWQ and GPTQ load as int4 in groups of 128."""
    if kind is None:
        return out_features * in_features * itemsize
    groups = out_features * (in_features // choose_group(in_features, kind))
    codes = out_features * in_features // (2 if kind == "int4" else 1)
    return codes + groups * itemsize + (groups if kind == "int4" else 0)


def cat_weights(parts: list[Weight], dtype: torch.dtype) -> Weight:
    """Fuse projections that read one input; a checkpoint that left some of them unquantized
    (AWQ's modules_to_not_convert) has the others dequantized, so that one matmul still serves."""
    if all(isinstance(p, QuantWeight) for p in parts):
        return QuantWeight.cat([p for p in parts if isinstance(p, QuantWeight)])
    dense = [p.dequantize(dtype) if isinstance(p, QuantWeight) else p for p in parts]
    return torch.cat(dense).contiguous()


def choose_group(in_features: int, kind: QuantKind) -> int:
    """Inputs per scale: int8 per output row; int4/fp8 128, or the largest of 64/32 that divides the
    input width (SmolLM2's 576), else per row."""
    if kind == "int8":
        return in_features
    return next((g for g in (GROUP, 64, 32) if in_features % g == 0), in_features)


def quantize_rtn(weight: torch.Tensor, kind: QuantKind, dtype: torch.dtype, group: int | None = None) -> QuantWeight:
    """Round-to-nearest weight-only quantization of a dense [out, in] weight (math in float32, on
    the weight's device); scales are kept in `dtype`, the compute dtype."""
    out, inp = weight.shape
    group = choose_group(inp, kind) if group is None else group
    if inp % group:
        raise UnsupportedModel(f"a weight with {inp} inputs cannot take groups of {group}")
    w = weight.float().view(out, inp // group, group)
    zeros = None
    if kind == "int4":  # asymmetric: [min, max] of each group onto 0..15
        lo, hi = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(dtype).float()
        zero = (-lo / scale).round().clamp(0, 15)
        q = (w / scale.unsqueeze(-1)).round().add(zero.unsqueeze(-1)).clamp(0, 15).to(torch.uint8).view(out, inp)
        codes = q[:, 0::2] | (q[:, 1::2] << 4)
        zeros = zero.to(torch.uint8)
    elif kind == "int8":  # symmetric
        scale = (w.abs().amax(-1) / 127).clamp(min=1e-8).to(dtype).float()
        codes = (w / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8).view(out, inp)
    elif kind == "fp8":
        scale = (w.abs().amax(-1) / _FP8_MAX).clamp(min=1e-12).to(dtype).float()
        codes = (w / scale.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX).to(fp8_dtype()).view(out, inp)
    else:
        raise UnsupportedModel(f"unknown quantization '{kind}' (supported: {', '.join(QUANTIZE_KINDS)})")
    return QuantWeight(kind, codes.contiguous(), scale.to(dtype).contiguous(), zeros, group, inp)
