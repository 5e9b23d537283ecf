"""A Triton matmul over int4 and int8 `quant.QuantWeight`s: y = x @ W^T (+ bias), each tile of codes
dequantized in registers, so no dense copy of the weight is written and read back every step (the
PyTorch path's cost: as many bytes again as the bf16 weight it replaces).

    for each tile of rows m and outputs n:
        acc = 0
        for k0 in steps of BLOCK_K (BLOCK_K divides the group, so one scale per output per step):
            w = (codes[n, k0:k0 + BLOCK_K] - zero[n, k0 // group]) * scale[n, k0 // group]
            acc += x[m, k0:k0 + BLOCK_K] @ w^T                      (float32 accumulation)
        y[m, n] = acc (+ bias[n])

`QuantWeight.linear` (dequantize, then F.linear) is the reference; tests/engines/text/test_quantized.py
runs this kernel under Triton's interpreter on the CPU and compares. Not yet run or timed on a GPU:
the tile sizes are a first guess, untuned. fp8 weights stay on the PyTorch path.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine runs without Triton: QuantWeight.linear does the same math
    triton = None

from .quant import QuantWeight

__all__ = ["available", "matmul"]


def available(device: torch.device) -> bool:
    """True where the kernel can run: a CUDA device (or Triton's interpreter, for tests)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _quant_matmul_kernel(x_ptr, stride_xm, c_ptr, stride_cn, s_ptr, stride_sn, z_ptr, stride_zn, b_ptr,
                             y_ptr, stride_ym, M, N, K, GROUP: tl.constexpr, INT4: tl.constexpr,
                             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None], other=0.0)
            g = k0 // GROUP
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            if INT4:  # two codes a byte along the inputs: input 2j in the low nibble, 2j + 1 in the high one
                c = tl.load(c_ptr + offs_n[None, :] * stride_cn + (kk // 2)[:, None], mask=n_ok[None, :], other=0)
                shift = ((kk % 2) * 4).to(tl.uint8)
                q = ((c >> shift[:, None]) & 0xF).to(tl.float32)
                z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_ok, other=0).to(tl.float32)
                w = (q - z[None, :]) * s[None, :]  # [BLOCK_K, BLOCK_N]
            else:
                c = tl.load(c_ptr + offs_n[None, :] * stride_cn + kk[:, None], mask=n_ok[None, :], other=0)
                w = c.to(tl.float32) * s[None, :]
            if IEEE:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block_k(group: int) -> int | None:
    """The largest of 64/32/16 that divides the group (tl.arange needs a power of two)."""
    return next((b for b in (64, 32, 16) if group % b == 0), None)


def matmul(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, in] @ W^T (+ bias) in x's dtype, or None (nothing done) where the kernel does not take
    the weight (fp8, groups not a multiple of 16): the caller uses `QuantWeight.linear`. A launch
    that fails raises (`kernels` decides)."""
    block_k = _block_k(weight.group)
    if triton is None or weight.kind == "fp8" or block_k is None or x.dim() != 2:
        return None
    x = x.contiguous()
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64
    zeros = weight.zeros if weight.zeros is not None else weight.scales  # unread for int8
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _quant_matmul_kernel[grid](x, x.stride(0), weight.codes, weight.codes.stride(0), weight.scales,
                               weight.scales.stride(0), zeros, zeros.stride(0), bias if bias is not None else y,
                               y, y.stride(0), m, n, k, GROUP=weight.group, INT4=weight.kind == "int4",
                               HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y
