"""LoRA math for many adapters in one batch: slot storage and the batched shrink/expand ops.

Bookkeeping (which adapter sits in which slot) lives in `slots.py`; this module only knows tensors.

Each targeted projection y = x W^T gets, per token t,

    y[t] += sum_m  scale[t, m] * (x[t] @ A[slot[t, m]]^T) @ B[slot[t, m]]

where A[s] is [R, d_in] and B[s] is [R, d_out] (PEFT's lora_B transposed, with alpha/r folded in),
zero-padded to the slot rank R. A weighted mix of adapters is M > 1 entries per token, which is the
same as one adapter of rank M*R (A's concatenated, B's scaled): one code path serves base rows
(scale 0), single adapters and mixes.

Two fast paths compute exactly that, and `lora_reference` is the plain loop the tests compare with:
- `dense`: multiply by the A's of the step's active slots at once and mask with a weight matrix
  [T, K]; the default: prefill chunks (few adapters, many tokens), GPUs (no gathers, big GEMMs)
  and CPU decode (memory-bound: each adapter is read once per step).
- `bgmv`: gather each token's A and B and use batched matmuls (cost per token = its own rank);
  for very many wide adapters with few tokens each.

Dense over all slots (every GPU step, CPU decode with most slots busy) goes further: the A rows of
every slot live inside the model's weight for their projection group (`GroupSlots`), so the base
GEMM also yields every slot's shrink, and the expand of a whole group is one Triton kernel on CUDA
(`triton_lora.py`) or one multiply plus a GEMM per member elsewhere (`lora_expand_fused`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

__all__ = ["GROUPS", "GroupSlots", "LoraBatch", "LoraSlotStorage", "PreparedLora", "lora_apply", "lora_apply_group",
           "lora_expand_fused", "lora_project", "lora_reference"]

Mode = Literal["none", "bgmv", "dense"]


@dataclass(frozen=True)
class PreparedLora:
    """One adapter's matrices, parsed and scaled, on the host: layers[i][target] = (A, B)."""

    rank: int
    targets: tuple[str, ...]
    layers: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]  # A [r, d_in], B [r, d_out]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for layer in self.layers for a, b in layer.values())


# Projections that read the same input share one weight in the model (its key first) and one A stack.
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
          ("down", ("down_proj",)))


class FusableModel(Protocol):
    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class GroupSlots:
    """The slot matrices of one projection group (e.g. q/k/v) of one layer.

    The A rows of every member and slot are appended to the model's weight for the group:
    `fused` is [out + n*S*R, d_in], so one GEMM gives the base output and every slot's shrink.
    The B's of the members sit side by side in `b_cat` [S*R, sum of member widths]."""

    members: tuple[str, ...]
    out_cols: tuple[tuple[int, int], ...]  # each member's columns in the group's base output
    base_out: int
    fused: torch.Tensor
    fused_bias: torch.Tensor | None
    a: torch.Tensor  # [n, S, R, d_in]: a view of fused's extra rows
    b_cat: torch.Tensor
    b: tuple[torch.Tensor, ...]  # per member [S, R, width]: views of b_cat


