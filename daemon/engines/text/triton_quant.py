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
runs this kernel under Triton's interpreter on the CPU and compares (int4, int8), and on a GPU (int4,
int8, fp8). On CUDA the tile sizes are autotuned once per (rows bucket, outputs, inputs) while the
engine warms up (outside any CUDA graph capture); the interpreter runs one fixed tile. fp8 codes
(e4m3) are dequantized in registers too (weight-only, like int4/int8: the activations stay in the
compute dtype), on CUDA only: the interpreter has no fp8 loads, so there fp8 stays on the PyTorch path.
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
                             y_ptr, stride_ym, M, N, K, M_BUCKET, GROUP: tl.constexpr, INT4: tl.constexpr,
                             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1):
        # Codes are read as [BLOCK_N, BLOCK_K] tiles along their rows (contiguous, each byte once), and
        # BLOCK_K divides the group, so each step takes one scale (and zero) per output.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        # SPLIT_K > 1: program (n, m, s) sums inputs [s K / SPLIT_K, (s + 1) K / SPLIT_K) and adds its part
        # into y (float32, zeroed first): more programs, so more bytes in flight, on short matrices.
        pid_k = tl.program_id(2)
        k_lo = pid_k * (K // SPLIT_K)
        k_hi = k_lo + K // SPLIT_K
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        if INT4:  # two codes a byte along the inputs: input 2j in the low nibble, 2j + 1 in the high one
            offs_b = tl.arange(0, BLOCK_K // 2)
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                g = k0 // GROUP  # BLOCK_K divides the group: one scale and zero per output this step
                c = tl.load(c_ptr + offs_n[:, None] * stride_cn + (k0 // 2 + offs_b)[None, :], mask=n_ok[:, None],
                            other=0)
                q = tl.reshape(tl.join(c & 0xF, c >> 4), (BLOCK_N, BLOCK_K))  # [BLOCK_N, BLOCK_K] in input order
                sc = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_ok, other=0).to(tl.float32)
                w = (q.to(tl.float32) - z[:, None]) * sc[:, None]
                x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:  # int8 or fp8 codes (no `other`: an int fill cannot cast to fp8; masked-off outputs are never stored)
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                c = tl.load(c_ptr + offs_n[:, None] * stride_cn + kk[None, :], mask=n_ok[:, None])
                sc = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                w = c.to(tl.float32) * sc[:, None]  # [BLOCK_N, BLOCK_K]
                x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:  # noqa: SIM102 (a constexpr test apart from a runtime one)
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        else:
            tl.atomic_add(out, acc, mask=m_ok[:, None] & n_ok[None, :])

    def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
        group, k = kwargs["GROUP"], named_args["K"]
        return [c for c in configs  # one scale per step; the splits take whole steps
                if group % c.kwargs["BLOCK_K"] == 0 and k % (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]) == 0]

    def _zero_out(nargs: dict) -> None:
        nargs["y_ptr"].zero_()

    # Decode steps (a few rows; matmul sends more to the GEMM) are bound by reading the codes: narrow
    # output tiles and input splits make enough programs, deep pipelines keep enough bytes in flight.
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w,
                              num_stages=st, pre_hook=_zero_out if sk > 1 else None)
                for bn, bk, sk, w, st in ((16, 128, 1, 4, 6), (32, 128, 1, 4, 4), (64, 128, 1, 4, 4),
                                          (16, 256, 1, 4, 4), (32, 64, 1, 2, 6), (16, 128, 2, 4, 6),
                                          (32, 128, 2, 4, 4), (16, 128, 4, 4, 4), (32, 128, 4, 4, 4),
                                          (64, 128, 4, 4, 4), (16, 128, 8, 4, 4), (32, 64, 8, 2, 6))]
    _TUNE: dict = {"key": ["M_BUCKET", "N", "K", "GROUP", "INT4"], "prune_configs_by": {"early_config_prune": _prune}}

    def _bench(fn: object, quantiles: object = None) -> object:  # short trials: the engine tunes while it warms up
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    try:
        _tuned = triton.autotune(_CONFIGS, **_TUNE, do_bench=_bench)(_quant_matmul_kernel)
    except TypeError:  # a Triton without the do_bench hook: its default trials
        _tuned = triton.autotune(_CONFIGS, **_TUNE)(_quant_matmul_kernel)


def _block_k(group: int, kind: str, device: torch.device) -> int | None:
    """The widest of 64/32/16 inputs that divides the group (tl.arange needs a power of two; on a
    GPU an int4 tile's half must be at least 16 bytes)."""
    smallest = 32 if kind == "int4" and device.type == "cuda" else 16
    return next((b for b in (64, 32, 16) if group % b == 0 and b >= smallest), None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def matmul(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, in] @ W^T (+ bias) in x's dtype, or None (nothing done) where the kernel does not take
    the weight (fp8 off CUDA; groups not a multiple of 16 inputs, or of 32 for int4 on a GPU; more
    than 64 rows on a GPU, where dequantizing for the GEMM is faster): the caller uses
    `QuantWeight.linear`. A launch that fails raises (`kernels` decides)."""
    block_k = _block_k(weight.group, weight.kind, x.device)
    if triton is None or block_k is None or x.dim() != 2 or (weight.kind == "fp8" and x.device.type != "cuda"):
        return None
    x = x.contiguous()
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    if m > 64 and not _interpreting():  # prompt steps: dequantize and take the GEMM (faster here, measured)
        return None
    # float32 out on the tuned path (the splits add into it), then the compute dtype
    tuned = not (_interpreting() or weight.group % 64)
    y = torch.empty(m, n, device=x.device, dtype=torch.float32 if tuned else x.dtype)
    zeros = weight.zeros if weight.zeros is not None else weight.scales  # unread for int8 and fp8
    args = (x, x.stride(0), weight.codes, weight.codes.stride(0), weight.scales, weight.scales.stride(0), zeros,
            zeros.stride(0), bias if bias is not None else y, y, y.stride(0), m, n, k,
            16 if m <= 16 else 64)  # tuned per rows bucket
    flags = {"GROUP": weight.group, "INT4": weight.kind == "int4", "HAS_BIAS": bias is not None,
             "IEEE": x.dtype == torch.float32}
    if not tuned:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        grid = (triton.cdiv(n, 64), triton.cdiv(m, block_m))
        _quant_matmul_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, num_warps=4)
    else:
        _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])](
            *args, **flags)
        y = y.to(x.dtype)
    return y
