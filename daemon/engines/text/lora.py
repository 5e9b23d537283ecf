"""LoRA math for many adapters in one batch: the projections with their per-token updates.

Each targeted projection y = x W^T gets, per token t,

    y[t] += sum_m  scale[t, m] * (x[t] @ A[slot[t, m]]^T) @ B[slot[t, m]]

where A[s] is [r_s, d_in] and B[s] is [r_s, d_out] (PEFT's lora_B transposed, with alpha/r folded
in). A weighted mix of adapters is M > 1 entries per token, which is the same as one adapter of
rank sum(r) (A's concatenated, B's scaled): one code path serves base rows (scale 0), single
adapters and mixes.

`lora_reference` is the plain loop every path is tested against. The paths (see `lora_plan`):
`project_prefix` (dense over the pool prefix: the fused GEMM, then the expand as a multiply and a
GEMM per member; `kernels` has the compiled versions), `lora_apply_group` (gathered rows or
bgmv). The pool layout they read is `lora_pool`'s. Over a quantized base weight (`quant`) the
shrink is a matmul of its own (`project_prefix_quant`); the expand is the same.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .lora_plan import LoraBatch
from .lora_pool import ROW_BLOCK, GroupSlots
from .quant import QuantWeight, Weight

__all__ = ["PrefixProjector", "linear", "lora_apply", "lora_apply_group", "lora_expand_fused", "lora_project",
           "lora_reference", "prefix_product_quant", "project_prefix", "project_prefix_quant"]


class PrefixProjector(Protocol):
    """What computes the dense update over the pool prefix (a kernel set of `kernels`)."""

    def project_prefix(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, group: GroupSlots,
                       weights: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor: ...

    def quant_linear(self, x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor: ...


def lora_apply(x: torch.Tensor, out: torch.Tensor, group: GroupSlots, j: int, batch: LoraBatch) -> None:
    """out[T, d_out] += the LoRA update of x[T, d_in] for member j of `group` (gathered rows or bgmv)."""
    if batch.mode == "none":
        return
    b = group.b(j)
    if batch.mode == "dense":
        assert batch.weights is not None
        assert batch.rows is not None, "the prefix goes through lora_project"
        k = batch.rows.shape[0]
        a_act = group.fused.index_select(0, batch.fused_rows(group)[j * k:(j + 1) * k])
        out.addmm_((x @ a_act.t()) * batch.weights, b.index_select(0, batch.rows))
        return
    assert batch.index is not None and batch.scales is not None
    a_g = group.fused[group.row_index(j, batch.index)]  # [T, M*R, d_in]
    shrunk = torch.bmm(a_g, x.unsqueeze(-1)).squeeze(-1) * batch.scales  # [T, M*R]
    out.add_(torch.bmm(shrunk.unsqueeze(1), b[batch.index]).squeeze(1))


def lora_apply_group(x: torch.Tensor, outs: list[torch.Tensor], group: GroupSlots, batch: LoraBatch) -> None:
    """outs[j] += the LoRA update of member j of `group` (targets that share the input x).

    Dense over gathered rows: one GEMM shrinks x for every member, one multiply applies the
    per-row scales, one GEMM per member expands. bgmv goes member by member."""
    if batch.mode == "none":
        return
    n = len(group.members)
    if batch.mode != "dense" or n == 1:
        for j, out in enumerate(outs):
            lora_apply(x, out, group, j, batch)
        return
    assert batch.weights is not None
    assert batch.rows is not None
    shrunk = (x @ group.fused.index_select(0, batch.fused_rows(group)).t()).view(x.shape[0], n, -1)
    shrunk = shrunk * batch.weights.unsqueeze(1)
    for j, out in enumerate(outs):
        out.addmm_(shrunk[:, j], group.b(j).index_select(0, batch.rows))


def _left_operand(x: torch.Tensor) -> bool:
    """Whether x @ W^T runs as (W @ x^T)^T: on a CPU with a few rows (decode steps). Measured on 2
    EPYC cores, SmolLM2's decode step with 8 rows, one process, interleaved rounds: 110 -> 94 ms on
    the base model, 156 -> 121 ms with 8 adapters (docs/BENCHMARKS.md). The projections alone, timed
    in isolation, are about even with 8 rows and 1.4x faster with 64; from a few hundred rows on
    (prompts) the two forms are even."""
    return x.device.type == "cpu" and x.dim() == 2 and 1 < x.shape[0] <= 64


def _left_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(weight @ x^T + bias): [out, T], contiguous."""
    if bias is None:
        return torch.mm(weight, x.t())
    return torch.addmm(bias.unsqueeze(1), weight, x.t())


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias): [T, out], contiguous (attention and the LoRA expand are 2x slower on a
    transposed view, so the left-operand form pays for one transposing copy)."""
    if isinstance(weight, QuantWeight):
        return weight.linear(x, bias)
    if _left_operand(x):
        return _left_product(x, weight, bias).t().contiguous()
    return F.linear(x, weight, bias)


def lora_project(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, group: GroupSlots | None,
                 batch: LoraBatch, kernels: PrefixProjector, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) plus every row's LoRA update of the group's members (plus `residual`,
    the caller's residual stream, where given): [T, out]. Dense over the prefix goes to
    `kernels.project_prefix`; gathered rows and bgmv to `lora_apply_group`."""
    if group is None or batch.mode == "none":
        y = _base(x, weight, bias, kernels)
        return y if residual is None else residual + y
    if batch.mode == "dense" and batch.rows is None:
        assert batch.weights is not None
        return kernels.project_prefix(x, weight, bias, group, batch.weights, residual)
    y = _base(x, weight, bias, kernels)
    lora_apply_group(x, [y[:, lo:hi] for lo, hi in group.out_cols], group, batch)
    return y if residual is None else residual + y


