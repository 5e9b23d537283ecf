"""The kernel registry: which code computes RMSNorm, RoPE and the dense LoRA projection, chosen once.

Three sets behind one interface, picked by `select_kernels` when the engine starts:

- `TorchKernels`: PyTorch ops only; the reference the others are tested against (`rms_norm_reference`,
  `rope_reference`, `lora.project_prefix`). Any device.
- `NumbaKernels` (CPU, float32): decode-sized steps compute the LoRA update in one compiled loop per
  projection group (`cpu_lora`); bigger steps use the PyTorch ops.
- `TritonKernels` (CUDA): RMSNorm and RoPE as one launch each (`triton_ops`), the LoRA expand of a
  whole group in one launch (`triton_lora`), decode attention read straight from the paged cache
  (`triton_attention`), int4/int8 base weights dequantized inside the matmul (`triton_quant`).

Over a quantized base weight (`quant.QuantWeight`) every set takes the same LoRA math with the
shrink as its own matmul (`lora.project_prefix_quant`); Triton's expand reads the base output and
the shrinks laid out as the fused GEMM gives them (`lora.prefix_product_quant`).

A compiled kernel that fails at run time is logged, listed in `failures` (and /healthz), and the
set falls back to the PyTorch ops for the rest of its life; nothing else changes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from . import cpu_lora
from .lora import linear, lora_expand_fused, prefix_product_quant, project_prefix, project_prefix_quant
from .lora_pool import ROW_BLOCK, GroupSlots
from .quant import QuantWeight, Weight

__all__ = ["Kernels", "NumbaKernels", "TorchKernels", "TritonKernels", "rms_norm_reference", "rope_reference",
           "select_kernels", "silu_mul_reference"]

log = logging.getLogger("loraloom.text")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul_reference(gu: torch.Tensor, n: int) -> torch.Tensor:
    """The MLP's activation on the fused gate/up output: silu(gate) * up, [T, n]."""
    return F.silu(gu[:, :n]) * gu[:, n:2 * n]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, 1, D] (float32); rotate-half convention of the HF checkpoints."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class TorchKernels:
    """PyTorch ops only."""

    name = "torch"
    reads_pages = False  # decode attention reads the paged cache itself (no gathered copy)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.failures: list[str] = []

    def begin_forward(self) -> None:
        """A forward pass starts (what a kernel set builds once a step is built again from here)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_reference(x, weight, eps)

    def silu_mul(self, gu: torch.Tensor, n: int) -> torch.Tensor:
        return silu_mul_reference(gu, n)

    def rope_write(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int, kv: Any, layer: int, slots: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v [T, heads, D] of the fused qkv rows, k and v written to their slots of
        the layer's KV cache."""
        q, k = self.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)
        t, qs, kvs = qkv.shape[0], heads * head_dim, kv_heads * head_dim
        v = qkv[:, qs + kvs:qs + 2 * kvs].view(t, kv_heads, head_dim)
        kv.write(layer, slots, k, v)
        return q, k, v

    def rope_qk(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, D] and k [T, kv_heads, D] of the fused qkv rows, rotated."""
        t, qs = qkv.shape[0], heads * head_dim
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = rope_reference(qkv[:, :qs].view(t, heads, head_dim), c, s)
        k = rope_reference(qkv[:, qs:qs + kv_heads * head_dim].view(t, kv_heads, head_dim), c, s)
        return q, k

    def prefers_prefix(self, tokens: int) -> bool:
        """Whether a step of `tokens` rows should take the dense LoRA layout over the whole prefix."""
        return self.device.type == "cuda"

    def paged_decode(self, q: torch.Tensor, kv: Any, layer: int, tables: torch.Tensor, lens: torch.Tensor,
                     window: int | None) -> torch.Tensor | None:
        """Decode attention straight from the paged cache, or None: the caller gathers (`kv.decode_attention`)."""
        return None

    def paged_prefill(self, q: torch.Tensor, kv: Any, layer: int, tables: torch.Tensor, meta: torch.Tensor,
                      out: torch.Tensor, window: int | None, longest: int) -> bool:
        """Prompt chunks' attention straight from the paged cache into `out`; False: the caller
        gathers (`kv.prefill_attention`)."""
        return False

    def project_prefix(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, group: GroupSlots,
                       weights: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """x @ weight^T (+ bias) plus every row's LoRA update over the pool prefix (+ residual): [T, out]."""
        if isinstance(weight, QuantWeight):
            return project_prefix_quant(x, self.quant_linear(x, weight, bias), group, weights, residual)
        return project_prefix(x, group, weights, residual)

    def quant_linear(self, x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T (+ bias) of a quantized base weight: dequantized group-wise, then a GEMM."""
        return weight.linear(x, bias)

    def linear(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A projection with no LoRA on it (the vocab head): x @ W^T (+ bias), [T, out] contiguous."""
        return self.quant_linear(x, weight, bias) if isinstance(weight, QuantWeight) else linear(x, weight, bias)

    def stats(self) -> dict[str, object]:
        return {"kernels": self.name, "kernel_failures": list(self.failures)}

    def _fail(self, what: str, exc: Exception) -> None:
        message = f"{what} failed ({type(exc).__name__}: {exc}); using PyTorch ops from now on"
        log.warning("%s kernel: %s", self.name, message)
        self.failures.append(message)


class NumbaKernels(TorchKernels):
    """CPU, float32: decode steps' LoRA update in one numba loop per group."""

    name = "numba"

    def prefers_prefix(self, tokens: int) -> bool:
        return tokens <= cpu_lora.MAX_ROWS  # the loop reads only the rows each token uses

    def project_prefix(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, group: GroupSlots,
                       weights: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if not self.failures and cpu_lora.usable(x):
            y = self.quant_linear(x, weight, bias) if isinstance(weight, QuantWeight) else linear(x, weight, bias)
            try:
                cpu_lora.apply_group(y, x, group, weights, ROW_BLOCK)
            except Exception as exc:  # a numba build that cannot run here
                self._fail("the LoRA loop", exc)
                return super().project_prefix(x, weight, bias, group, weights, residual)
            return y if residual is None else y.add_(residual)
        return super().project_prefix(x, weight, bias, group, weights, residual)


class TritonKernels(TorchKernels):
    """CUDA: one launch each for RMSNorm, RoPE, a group's LoRA expand and a layer's decode attention."""

    name = "triton"
    reads_pages = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        from . import triton_attention, triton_lora, triton_ops, triton_quant

        self._attention = triton_attention
        self._lora = triton_lora
        self._ops = triton_ops
        self._quant = triton_quant

    def quant_linear(self, x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.failures:
            try:
                y = self._quant.matmul(x, weight, bias)
                if y is not None:
                    return y
            except Exception as exc:
                self._fail("the quantized matmul", exc)
        return weight.linear(x, bias)

    def paged_decode(self, q: torch.Tensor, kv: Any, layer: int, tables: torch.Tensor, lens: torch.Tensor,
                     window: int | None) -> torch.Tensor | None:
        if self.failures:
            return None
        try:
            return self._attention.paged_decode(q, kv.k[layer], kv.v[layer], tables, lens, window, kv.block_size)
        except Exception as exc:
            self._fail("the paged decode attention", exc)
            return None

    def paged_prefill(self, q: torch.Tensor, kv: Any, layer: int, tables: torch.Tensor, meta: torch.Tensor,
                      out: torch.Tensor, window: int | None, longest: int) -> bool:
        if self.failures:
            return False
        try:
            return self._attention.paged_prefill(q, kv.k[layer], kv.v[layer], tables, meta, out, window,
                                                 kv.block_size, longest)
        except Exception as exc:
            self._fail("the paged prefill attention", exc)
            return False

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self.failures:
            try:
                return self._ops.rms_norm(x, weight, eps)
            except Exception as exc:
                self._fail("RMSNorm", exc)
        return rms_norm_reference(x, weight, eps)

    def rope_write(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int, kv: Any, layer: int, slots: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.failures:
            try:  # RoPE and the KV write in one launch
                self._ops.rope_write_(qkv, cos, sin, heads, kv_heads, head_dim, slots, kv.k[layer], kv.v[layer])
                t, qs, kvs = qkv.shape[0], heads * head_dim, kv_heads * head_dim
                return (qkv[:, :qs].view(t, heads, head_dim), qkv[:, qs:qs + kvs].view(t, kv_heads, head_dim),
                        qkv[:, qs + kvs:qs + 2 * kvs].view(t, kv_heads, head_dim))
            except Exception as exc:
                self._fail("RoPE with the KV write", exc)
        return super().rope_write(qkv, cos, sin, heads, kv_heads, head_dim, kv, layer, slots)

    def silu_mul(self, gu: torch.Tensor, n: int) -> torch.Tensor:
        if not self.failures:
            try:
                return self._ops.silu_mul(gu, n)  # one launch for silu, the product and the slices
            except Exception as exc:
                self._fail("SiLU-and-multiply", exc)
        return silu_mul_reference(gu, n)

    def rope_qk(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.failures:
            try:
                self._ops.rope_qk_(qkv, cos, sin, heads + kv_heads, head_dim)  # q and k in place, one launch
                t, qs = qkv.shape[0], heads * head_dim
                return qkv[:, :qs].view(t, heads, head_dim), qkv[:, qs:qs + kv_heads * head_dim].view(
                    t, kv_heads, head_dim)
            except Exception as exc:
                self._fail("RoPE", exc)
        return super().rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)

    def project_prefix(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, group: GroupSlots,
                       weights: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if not self.failures:
            if isinstance(weight, QuantWeight):  # the base and the shrinks in the fused GEMM's layout
                y = prefix_product_quant(x, self.quant_linear(x, weight, bias), group, weights.shape[1])
            else:
                end = group.base_out + weights.shape[1] * len(group.members)
                fused_bias = None if group.fused_bias is None else group.fused_bias[:end]
                y = torch.nn.functional.linear(x, group.fused[:end], fused_bias)
            try:
                done = self._lora.expand_fused(y, group, weights, residual=residual)
            except Exception as exc:  # e.g. a GPU with less shared memory than the tiles need
                self._fail("the LoRA expand", exc)
                done = False
            if not done:  # shapes the kernel does not take: the same math in PyTorch ops
                lora_expand_fused(y, group, weights, residual=residual)
            return y[:, :group.base_out]
        return super().project_prefix(x, weight, bias, group, weights, residual)


def select_kernels(device: torch.device, dtype: torch.dtype, *, enabled: bool = True) -> TorchKernels:
    """The best kernel set installed for this device and dtype (PyTorch ops when `enabled` is False;
    deterministic mode takes `invariant.InvariantKernels` instead)."""
    if enabled and device.type == "cuda":
        from . import triton_lora

        if triton_lora.available(device):
            return TritonKernels(device)
    if enabled and device.type == "cpu" and dtype == torch.float32 and cpu_lora.available():
        return NumbaKernels(device)
    return TorchKernels(device)


Kernels = TorchKernels  # the interface every set implements
