"""LoRA math for many adapters in one batch: slot storage and the batched shrink/expand ops.

Bookkeeping (which adapter sits in which slot) lives in `slots.py`; this module only knows tensors.

Each targeted projection y = x W^T gets, per token t,

    y[t] += sum_m  scale[t, m] * (x[t] @ A[slot[t, m]]^T) @ B[slot[t, m]]

where A[s] is [r_s, d_in] and B[s] is [r_s, d_out] (PEFT's lora_B transposed, with alpha/r folded
in). A weighted mix of adapters is M > 1 entries per token, which is the same as one adapter of
rank sum(r) (A's concatenated, B's scaled): one code path serves base rows (scale 0), single
adapters and mixes.

Storage is a pool of rank rows, not fixed-size slots: an adapter of rank r takes r consecutive pool
rows, so a rank-8 adapter costs 8 rows however large `max_rank` is, and the rows in use are always
a prefix of the pool (`LoraSlotStorage.width`); nothing reads padding. The A rows of every pool row
live inside the model's weight for their projection group (`GroupSlots`), interleaved by member
(q/k/v) in blocks of 16 rows, so one GEMM over the base rows plus the prefix gives the base output
and every adapter's shrink at once.

Three paths compute the update; `lora_reference` is the plain loop the tests compare them with:
- dense over the prefix (`LoraBatch.rows is None`): that fused GEMM, then a [T, rows] scale
  matrix and the expand of a whole group: one Triton kernel on CUDA (`triton_lora.py`), a
  multiply plus a GEMM per member elsewhere. Every GPU step; CPU steps with most adapters busy.
  CPU decode steps with numba skip the fused GEMM: the base GEMM, then one compiled loop per
  group that reads only the pool rows each row uses (`cpu_lora.py`).
- dense over some rows (`rows` given): gather the active adapters' rows (prompt chunks on a CPU:
  few adapters, many tokens).
- `bgmv`: gather each token's own rows and use batched matmuls (cost per token = its own rank);
  for very many wide adapters with few tokens each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from . import cpu_lora

__all__ = ["GROUPS", "GroupSlots", "Kernel", "LoraBatch", "LoraSlotStorage", "PreparedLora", "linear", "lora_apply",
           "lora_apply_group", "lora_expand_fused", "lora_project", "lora_reference"]

Mode = Literal["none", "bgmv", "dense"]
Kernel = Literal["torch", "triton", "numba"]  # what computes the dense update (see LoraSlotStorage.kernel)


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
ROW_BLOCK = 16  # pool rows of one member kept together in the fused weights (widths are multiples of it)


class FusableModel(Protocol):
    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class GroupSlots:
    """The pool rows of one projection group (e.g. q/k/v) of one layer.

    `fused` is the model's weight for the group followed by the A rows in blocks of ROW_BLOCK pool
    rows per member: pool row p of member j is fused row `row_index(j, p)`, so a prefix of pool rows
    (a multiple of ROW_BLOCK) is a prefix of `fused`, and the shrink of one member comes in
    contiguous runs. The B's of the members sit side by side in `b_cat` [pool rows, their widths]."""

    key: str  # the model weight it extends: qkv, o, gate_up or down (the same layout in every layer)
    members: tuple[str, ...]
    out_cols: tuple[tuple[int, int], ...]  # each member's columns in the group's base output
    b_cols: tuple[tuple[int, int], ...]  # each member's columns in b_cat
    base_out: int
    fused: torch.Tensor
    fused_bias: torch.Tensor | None
    b_cat: torch.Tensor

    def row_index(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows of `fused` that hold member j's A for the given pool rows (any shape)."""
        g, n = ROW_BLOCK, len(self.members)
        return self.base_out + (rows // g) * (g * n) + j * g + rows % g

    def b(self, j: int) -> torch.Tensor:
        """Member j's B rows: [pool rows, d_out] (a view of `b_cat`)."""
        lo, hi = self.b_cols[j]
        return self.b_cat[:, lo:hi]


class LoraSlotStorage:
    """Compute-resident adapter matrices for `num_slots` adapters of rank <= `max_rank`.

    A slot is an adapter's place in the slot table; its matrices take `rank` consecutive rows of a
    pool of num_slots * max_rank rows (plus one row that stays zero, the padding of per-token
    gathers). `row_slot` maps each pool row to its slot (num_slots = free) for building per-row
    scales; it lives on the device and is updated in place, so CUDA graphs can read it.
    """

    def __init__(self, model: FusableModel, *, num_layers: int, target_dims: dict[str, tuple[int, int]],
                 targets: tuple[str, ...], num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.targets = targets
        self.device = device
        # The dense update's kernel: "triton" (CUDA) or "numba" (CPU, float32) where the engine
        # finds them, else PyTorch ops.
        self.kernel: Kernel = "torch"
        self.pool_rows = num_slots * max_rank
        self.zero_row = self.pool_rows
        rows = -(-(self.pool_rows + 1) // ROW_BLOCK) * ROW_BLOCK  # whole blocks, the zero row included
        self.rows = rows
        self.row_slot = torch.full((rows,), num_slots, dtype=torch.long, device=device)
        self._spans: dict[int, tuple[int, int]] = {}  # slot -> (first pool row, rank)
        self.used = 0  # pool rows [0, used) hold every resident adapter
        self.compactions = 0
        self.groups: list[dict[str, GroupSlots]] = []
        for i in range(num_layers):
            layer_groups: dict[str, GroupSlots] = {}
            for key, group in GROUPS:
                members = tuple(t for t in group if t in targets)
                if not members:
                    continue
                starts, col = {}, 0
                for t in group:
                    starts[t] = col
                    col += target_dims[t][1]
                out_cols = tuple((starts[t], starts[t] + target_dims[t][1]) for t in members)
                b_cols, col = [], 0
                for lo, hi in out_cols:
                    b_cols.append((col, col + hi - lo))
                    col += hi - lo
                fused, bias = model.fuse_rows(i, key, len(members) * rows)
                base_out = fused.shape[0] - len(members) * rows
                b_cat = torch.zeros(rows, col, device=device, dtype=dtype)
                layer_groups[key] = GroupSlots(key, members, out_cols, tuple(b_cols), base_out, fused, bias,
                                               b_cat)
            self.groups.append(layer_groups)

    # -- which rows are in use ------------------------------------------------------------------

    def span(self, slot: int) -> tuple[int, int]:
        """(first pool row, rank) of a loaded slot."""
        return self._spans[slot]

    def width(self, *, graph: bool = False) -> int:
        """Pool rows a dense step reads: `used` rounded up to whole row blocks, or to a power of two
        for CUDA graphs (one graph per width); never past the pool."""
        if graph:
            w = ROW_BLOCK
            while w < self.used:
                w *= 2
        else:
            w = max(ROW_BLOCK, -(-self.used // ROW_BLOCK) * ROW_BLOCK)
        return min(w, self.rows)

    def row_weights(self, slot_weights: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """[T, slots] scale of each token per slot -> [T, width] scale per pool row (0 on free rows)."""
        width = self.width() if width is None else width
        padded = torch.cat([slot_weights, slot_weights.new_zeros(slot_weights.shape[0], 1)], dim=1)
        return padded.index_select(1, self.row_slot[:width])

    def pool_nbytes(self) -> int:
        """Bytes the pool takes whether used or not: every slot's A rows and B rows at max_rank."""
        return sum((g.fused.shape[0] - g.base_out) * g.fused.shape[1] * g.fused.element_size()
                   + g.b_cat.numel() * g.b_cat.element_size() for layer in self.groups for g in layer.values())

    def nbytes(self) -> int:
        """Bytes of adapter matrices a dense step reads now (the rows in use)."""
        w = self.width()
        return sum(w * len(g.members) * g.fused.shape[1] * g.fused.element_size()
                   + g.b_cat[:w].numel() * g.b_cat.element_size()
                   for layer in self.groups for g in layer.values())

    # -- loading --------------------------------------------------------------------------------

    def load(self, slot: int, lora: PreparedLora) -> None:
        """Copy `lora` into `slot` (freeing what the slot held); targets it lacks stay zero."""
        if slot in self._spans:
            self.clear(slot)
        rank = max(1, lora.rank)
        first = self._allocate(rank)
        for i, layer in enumerate(self.groups):
            parts = lora.layers[i]
            for g in layer.values():
                for j, t in enumerate(g.members):
                    if t not in parts:
                        continue
                    a, b = parts[t]
                    r = a.shape[0]
                    index = g.row_index(j, torch.arange(first, first + r, device=self.device))
                    g.fused.index_copy_(0, index, a.to(self.device, g.fused.dtype))
                    g.b(j)[first:first + r].copy_(b, non_blocking=True)
        self._spans[slot] = (first, rank)
        self.row_slot[first:first + rank] = slot
        self.used = max(self.used, first + rank)

    def clear(self, slot: int) -> None:
        span = self._spans.pop(slot, None)
        if span is None:
            return
        first, rank = span
        self._zero(first, first + rank)
        self.row_slot[first:first + rank] = self.num_slots
        self.used = max((f + r for f, r in self._spans.values()), default=0)

    def _fused_rows(self, g: GroupSlots, lo: int, hi: int) -> torch.Tensor:
        rows = torch.arange(lo, hi, device=self.device)
        return torch.cat([g.row_index(j, rows) for j in range(len(g.members))])

    def _zero(self, lo: int, hi: int) -> None:
        for layer in self.groups:
            for g in layer.values():
                g.fused.index_fill_(0, self._fused_rows(g, lo, hi), 0)
                g.b_cat[lo:hi].zero_()

    def _allocate(self, rank: int) -> int:
        """First pool row of a free run of `rank` rows; packs the resident adapters to the front
        when the free rows are there but scattered (between steps, so no step sees it half done)."""
        cursor = 0
        for first, r in sorted(self._spans.values()):
            if first - cursor >= rank:
                return cursor
            cursor = first + r
        if self.pool_rows - cursor >= rank:
            return cursor
        self._compact()
        return self.used

    def _compact(self) -> None:
        self.compactions += 1
        cursor = 0
        for slot, (first, rank) in sorted(self._spans.items(), key=lambda kv: kv[1][0]):
            if first != cursor:
                for layer in self.groups:
                    for g in layer.values():
                        moved = g.fused[self._fused_rows(g, first, first + rank)]
                        g.fused.index_copy_(0, self._fused_rows(g, cursor, cursor + rank), moved)
                        g.b_cat[cursor:cursor + rank].copy_(g.b_cat[first:first + rank].clone())
                self._spans[slot] = (cursor, rank)
            cursor += rank
        self._zero(cursor, self.rows)
        self.row_slot.fill_(self.num_slots)
        for slot, (first, rank) in self._spans.items():
            self.row_slot[first:first + rank] = slot
        self.used = cursor


@dataclass
class LoraBatch:
    """Which adapters and scales each token of a step uses: the seam between scheduler and kernels.

    dense: `weights` [T, K] is each token's scale for K pool rows: `rows` (gathered), or the prefix
    [0, K) when `rows` is None. bgmv: `index` [T, M*R] are each token's own pool rows (the zero row
    pads) and `scales` [T, M*R] their scales.
    """

    mode: Mode
    weights: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    gather: dict[str, torch.Tensor] | None = None  # per group key: the fused rows of `rows`, member by member
    index: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    def fused_rows(self, group: GroupSlots) -> torch.Tensor:
        """[n * K] rows of group.fused holding `rows` for each member in turn."""
        assert self.rows is not None
        if self.gather is not None and group.key in self.gather:
            return self.gather[group.key]
        return torch.cat([group.row_index(j, self.rows) for j in range(len(group.members))])

    @staticmethod
    def plan(slot_weights: torch.Tensor, storage: LoraSlotStorage, *, dtype: torch.dtype,
             prefer_prefix: bool, force: Mode | None = None) -> LoraBatch:
        """Plan a step from [T, slots] scales (host, float32; 0 = slot unused by that token).

        `force` picks the path regardless of the cost rule (tests and benchmarks use it)."""
        active = (slot_weights != 0).any(dim=0).nonzero().flatten().tolist()
        if not active:
            return LoraBatch(mode="none")
        device = storage.device
        t = slot_weights.shape[0]
        spans = [storage.span(s) for s in active]
        active_rows = sum(r for _, r in spans)
        # Decode on a CPU is bound by reading weights: dense reads each active adapter once per
        # step, bgmv copies one per token (then reads the copy). Dense only loses when the active
        # rows grow so wide that its extra multiply-adds dominate, with few tokens per adapter.
        dense = prefer_prefix or active_rows <= 1024 or t >= 2 * len(active)
        if force is not None:
            dense = force == "dense"
        if dense:
            # Gathering rows costs a copy per target; with most of the prefix active it is cheaper
            # to multiply by all of it (free rows and idle adapters get weight 0).
            if prefer_prefix or active_rows * 2 > storage.width():
                return LoraBatch(mode="dense", weights=storage.row_weights(slot_weights.to(device, dtype)))
            rows = torch.cat([torch.arange(f, f + r) for f, r in spans])
            weights = slot_weights.index_select(1, storage.row_slot[rows].cpu())
            rows = rows.to(device)
            # Rows of the fused weights to gather, per group (the same in every layer): once a step.
            gather = {g.key: torch.cat([g.row_index(j, rows) for j in range(len(g.members))])
                      for g in (storage.groups[0].values() if storage.groups else ())}
            return LoraBatch(mode="dense", weights=weights.to(device, dtype), rows=rows, gather=gather)
        rank = max(r for _, r in spans)
        per_token = [(row != 0).nonzero().flatten().tolist() for row in slot_weights]
        m = max(1, max(len(p) for p in per_token))
        index = torch.full((t, m * rank), storage.zero_row, dtype=torch.long)
        scales = torch.zeros(t, m * rank)
        for i, slots in enumerate(per_token):
            for k, s in enumerate(slots):
                first, r = storage.span(s)
                index[i, k * rank:k * rank + r] = torch.arange(first, first + r)
                scales[i, k * rank:k * rank + r] = slot_weights[i, s]
        return LoraBatch(mode="bgmv", index=index.to(device), scales=scales.to(device, dtype))


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias): [T, out], contiguous (attention and the LoRA expand are 2x slower on a
    transposed view, so the left-operand form pays for one transposing copy)."""
    if _left_operand(x):
        return _left_product(x, weight, bias).t().contiguous()
    return F.linear(x, weight, bias)


def lora_project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: GroupSlots | None,
                 batch: LoraBatch, *, kernel: Kernel = "torch", residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) plus every row's LoRA update of the group's members (plus `residual`,
    the caller's residual stream, where given): [T, out].

    Dense over the prefix: one GEMM with the fused weight's first rows gives the base output and
    the shrink of every pool row in use, then `lora_expand_fused` adds the updates (and the
    residual) in place; with `kernel="numba"` and a decode-sized float32 step, the base GEMM and
    `cpu_lora.apply_group`. Otherwise the base GEMM and `lora_apply_group`."""
    if group is None or batch.mode == "none":
        y = linear(x, weight, bias)
        return y if residual is None else residual + y
    if batch.mode == "dense" and batch.rows is None:
        assert batch.weights is not None
        if kernel == "numba" and cpu_lora.usable(x):
            y = linear(x, weight, bias)
            cpu_lora.apply_group(y, x, group, batch.weights, ROW_BLOCK)
            return y if residual is None else y.add_(residual)
        triton = kernel == "triton"
        end = group.base_out + batch.weights.shape[1] * len(group.members)
        fused, fused_bias = group.fused[:end], None if group.fused_bias is None else group.fused_bias[:end]
        if not triton and _left_operand(x):  # only the base columns get the transposing copy
            y_t = _left_product(x, fused, fused_bias)
            y = y_t[:group.base_out].t().contiguous()
            lora_expand_fused(y, group, batch.weights, shrink=y_t[group.base_out:].t(), residual=residual)
            return y
        y = F.linear(x, fused, fused_bias)
        lora_expand_fused(y, group, batch.weights, triton=triton, residual=residual)
        return y[:, :group.base_out]
    y = linear(x, weight, bias)
    lora_apply_group(x, [y[:, lo:hi] for lo, hi in group.out_cols], group, batch)
    return y if residual is None else residual + y


def lora_expand_fused(y: torch.Tensor, group: GroupSlots, weights: torch.Tensor, *,
                      shrink: torch.Tensor | None = None, triton: bool = False,
                      residual: torch.Tensor | None = None) -> None:
    """y[:, :base_out] += the expanded updates (+ `residual` [T, base_out]), where the shrink of
    pool rows [0, K) (in blocks of ROW_BLOCK per member, as x @ fused[base_out:base_out + K*n]^T
    gives it) is `shrink` [T, K*n], or else sits in y after the base columns; `weights` [T, K] is
    each token's scale per pool row. The Triton kernel adds the residual in the same launch."""
    n = len(group.members)
    width = weights.shape[1]
    if triton and shrink is None:
        from .triton_lora import expand_fused

        if expand_fused(y, group, weights, residual=residual):
            return
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
