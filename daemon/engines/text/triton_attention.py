"""Decode attention straight from the paged KV cache, one Triton launch per layer.

For each decode row and each KV head (a program each), the kernel walks the row's block table in
tiles of positions, and keeps an online softmax over them (the flash-decoding recurrence):

    s = q . k_p / sqrt(d)  for p < len (and p >= len - window)
    out = sum_p softmax(s)_p v_p

The query heads that share a KV head (GQA) are the rows of one tile matrix, so K and V are read
once per KV head. Nothing is gathered: the PyTorch path (`kv.decode_attention`) copies every
position a step reads first, and is the reference this kernel is tested against
(tests/engines/text/test_triton_attention.py, also under Triton's interpreter on a CPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path serves
    triton = None

__all__ = ["available", "paged_decode"]

_TILE = 64  # positions per loop iteration (a multiple of every block size used)


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
                             stride_qt, stride_qh, stride_ks, stride_kh, stride_tb, stride_tw, stride_ot, stride_oh,
                             scale, window,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_PAD: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        length = tl.load(lens_ptr + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        qmask = g < GROUP
        q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask[:, None],
                    other=0.0)
        first = length * 0  # the type of `length` (int64), as the branch below assigns
        if window > 0:
            first = tl.maximum(length - window, 0)
        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        for t0 in range((first // TILE) * TILE, length, TILE):
            pos = t0 + tl.arange(0, TILE)
            valid = (pos < length) & (pos >= first)
            block = tl.load(tables_ptr + row * stride_tb + (pos // BLOCK_SIZE) * stride_tw, mask=valid, other=0)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
            k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=valid[:, None],
                        other=0.0)
            if IEEE:  # noqa: SIM108 (constexpr branches, as Triton compiles them)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=valid[:, None],
                        other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / total[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qmask[:, None])


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, window: int | None, block_size: int) -> torch.Tensor | None:
    """Attention of q [D, heads, dim] over positions 0..lens-1 of each row's blocks (tables [D, W]);
    k_pool / v_pool [slots, kv_heads, dim]. None where the shapes do not suit the kernel."""
    rows, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    if triton is None or heads % kv_heads or dim & (dim - 1) or dim < 16 or _TILE % block_size:
        return None
    group = heads // kv_heads
    out = torch.empty_like(q)
    if rows:
        _paged_decode_kernel[(rows, kv_heads)](
            q, k_pool, v_pool, tables, lens, out, q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
            tables.stride(0), tables.stride(1), out.stride(0), out.stride(1), dim ** -0.5, window or 0,
            BLOCK_SIZE=block_size, HEAD_DIM=dim, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            TILE=_TILE, IEEE=q.dtype == torch.float32, num_warps=4)
    return out
