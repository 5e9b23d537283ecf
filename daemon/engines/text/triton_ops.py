"""Triton kernels for the per-layer glue of a CUDA decode step: RMSNorm, rotary embeddings and the
MLP's SiLU-and-multiply; and, after the step, constrained rows' token masks on the logits.

A decode step of a 1B model on an H200 is bound by kernel count, not bytes: each layer's norms
and RoPE took ~20 small PyTorch kernels (casts, powers, means, a cat for rotate-half, ...), at a
few microseconds each even inside a CUDA graph. Each function here is one launch and computes what
`kernels.rms_norm_reference` / `rope_reference` / `silu_mul_reference` compute (float32 math, one
rounding to the model's dtype at the same points); tests/engines/text/test_triton_ops.py compares them, on CUDA and
under Triton's interpreter on a CPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the model uses its PyTorch reference instead
    triton = None

__all__ = ["mask_tokens_", "rms_norm", "rope_qk_", "rope_write_", "silu_mul"]

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, stride_x, w_ptr, y_ptr, stride_y, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = (x * r).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_y + cols, y, mask=mask)

    @triton.jit
    def _rope_kernel(qkv_ptr, stride_t, cos_ptr, sin_ptr, stride_c, slots_ptr, k_cache_ptr, v_cache_ptr,
                     stride_slot, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, WRITE_KV: tl.constexpr):
        # Program (t, head): the first HEADS + KV_HEADS heads of token t are rotated in place; with
        # WRITE_KV (then q heads, k heads, v heads) each k head (rotated) and v head also goes to the
        # token's slot of the layer's KV cache: one launch, not three.
        t = tl.program_id(0)
        head = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        mask = i < HALF
        base = qkv_ptr + t * stride_t + head * HEAD_DIM
        x1 = tl.load(base + i, mask=mask, other=0.0)
        x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
        if head < HEADS + KV_HEADS:
            c = cos_ptr + t * stride_c
            s = sin_ptr + t * stride_c
            c1 = tl.load(c + i, mask=mask, other=0.0)
            c2 = tl.load(c + HALF + i, mask=mask, other=0.0)
            s1 = tl.load(s + i, mask=mask, other=0.0)
            s2 = tl.load(s + HALF + i, mask=mask, other=0.0)
            y1 = (x1.to(tl.float32) * c1 - x2.to(tl.float32) * s1).to(qkv_ptr.dtype.element_ty)
            y2 = (x2.to(tl.float32) * c2 + x1.to(tl.float32) * s2).to(qkv_ptr.dtype.element_ty)
            tl.store(base + i, y1, mask=mask)
            tl.store(base + HALF + i, y2, mask=mask)
            if WRITE_KV:  # noqa: SIM102 (a constexpr test apart from a runtime one)
                if head >= HEADS:
                    dst = k_cache_ptr + tl.load(slots_ptr + t) * stride_slot + (head - HEADS) * HEAD_DIM
                    tl.store(dst + i, y1, mask=mask)
                    tl.store(dst + HALF + i, y2, mask=mask)
        elif WRITE_KV:
            dst = v_cache_ptr + tl.load(slots_ptr + t) * stride_slot + (head - HEADS - KV_HEADS) * HEAD_DIM
            tl.store(dst + i, x1, mask=mask)
            tl.store(dst + HALF + i, x2, mask=mask)

    @triton.jit
    def _mask_tokens_kernel(logits_ptr, stride_l, bits_ptr, stride_b, rows_ptr, vocab, BLOCK: tl.constexpr):
        i = tl.program_id(0)  # the i-th constrained row, logits row rows[i], bitmask row i
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        row = tl.load(rows_ptr + i)
        words = tl.load(bits_ptr + i * stride_b + cols // 32, mask=mask, other=0)
        allowed = ((words >> (cols % 32)) & 1) != 0
        ptr = logits_ptr + row * stride_l + cols
        x = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, tl.where(allowed, x, float("-inf")), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, stride_gu, y_ptr, stride_y, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty)  # F.silu rounds here, then the product
        tl.store(y_ptr + row * stride_y + cols, (act.to(tl.float32) * u).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [T, n] (rows may be strided, columns contiguous)."""
    assert x.dim() == 2 and x.stride(1) == 1
    t, n = x.shape
    y = torch.empty(t, n, device=x.device, dtype=x.dtype)
    if t:
        _rms_norm_kernel[(t,)](x, x.stride(0), weight, y, y.stride(0), n, eps, BLOCK=triton.next_power_of_2(n))
    return y


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate, in place, the first `heads` heads of each row of qkv [T, >= heads * head_dim] (the q
    heads followed by the k heads) by cos/sin [T, head_dim] (float32, rotate-half convention)."""
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous() and head_dim % 2 == 0
    half = head_dim // 2
    if t:  # no cache: the pointers are not read
        _rope_kernel[(t, heads)](qkv, qkv.stride(0), cos, sin, cos.stride(0), qkv, qkv, qkv, 0, HEADS=heads,
                                 KV_HEADS=0, HEAD_DIM=head_dim, HALF=half, BLOCK=triton.next_power_of_2(half),
                                 WRITE_KV=False)



def rope_write_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """`rope_qk_` of the q and k heads of qkv [T, (heads + 2 kv_heads) * head_dim], and each token's k
    (rotated) and v heads written to row slots[t] of the caches [slots, kv_heads, head_dim]."""
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous() and head_dim % 2 == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[1:] == (kv_heads, head_dim)
    half = head_dim // 2
    if t:
        _rope_kernel[(t, heads + 2 * kv_heads)](
            qkv, qkv.stride(0), cos, sin, cos.stride(0), slots, k_cache, v_cache, k_cache.stride(0), HEADS=heads,
            KV_HEADS=kv_heads, HEAD_DIM=head_dim, HALF=half, BLOCK=triton.next_power_of_2(half), WRITE_KV=True)

def silu_mul(gu: torch.Tensor, n: int) -> torch.Tensor:
    """silu(gu[:, :n]) * gu[:, n:2n] for the fused gate/up output gu [T, >= 2n] (rows may be strided)."""
    assert gu.dim() == 2 and gu.stride(1) == 1
    t = gu.shape[0]
    y = torch.empty(t, n, device=gu.device, dtype=gu.dtype)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gu, gu.stride(0), y, y.stride(0), n, BLOCK=block)
    return y


def mask_tokens_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set, in place, logits[rows[i], t] to -inf wherever bit t of bitmask[i] (int32 words, bit t % 32
    of word t // 32) is 0: llguidance's layout. One launch for all constrained rows."""
    assert logits.stride(1) == 1 and bitmask.dtype == torch.int32 and bitmask.is_contiguous()
    n, vocab = rows.shape[0], logits.shape[1]
    if n:
        block = 1024
        _mask_tokens_kernel[(n, triton.cdiv(vocab, block))](logits, logits.stride(0), bitmask, bitmask.stride(0), rows,
                                                          vocab, BLOCK=block)