class LoraSlotStorage:
    """Compute-resident adapter matrices of `num_slots` slots, zero-padded to `max_rank`.

    For every layer and targeted group (`groups[layer][key]`) the A's live inside the model's fused
    weight (see `GroupSlots`); `a[layer][target]` [S, R, d_in] and `b[layer][target]` [S, R, d_out]
    are per-target views of the same memory.
    """

    def __init__(self, model: FusableModel, *, num_layers: int, target_dims: dict[str, tuple[int, int]],
                 targets: tuple[str, ...], num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.targets = targets
        self.triton = False  # expand with the Triton kernel (the engine turns it on where it runs)
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        self.groups: list[dict[str, GroupSlots]] = []
        width = num_slots * max_rank
        for i in range(num_layers):
            layer_a: dict[str, torch.Tensor] = {}
            layer_b: dict[str, torch.Tensor] = {}
            layer_groups: dict[str, GroupSlots] = {}
            for key, group in GROUPS:
                members = tuple(t for t in group if t in targets)
                if not members:
                    continue
                starts = dict(zip(group, itertools.accumulate((target_dims[t][1] for t in group), initial=0),
                                  strict=False))
                out_cols = tuple((starts[t], starts[t] + target_dims[t][1]) for t in members)
                d_in = target_dims[members[0]][0]
                fused, bias = model.fuse_rows(i, key, len(members) * width)
                base_out = fused.shape[0] - len(members) * width
                stacked = fused[base_out:].view(len(members), num_slots, max_rank, d_in)
                b_cat = torch.zeros(width, sum(hi - lo for lo, hi in out_cols), device=device, dtype=dtype)
                b_views, col = [], 0
                for lo, hi in out_cols:
                    b_views.append(b_cat[:, col:col + hi - lo].view(num_slots, max_rank, hi - lo))
                    col += hi - lo
                for j, t in enumerate(members):
                    layer_a[t], layer_b[t] = stacked[j], b_views[j]
                layer_groups[key] = GroupSlots(members, out_cols, base_out, fused, bias, stacked, b_cat,
                                               tuple(b_views))
            self.a.append(layer_a)
            self.b.append(layer_b)
            self.groups.append(layer_groups)

    def nbytes(self) -> int:
        return sum(g.a.numel() * g.a.element_size() + g.b_cat.numel() * g.b_cat.element_size()
                   for layer in self.groups for g in layer.values())

    def load(self, slot: int, lora: PreparedLora) -> None:
        """Copy `lora` into `slot`, zero-padding its rank; targets it lacks become zero."""
        for i, (layer_a, layer_b) in enumerate(zip(self.a, self.b, strict=True)):
            parts = lora.layers[i]
            for t in self.targets:
                a_slot, b_slot = layer_a[t][slot], layer_b[t][slot]
                a_slot.zero_()
                b_slot.zero_()
                if t in parts:
                    a, b = parts[t]
                    r = a.shape[0]
                    a_slot[:r].copy_(a, non_blocking=True)
                    b_slot[:r].copy_(b, non_blocking=True)

    def clear(self, slot: int) -> None:
        for layer in (*self.a, *self.b):
            for x in layer.values():
                x[slot].zero_()


@dataclass
class LoraBatch:
    """Which slots and scales each token of a step uses: the seam between scheduler and kernels.

    slots/scales are [T, M]; a row on the base model has scale 0. For the dense path, `active`
    lists the K slots in use (None = all slots) and `weights` is [T, K*R] (scales spread over ranks).
    """

    mode: Mode
    slots: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # [T, M*R] for bgmv (repeated over the rank)
    active: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @staticmethod
    def build(token_slots: list[list[int]], token_scales: list[list[float]], *, max_rank: int,
              num_slots: int, device: torch.device, dtype: torch.dtype, prefer_dense: bool,
              force: Mode | None = None) -> LoraBatch:
        """Plan a step. token_slots[t] / token_scales[t] list the adapters of token t (may be empty).

        `force` picks the path regardless of the cost rule (tests and benchmarks use it)."""
        if not any(any(s != 0.0 for s in row) for row in token_scales):
            return LoraBatch(mode="none")
        m = max(1, max(len(row) for row in token_slots))
        t = len(token_slots)
        slots = [row + [0] * (m - len(row)) for row in token_slots]
        scales = [row + [0.0] * (m - len(row)) for row in token_scales]
        used = sorted({s for row, sc in zip(token_slots, token_scales, strict=True)
                       for s, x in zip(row, sc, strict=True) if x != 0.0})
        k = len(used)
        # Decode on a CPU is bound by reading weights: dense reads each active adapter once per
        # step, bgmv copies one per token (then reads the copy). Dense only loses when K*R grows
        # so wide that its extra multiply-adds dominate, with few tokens per adapter.
        dense = prefer_dense or k * max_rank <= 1024 or t >= 2 * k
        if force is not None:
            dense = force == "dense"
        if dense:
            # Gathering the active slots costs a copy per target; with most slots active it is
            # cheaper to multiply by all of them (unused ones get weight 0).
            use_all = k * 2 > num_slots
            cols = list(range(num_slots)) if use_all else used
            index = {s: j for j, s in enumerate(cols)}
            w = torch.zeros(t, len(cols), dtype=torch.float32)
            for i, (row, sc) in enumerate(zip(slots, scales, strict=True)):
                for s, x in zip(row, sc, strict=True):
                    if x != 0.0:
                        w[i, index[s]] += x
            weights = w.repeat_interleave(max_rank, dim=1).to(device=device, dtype=dtype)
            active = None if use_all else torch.tensor(cols, dtype=torch.long, device=device)
            return LoraBatch(mode="dense", active=active, weights=weights)
        slot_t = torch.tensor(slots, dtype=torch.long, device=device)
        scale_t = torch.tensor(scales, dtype=torch.float32).repeat_interleave(max_rank, dim=1)
        return LoraBatch(mode="bgmv", slots=slot_t, scales=scale_t.to(device=device, dtype=dtype))


def lora_apply(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoraBatch) -> None:
    """out[T, d_out] += the LoRA update of x[T, d_in] with slot stacks a [S, R, d_in], b [S, R, d_out]."""
    if batch.mode == "none":
        return
    s, r, d_in = a.shape
    d_out = b.shape[2]
    if batch.mode == "dense":
        if batch.active is None:
            a_act, b_act = a.view(s * r, d_in), b.view(s * r, d_out)
        else:
            a_act = a.index_select(0, batch.active).view(-1, d_in)
            b_act = b.index_select(0, batch.active).view(-1, d_out)
        assert batch.weights is not None
        shrunk = (x @ a_act.t()) * batch.weights
        out.addmm_(shrunk, b_act)
        return
    assert batch.slots is not None and batch.scales is not None
    t, m = batch.slots.shape
    a_g = a[batch.slots].view(t, m * r, d_in)  # gather: [T, M*R, d_in]
    shrunk = torch.bmm(a_g, x.unsqueeze(-1)).squeeze(-1) * batch.scales  # [T, M*R]
    b_g = b[batch.slots].view(t, m * r, d_out)
    out.add_(torch.bmm(shrunk.unsqueeze(1), b_g).squeeze(1))


def lora_apply_group(x: torch.Tensor, outs: list[torch.Tensor], a_group: torch.Tensor, bs: list[torch.Tensor],
                     batch: LoraBatch) -> None:
    """outs[j] += the LoRA update of target j, for targets sharing input x; a_group is [n, S, R, d_in].

    Dense: one GEMM shrinks x for every target and slot, one multiply applies the per-row scales,
    one GEMM per target expands. Other modes go target by target."""
    if batch.mode == "none":
        return
    if batch.mode != "dense" or len(outs) == 1:
        for j, (out, b) in enumerate(zip(outs, bs, strict=True)):
            lora_apply(x, out, a_group[j], b, batch)
        return
    n, s, r, d_in = a_group.shape
    assert batch.weights is not None
    if batch.active is None:
        a_flat = a_group.view(n * s * r, d_in)
        b_flats = [b.view(s * r, -1) for b in bs]
    else:
        a_flat = a_group.index_select(1, batch.active).view(-1, d_in)
        b_flats = [b.index_select(0, batch.active).view(-1, b.shape[2]) for b in bs]
    width = b_flats[0].shape[0]
    shrunk = (x @ a_flat.t()).view(x.shape[0], n, width) * batch.weights.unsqueeze(1)
    for j, (out, b_flat) in enumerate(zip(outs, b_flats, strict=True)):
        out.addmm_(shrunk[:, j], b_flat)


def lora_project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: GroupSlots | None,
                 batch: LoraBatch, *, triton: bool = False) -> torch.Tensor:
    """x @ weight^T (+ bias) plus every row's LoRA update of the group's members: [T, out].

    Dense over all slots (decode, CUDA graphs): one GEMM with the fused weight gives the base output
    and the shrink of every slot, then `lora_expand_fused` adds the updates in place. Otherwise the
    base GEMM and `lora_apply_group`."""
    if group is None or batch.mode == "none":
        return F.linear(x, weight, bias)
    if batch.mode == "dense" and batch.active is None:
        y = F.linear(x, group.fused, group.fused_bias)
        assert batch.weights is not None
        lora_expand_fused(y, group, batch.weights, triton=triton)
        return y[:, :group.base_out]
    y = F.linear(x, weight, bias)
    lora_apply_group(x, [y[:, lo:hi] for lo, hi in group.out_cols], group.a, list(group.b), batch)
    return y