def project_prefix(x: torch.Tensor, group: GroupSlots, weights: torch.Tensor,
                   residual: torch.Tensor | None) -> torch.Tensor:
    """The dense update over the pool prefix in PyTorch ops: one GEMM with the fused weight's first
    rows gives the base output and the shrink of every pool row in use, then `lora_expand_fused`
    adds the updates (and the residual) in place. On a CPU with few rows, as weight @ x^T."""
    end = group.base_out + weights.shape[1] * len(group.members)
    fused, fused_bias = group.fused[:end], None if group.fused_bias is None else group.fused_bias[:end]
    if _left_operand(x):  # only the base columns get the transposing copy
        y_t = _left_product(x, fused, fused_bias)
        y = y_t[:group.base_out].t().contiguous()
        lora_expand_fused(y, group, weights, shrink=y_t[group.base_out:].t(), residual=residual)
        return y
    y = F.linear(x, fused, fused_bias)
    lora_expand_fused(y, group, weights, residual=residual)
    return y[:, :group.base_out]


def _base(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, kernels: PrefixProjector) -> torch.Tensor:
    """The base projection alone: the kernel set's (a quantized weight's matmul, or deterministic
    mode's plain product)."""
    return kernels.linear(x, weight, bias)


def project_prefix_quant(x: torch.Tensor, y: torch.Tensor, group: GroupSlots, weights: torch.Tensor,
                         residual: torch.Tensor | None) -> torch.Tensor:
    """`project_prefix` over a quantized base whose output is `y` [T, base_out] (updated in place):
    the shrink of pool rows [0, K) of every member as a matmul with the A rows (`group.fused`,
    which holds only them), then the same expand."""
    shrink = linear(x, group.fused[:weights.shape[1] * len(group.members)])
    lora_expand_fused(y, group, weights, shrink=shrink, residual=residual)
    return y


def prefix_product_quant(x: torch.Tensor, y: torch.Tensor, group: GroupSlots, width: int) -> torch.Tensor:
    """[T, base_out + width * n]: the base output `y` then the shrinks, laid out as the fused GEMM of
    a dense base gives them (for kernels that read that layout, `triton_lora.expand_fused`)."""
    shrink = F.linear(x, group.fused[:width * len(group.members)])
    return torch.cat([y, shrink], dim=1)


def lora_expand_fused(y: torch.Tensor, group: GroupSlots, weights: torch.Tensor, *,
                      shrink: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> None:
    """y[:, :base_out] += the expanded updates (+ `residual` [T, base_out]), where the shrink of
    pool rows [0, K) (in blocks of ROW_BLOCK per member, as x @ fused[base_out:base_out + K*n]^T
    gives it) is `shrink` [T, K*n], or else sits in y after the base columns; `weights` [T, K] is
    each token's scale per pool row. (`triton_lora.expand_fused` computes the same in one launch.)"""
    n = len(group.members)
    width = weights.shape[1]
    t, g = y.shape[0], ROW_BLOCK
    src = y[:, group.base_out:group.base_out + width * n] if shrink is None else shrink
    shrunk = torch.empty(t, n, width, dtype=y.dtype, device=y.device)  # each member's shrink: a plain matrix
    torch.mul(src.view(t, width // g, n, g), weights.view(t, -1, 1, g),
              out=shrunk.view(t, n, width // g, g).transpose(1, 2))
    for j, (lo, hi) in enumerate(group.out_cols):
        y[:, lo:hi].addmm_(shrunk[:, j], group.b(j)[:width])
    if residual is not None:
        y[:, :group.base_out].add_(residual)


def lora_reference(x: torch.Tensor, matrices: list[tuple[torch.Tensor, torch.Tensor] | None],
                   token_slots: list[list[int]], token_scales: list[list[float]]) -> torch.Tensor:
    """The update of one target as a plain loop over tokens and adapters, for tests;
    matrices[s] = (A [r, d_in], B [r, d_out]) of slot s, or None where its adapter lacks the target."""
    d_out = next(m[1].shape[1] for m in matrices if m is not None)
    out = torch.zeros(x.shape[0], d_out, dtype=x.dtype, device=x.device)
    for t, (row, sc) in enumerate(zip(token_slots, token_scales, strict=True)):
        for s, scale in zip(row, sc, strict=True):
            m = matrices[s]
            if m is not None:
                out[t] += scale * ((x[t] @ m[0].t()) @ m[1])
    return out
