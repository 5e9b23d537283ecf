"""The LoRA plan of one step: which pool rows and scales each token uses (the seam between the
scheduler's sequences and the kernels), and the rule that picks its layout.

- dense over the prefix (`rows is None`): each token's scale for every pool row in use; the fused
  GEMM gives every shrink, the expand adds what the scales select. Every GPU step; CPU decode steps.
- dense over gathered rows (`rows` given): only the active adapters' rows (prompt chunks on a CPU:
  few adapters, many tokens).
- `bgmv`: each token's own rows, batched matmuls (cost per token = its own rank); for very many
  wide adapters with few tokens each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .lora_pool import GroupSlots, LoraSlotStorage

__all__ = ["Layout", "LoraBatch"]

Layout = Literal["none", "bgmv", "dense"]


@dataclass
class LoraBatch:
    """Which adapters and scales each token of a step uses: the seam between scheduler and kernels.

    dense: `weights` [T, K] is each token's scale for K pool rows: `rows` (gathered), or the prefix
    [0, K) when `rows` is None. bgmv: `index` [T, M*R] are each token's own pool rows (the zero row
    pads) and `scales` [T, M*R] their scales.
    """

    mode: Layout
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
             prefer_prefix: bool, force: Layout | None = None) -> LoraBatch:
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
                weights = slot_weights.to(device, dtype, non_blocking=True)  # `transfer`: no wait
                return LoraBatch(mode="dense", weights=storage.row_weights(weights))
            rows = torch.cat([torch.arange(f, f + r) for f, r in spans])
            weights = slot_weights.index_select(1, storage.row_slot[rows].cpu())
            rows = rows.to(device, non_blocking=True)
            # Rows of the fused weights to gather, per group (the same in every layer): once a step.
            gather = {g.key: torch.cat([g.row_index(j, rows) for j in range(len(g.members))])
                      for g in (storage.groups[0].values() if storage.groups else ())}
            return LoraBatch(mode="dense", weights=weights.to(device, dtype, non_blocking=True), rows=rows,
                             gather=gather)
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
        return LoraBatch(mode="bgmv", index=index.to(device, non_blocking=True),
                         scales=scales.to(device, dtype, non_blocking=True))