def lora_expand_fused(y: torch.Tensor, group: GroupSlots, weights: torch.Tensor, *, triton: bool = False) -> None:
    """y[:, :base_out] += the expanded updates, where y = x @ group.fused^T holds each slot's shrink
    after the base columns and `weights` [T, S*R] is each row's scale per slot (spread over ranks)."""
    n = len(group.members)
    width = weights.shape[1]
    if triton:
        from .triton_lora import expand_fused

        if expand_fused(y, group, weights):
            return
    shrunk = y[:, group.base_out:].view(y.shape[0], n, width) * weights.unsqueeze(1)
    for j, ((lo, hi), b) in enumerate(zip(group.out_cols, group.b, strict=True)):
        y[:, lo:hi].addmm_(shrunk[:, j], b.view(width, hi - lo))


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   token_slots: list[list[int]], token_scales: list[list[float]]) -> torch.Tensor:
    """The update as a plain loop over tokens and adapters, for tests."""
    out = torch.zeros(x.shape[0], b.shape[2], dtype=x.dtype, device=x.device)
    for t, (row, sc) in enumerate(zip(token_slots, token_scales, strict=True)):
        for s, scale in zip(row, sc, strict=True):
            out[t] += scale * ((x[t] @ a[s].t()) @ b[s])
    return out
