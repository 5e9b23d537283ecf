"""Attention straight from the paged KV cache, one Triton launch per layer for the decode rows and
one for the prompt chunks of a step.

For each decode row and each KV head (a program each), the kernel walks the row's block table in
tiles of positions, and keeps an online softmax over them (the flash-decoding recurrence):

    s = q . k_p / sqrt(d)  for p < len (and p >= len - window)
    out = sum_p softmax(s)_p v_p

The query heads that share a KV head (GQA) are the rows of one tile matrix, so K and V are read
once per KV head. Prompt chunks work the same way with a tile of the chunk's queries (each query
sees the positions up to its own: the cached prefix and the chunk so far), one program per
(chunk, query tile, KV head); a chunk's start, length and first position are read from the device,
so a CUDA graph can replay one launch for any chunk. Nothing is gathered: the PyTorch paths
(`kv.decode_attention`, `kv.prefill_attention`) copy every position a step reads first, and are
the references these kernels are tested against (tests/engines/text/test_triton_attention.py, also
under Triton's interpreter on a CPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path serves
    triton = None

__all__ = ["available", "paged_decode", "paged_prefill"]

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


if triton is not None:

    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, meta_ptr, out_ptr,
                              stride_qt, stride_qh, stride_ks, stride_kh, stride_tb, stride_tw, stride_ot, stride_oh,
                              scale, window,
                              BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                              BLOCK_Q: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
        chunk = tl.program_id(0)
        q0 = tl.program_id(1) * BLOCK_Q
        kvh = tl.program_id(2)
        start = tl.load(meta_ptr + chunk * 3)  # flat index of the chunk's first token
        count = tl.load(meta_ptr + chunk * 3 + 1)
        pos0 = tl.load(meta_ptr + chunk * 3 + 2)
        if q0 < count:
            r = tl.arange(0, BLOCK_Q * GROUP)  # query i = r // GROUP of the tile, head r % GROUP of the group
            i = q0 + r // GROUP
            head = kvh * GROUP + r % GROUP
            qmask = i < count
            qpos = pos0 + i
            d = tl.arange(0, HEAD_DIM)
            q = tl.load(q_ptr + (start + i)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=qmask[:, None], other=0.0)
            last = pos0 + tl.minimum(q0 + BLOCK_Q, count)  # keys up to the tile's last query
            first = last * 0
            if window > 0:
                first = tl.maximum(pos0 + q0 - window + 1, 0)
            m = tl.full((BLOCK_Q * GROUP,), float("-inf"), dtype=tl.float32)
            total = tl.zeros((BLOCK_Q * GROUP,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_Q * GROUP, HEAD_DIM), dtype=tl.float32)
            for t0 in range((first // TILE) * TILE, last, TILE):
                pos = t0 + tl.arange(0, TILE)
                inside = pos < last
                block = tl.load(tables_ptr + chunk * stride_tb + (pos // BLOCK_SIZE) * stride_tw, mask=inside, other=0)
                slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
                k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=inside[:, None],
                            other=0.0)
                if IEEE:  # noqa: SIM108 (constexpr branches, as Triton compiles them)
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                seen = inside[None, :] & (pos[None, :] <= qpos[:, None])
                if window > 0:
                    seen = seen & (pos[None, :] > qpos[:, None] - window)
                s = tl.where(seen, s * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m - m_safe)
                total = total * alpha + tl.sum(p, axis=1)
                v = tl.load(v_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=inside[:, None],
                            other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            tl.store(out_ptr + (start + i)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=qmask[:, None])


def prefill_config(dim: int, dtype: torch.dtype) -> dict[str, int]:
    """The prompt kernel's tile: ROWS query rows (queries x the heads of one KV group), TILE
    positions per iteration, Triton's warps and pipeline stages (`benchmarks/tune_prefill_attention.py`
    chose them on an H200). float32 (the tests' IEEE path) keeps small tiles: registers."""
    if dtype == torch.float32:
        return {"ROWS": 64, "TILE": _TILE, "num_warps": 4, "num_stages": 3}
    if dim <= 64:  # 1B: 36.3 -> 30.9 us a launch for a 256-token chunk of a 1,536-token prompt
        return {"ROWS": 16, "TILE": 64, "num_warps": 2, "num_stages": 3}
    return {"ROWS": 32, "TILE": 128, "num_warps": 4, "num_stages": 2}  # 8B (dim 128): 44.3 -> 34.1 us


def paged_prefill(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                  meta: torch.Tensor, out: torch.Tensor, window: int | None, block_size: int, longest: int,
                  config: dict[str, int] | None = None) -> bool:
    """Attention of every prompt chunk's queries (rows of q [T, heads, dim]) over its sequence's
    positions up to each query, written to the same rows of `out`; meta [C, 3] holds each chunk's
    (first flat token, token count, first position), tables [C, W] its sequence's blocks, `longest`
    bounds the counts. False (nothing done) where the shapes do not suit the kernel. `config`
    overrides `prefill_config` (the tuning script)."""
    _, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    cfg = config or prefill_config(dim, q.dtype)
    tile = cfg["TILE"]
    if triton is None or heads % kv_heads or dim & (dim - 1) or dim < 16 or tile % block_size:
        return False
    group = heads // kv_heads
    if group & (group - 1):
        return False
    block_q = max(cfg["ROWS"], group) // group
    chunks = meta.shape[0]
    if chunks and longest:
        _paged_prefill_kernel[(chunks, triton.cdiv(longest, block_q), kv_heads)](
            q, k_pool, v_pool, tables, meta, out, q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
            tables.stride(0), tables.stride(1), out.stride(0), out.stride(1), dim ** -0.5, window or 0,
            BLOCK_SIZE=block_size, HEAD_DIM=dim, GROUP=group, BLOCK_Q=block_q, TILE=tile,
            IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return True


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
