"""The LoRA pool: where every compute-resident adapter's matrices live, and how they are laid out.

Storage is a pool of rank rows, not fixed-size slots: an adapter of rank r takes r consecutive pool
rows, so a rank-8 adapter costs 8 rows however large `max_rank` is, and the rows in use are always
a prefix of the pool (`LoraSlotStorage.width`); nothing reads padding. The A rows of every pool row
live inside the model's weight for their projection group (`GroupSlots`), interleaved by member
(q/k/v) in blocks of ROW_BLOCK rows, so one GEMM over the base rows plus the prefix gives the base
output and every adapter's shrink at once. B rows sit side by side per member in `b_cat`.

Which adapter sits in which slot is `slots.SlotTable`'s business; this module only moves tensors.
The kernels (`cpu_lora`, `triton_lora`) and the ops (`lora`) read this layout; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["GROUPS", "ROW_BLOCK", "FusableModel", "GroupSlots", "LoraSlotStorage", "PreparedLora"]


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
    contiguous runs. The B's of the members sit side by side in `b_cat` [pool rows, their widths].
    Where the base weight is quantized (`quant`), `fused` holds the A rows only: `a_start` is 0
    instead of `base_out`, and the shrink runs as its own matmul."""

    key: str  # the model weight it extends: qkv, o, gate_up or down (the same layout in every layer)
    members: tuple[str, ...]
    out_cols: tuple[tuple[int, int], ...]  # each member's columns in the group's base output
    b_cols: tuple[tuple[int, int], ...]  # each member's columns in b_cat
    base_out: int
    fused: torch.Tensor
    fused_bias: torch.Tensor | None
    b_cat: torch.Tensor
    a_start: int  # the first A row of `fused`: base_out, or 0 where the base weight is not in it

    def row_index(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows of `fused` that hold member j's A for the given pool rows (any shape)."""
        g, n = ROW_BLOCK, len(self.members)
        return self.a_start + (rows // g) * (g * n) + j * g + rows % g

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
                base_out = sum(target_dims[t][1] for t in group)
                fused, bias = model.fuse_rows(i, key, len(members) * rows)
                a_start = fused.shape[0] - len(members) * rows  # base_out, or 0 (A rows apart from the base)
                assert a_start in (0, base_out), (key, a_start, base_out)
                b_cat = torch.zeros(rows, col, device=device, dtype=dtype)
                layer_groups[key] = GroupSlots(key, members, out_cols, tuple(b_cols), base_out, fused, bias,
                                               b_cat, a_start)
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
        return sum((g.fused.shape[0] - g.a_start) * g.fused.shape[1] * g.fused.element_size()
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
