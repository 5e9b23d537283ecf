"""The LoRA update of a CPU decode step as one compiled loop per projection group (numba).

Why: a decode step on a CPU multiplies a handful of rows. PyTorch's GEMMs at that shape (8 rows by
a rank-96 pool) run far below the memory bandwidth: on 2 EPYC cores the expands of SmolLM2's 30
layers took ~15 ms for 60 MB of B, while one core streams ~20 GB/s. And the dense path multiplies
every row by every resident adapter, although each row needs only its own.

This loop reads, for each row, only the pool rows its adapters own: the shrink is a dot product of
the row with each A row (from the model's fused weight, where the A rows live), the expand adds
that times the B row. Both inner loops are vectorised by LLVM. Rows are independent, so a mix of
adapters, base rows (all scales 0: nothing read) and several rows on one adapter need no special
case. One thread: the projections around it already use both cores, and a second thread pool
would fight PyTorch's.

It runs for float32 steps of at most `MAX_ROWS` rows (decode); prompt chunks stay on GEMMs, where
many tokens per adapter make them efficient. `available()` is False without numba, and the torch
path in `lora.py` serves instead. The first call compiles (about a second, cached on disk after).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .lora_pool import GroupSlots

__all__ = ["MAX_ROWS", "apply_group", "available", "usable"]

MAX_ROWS = 64  # larger steps (prompt chunks) go through GEMMs


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    from numba import njit

    @njit(fastmath=True, nogil=True, cache=True)
    def lora_group(y, x, a, weights, b, cols, n, g):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
        """y[t, cols_j] += sum_p weights[t, p] * (a[row(p, j)] . x[t]) * b[p, bcols_j] for member j;
        row(p, j) = (p // g) * g * n + j * g + p % g (the A rows' block layout, see GroupSlots)."""
        rows, width = weights.shape
        din = x.shape[1]
        for t in range(rows):
            xt = x[t]
            for p in range(width):
                w = weights[t, p]
                if w == 0.0:
                    continue
                block = (p // g) * g * n + p % g
                brow = b[p]
                for j in range(n):
                    arow = a[block + j * g]
                    s = 0.0
                    for k in range(din):
                        s += arow[k] * xt[k]
                    s *= w
                    ylo, blo, wid = cols[j, 0], cols[j, 1], cols[j, 2]
                    yrow = y[t, ylo:ylo + wid]
                    bseg = brow[blo:blo + wid]
                    for c in range(wid):
                        yrow[c] += s * bseg[c]

    return lora_group


@functools.cache
def available() -> bool:
    """numba is installed and compiles the kernel (a tiny call: it also warms the cache)."""
    try:
        kernel = _kernel()
        y = np.zeros((1, 2), np.float32)
        kernel(y, np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), np.ones((1, 1), np.float32),
               np.ones((1, 2), np.float32), np.array([[0, 0, 2]], np.int64), 1, 1)
        return bool(y[0, 0] == 2.0)
    except Exception:  # no numba, or no compiler backend on this platform: the torch path serves
        return False


def usable(x: torch.Tensor) -> bool:
    """Whether a step's projection input can take this path."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= MAX_ROWS


def apply_group(y: torch.Tensor, x: torch.Tensor, group: GroupSlots, weights: torch.Tensor, block: int) -> None:
    """y[T, base_out] += the LoRA update of every member of `group` for inputs x[T, d_in], where
    `weights` [T, K] is each row's scale per pool row of the prefix [0, K) (0: not read) and
    `block` is the A rows' block size (lora.ROW_BLOCK)."""
    _kernel()(y.numpy(), x.contiguous().numpy(), group.fused[group.a_start:].numpy(),
              weights.contiguous().numpy(), group.b_cat.numpy(), _columns(group.out_cols, group.b_cols),
              len(group.members), block)


@functools.cache
def _columns(out_cols: tuple[tuple[int, int], ...], b_cols: tuple[tuple[int, int], ...]) -> np.ndarray:
    """[members, 3]: each member's first column in y, first column in B, width (the same in every layer)."""
    return np.array([(lo, blo, hi - lo) for (lo, hi), (blo, _) in zip(out_cols, b_cols, strict=True)], dtype=np.int64)
