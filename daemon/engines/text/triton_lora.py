"""One Triton kernel for the expand half of dense multi-LoRA: every member of a projection group
(q/k/v, gate/up) in one launch, with each row's scales applied on the fly.

After the fused GEMM, y = x @ fused[:base_out + K*n]^T holds the base output in its first
`base_out` columns and then the shrink of pool rows 0..K-1 of each member, in blocks of ROW_BLOCK
rows per member (`GroupSlots.row_index`). The kernel computes

    y[t, out_cols_j] += sum_p (shrink_j[t, p] * weights[t, p]) * B_j[p]     for every member j

reading each B once per row tile. The PyTorch path it replaces takes a multiply, a copy and one
GEMM per member; at decode batch sizes every kernel costs a few microseconds whatever its size, so
this is what the launches per step come down to. `lora.lora_expand_fused` is the reference it is
tested against (tests/engines/text/test_triton_lora.py, also under Triton's interpreter on a CPU).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine runs without Triton: the PyTorch path does the same math
    triton = None

from .lora_pool import ROW_BLOCK, GroupSlots

__all__ = ["available", "expand_fused"]

_MAX_MEMBERS = 3


def available(device: torch.device) -> bool:
    """True where the kernel can run: a CUDA device (or Triton's interpreter, for tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _expand_kernel(y_ptr, stride_y, stride_yc, w_ptr, stride_w, b_ptr, stride_b, r_ptr, stride_r, stride_rc,
                       rows, shrink_col, b_start1, b_start2, out_start0, out_start1, out_start2,
                       WIDTH: tl.constexpr, MEMBERS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                       RESIDUAL: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        col0 = pid_n * BLOCK_N  # first column of this tile in b_cat
        # The member this tile belongs to (tiles never straddle two: BLOCK_N divides every width).
        j = (col0 >= b_start1).to(tl.int32) + (col0 >= b_start2).to(tl.int32)
        b_start = tl.where(j == 0, 0, tl.where(j == 1, b_start1, b_start2))
        out_start = tl.where(j == 0, out_start0, tl.where(j == 1, out_start1, out_start2))
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m[:, None] < rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, WIDTH, BLOCK_K):
            p = k0 + offs_k  # pool rows; member j's shrink of row p sits in blocks of ROW_BLOCK columns
            cols = shrink_col + (p // ROW_BLOCK) * (ROW_BLOCK * MEMBERS) + j * ROW_BLOCK + p % ROW_BLOCK
            s = tl.load(y_ptr + offs_m[:, None] * stride_y + cols[None, :] * stride_yc, mask=row_ok, other=0.0)
            w = tl.load(w_ptr + offs_m[:, None] * stride_w + p[None, :], mask=row_ok, other=0.0)
            b = tl.load(b_ptr + p[:, None] * stride_b + offs_n[None, :])
            scaled = (s.to(tl.float32) * w.to(tl.float32)).to(b.dtype)
            if IEEE:
                acc += tl.dot(scaled, b, input_precision="ieee")
            else:
                acc += tl.dot(scaled, b)
        out_cols = out_start + (offs_n - b_start)
        out_ptrs = y_ptr + offs_m[:, None] * stride_y + out_cols[None, :] * stride_yc
        out = tl.load(out_ptrs, mask=row_ok, other=0.0)
        if RESIDUAL:  # the caller's residual stream, added in the same pass (one launch less per use)
            acc += tl.load(r_ptr + offs_m[:, None] * stride_r + out_cols[None, :] * stride_rc, mask=row_ok,
                           other=0.0).to(tl.float32)
        tl.store(out_ptrs, (out.to(tl.float32) + acc).to(out.dtype), mask=row_ok)


def _largest_divisor(n: int, choices: tuple[int, ...]) -> int | None:
    return next((c for c in choices if n % c == 0), None)


def expand_fused(y: torch.Tensor, group: GroupSlots, weights: torch.Tensor,
                 config: dict[str, int] | None = None, *, residual: torch.Tensor | None = None) -> bool:
    """Run the kernel (adding `residual` [T, base_out] too, where given); False (nothing done) where
    its shape rules do not hold, so the caller falls back to PyTorch: member widths must share a
    multiple of 16, and so must the pool rows read. A launch that fails raises (`kernels` decides)."""
    if triton is None or len(group.members) > _MAX_MEMBERS or not (y.is_cuda or _interpreting()):
        return False
    if weights.stride(1) != 1:
        return False
    rows, width = y.shape[0], weights.shape[1]
    # The same in every layer: planned once per group layout, pool width, row class and dtype
    # (prompt steps launch this 4 times a layer, and the host time adds up).
    plan = _plan(group.out_cols, width, _row_class(rows), y.element_size(), _shared_memory(y.device),
                 tuple(sorted((config or {}).items())))
    if plan is None:
        return False
    block_m, block_n, block_k, b_starts, out_starts, warps, stages = plan
    b_cat = group.b_cat
    grid = (b_cat.shape[1] // block_n, triton.cdiv(rows, block_m))
    _launch(grid, y, weights, b_cat, residual, rows, group.base_out, len(group.members), b_starts, out_starts,
            width, (block_m, block_n, block_k), warps, stages)
    return True


def _row_class(rows: int) -> int:
    """The row counts the tile choice tells apart: <= 16, <= 32 (decode), <= 64, <= 192, more
    (prompt chunks, or many streams)."""
    return next(i for i, top in enumerate((16, 32, 64, 192, 1 << 62)) if rows <= top)


@functools.lru_cache(maxsize=1024)
def _plan(out_cols: tuple[tuple[int, int], ...], width: int, row_class: int, element_size: int, shared_memory: int,
          config: tuple[tuple[str, int], ...]) -> tuple[Any, ...] | None:
    """Tiles, member offsets, warps and stages for one launch shape; None where the kernel's shape
    rules do not hold (member widths must share a multiple of 16, and so must the pool rows read),
    or where PyTorch's path is faster. `config` overrides the tuned choices
    (benchmarks/tune_lora_expand.py)."""
    widths = [hi - lo for lo, hi in out_cols]
    cfg = dict(config)
    wide = sum(widths) >= 8192
    if not cfg and wide and row_class >= 3:
        # gate/up over more than 64 rows: cuBLAS's GEMM per member beats every tile tried (288 rows,
        # 32 slots x rank 16 on an H200: 21.7 us a launch against 26.2 at best).
        return None
    # Tuned on an H200 with benchmarks/tune_lora_expand.py (Llama-3.2-1B's groups; 32 slots x rank
    # 16 and 128 x 16; B read from HBM). Decode (<= 32 rows): wide outputs (gate/up) take wide
    # tiles; narrow ones (q/k/v, o, down) narrow tiles 128-deep in K, and half-height row tiles
    # when that is what gives enough CTAs to stream B. More rows: tiles 128 wide and 128 deep, so
    # each row tile's scaled shrink is read for fewer column tiles (at 288 rows 7-8 us a launch
    # against 20-23 with the decode tiles).
    many = row_class >= 2
    narrow_n = (128, 64, 32, 16) if many else (32, 16)
    block_n = cfg.get("BLOCK_N") or _largest_divisor(math.gcd(*widths), (128, 64, 32, 16) if wide else narrow_n)
    block_k = cfg.get("BLOCK_K") or _largest_divisor(width, (64, 32, 16) if wide else (128, 64, 32, 16))
    if block_n is None or block_k is None:
        return None
    tiles_n = sum(widths) // block_n
    if wide or not many:
        block_m = 16 if row_class == 0 or tiles_n < 80 else 32 if row_class == 1 else 64
    else:
        block_m = (16, 32, 64)[row_class - 2]
    block_m = cfg.get("BLOCK_M") or block_m
    b_starts = tuple([0, *itertools.accumulate(widths[:-1])] + [1 << 30] * (_MAX_MEMBERS - len(widths)))
    out_starts = tuple([lo for lo, _ in out_cols] + [0] * (_MAX_MEMBERS - len(widths)))
    # Pipeline stages: no more than the GPU's shared memory holds (consumer GPUs have about 100 KB
    # per block, an H200 228 KB), keeping one stage's worth spare.
    stage_bytes = (2 * block_m * block_k + block_k * block_n) * element_size
    top = 3 if many and not wide else 5 if wide else 6
    stages = cfg.get("num_stages") or max(1, min(top, shared_memory // stage_bytes - 1))
    warps = cfg.get("num_warps", 2 if row_class == 0 or (many and not wide and row_class == 2) else 4)
    return block_m, block_n, block_k, b_starts, out_starts, warps, stages


@functools.cache
def _shared_memory(device: torch.device) -> int:
    """Shared memory one CTA may use on `device` (bytes)."""
    if device.type != "cuda":
        return 1 << 20  # the interpreter: no limit worth modelling
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024


def _launch(grid: tuple[int, int], y: torch.Tensor, weights: torch.Tensor, b_cat: torch.Tensor,
            residual: torch.Tensor | None, rows: int, shrink_col: int, members: int, b_starts: list[int],
            out_starts: list[int], width: int, blocks: tuple[int, int, int], warps: int, stages: int) -> None:
    block_m, block_n, block_k = blocks
    r = y if residual is None else residual  # the residual's columns are the group's output columns
    _expand_kernel[grid](
        y, y.stride(0), y.stride(1), weights, weights.stride(0), b_cat, b_cat.stride(0), r, r.stride(0), r.stride(1),
        rows, shrink_col, b_starts[1], b_starts[2], out_starts[0], out_starts[1], out_starts[2],
        WIDTH=width, MEMBERS=members, ROW_BLOCK=ROW_BLOCK, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=y.dtype == torch.float32, RESIDUAL=residual is not None, num_warps=warps, num_stages=stages)

