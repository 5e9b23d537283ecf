"""The Triton RMSNorm, RoPE (alone and with the KV write), SiLU-and-multiply and token-mask kernels
equal the model's PyTorch references: on CUDA where there is one, and always under Triton's interpreter on the
CPU (a subprocess: the interpreter is chosen when kernels are defined). Odd sizes on purpose: a
hidden size that is not a power of two, a head dimension whose half is not one either, rows with a
stride (as the fused projections return them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import ROOT

triton = pytest.importorskip("triton", reason="Triton is not installed (CI installs it with the dev extra)")


def max_errors(device: str, dtype: torch.dtype) -> tuple[float, float, float, float]:
    """Largest relative errors of (rms_norm, rope_qk_, silu_mul, rope_write_) against the references."""
    from daemon.engines.text import triton_ops
    from daemon.engines.text.kernels import rms_norm_reference, rope_reference, silu_mul_reference

    g = torch.Generator().manual_seed(0)
    t, hidden, heads, kv_heads, head_dim = 7, 200, 3, 1, 40
    wide = torch.randn(t, hidden + 24, generator=g).to(device, dtype)
    x = wide[:, :hidden]  # strided rows
    w = (torch.rand(hidden, generator=g) + 0.5).to(device, dtype)
    want = rms_norm_reference(x, w, 1e-5).float()
    norm_err = ((triton_ops.rms_norm(x, w, 1e-5).float() - want).abs().max() / want.abs().max()).item()

    qs, kvs = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(t, qs + 2 * kvs + 8, generator=g).to(device, dtype)[:, :qs + 2 * kvs]
    pos = torch.tensor([0, 1, 5, 17, 300, 301, 2047]).double()
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    cos, sin = emb.cos().float().to(device), emb.sin().float().to(device)
    want_q = rope_reference(qkv[:, :qs].view(t, heads, head_dim), cos.unsqueeze(1), sin.unsqueeze(1)).float()
    want_k = rope_reference(qkv[:, qs:qs + kvs].view(t, kv_heads, head_dim), cos.unsqueeze(1), sin.unsqueeze(1)).float()
    v_before = qkv[:, qs + kvs:].clone()
    triton_ops.rope_qk_(qkv, cos, sin, heads + kv_heads, head_dim)
    got_q, got_k = qkv[:, :qs].view(t, heads, head_dim).float(), qkv[:, qs:qs + kvs].view(t, kv_heads, head_dim).float()
    assert torch.equal(qkv[:, qs + kvs:], v_before), "v must not move"
    rope_err = max(((got_q - want_q).abs().max() / want_q.abs().max()).item(),
                   ((got_k - want_k).abs().max() / want_k.abs().max()).item())

    inter = 1500  # more than one block of columns, not a power of two; rows strided as the fused gate/up
    gu = torch.randn(t, 2 * inter + 16, generator=g).mul(4).to(device, dtype)
    want_act = silu_mul_reference(gu, inter).float()
    act_err = ((triton_ops.silu_mul(gu, inter).float() - want_act).abs().max() / want_act.abs().max()).item()

    # RoPE with the KV write: q and k rotated in place, k and v in their slots, every other slot untouched.
    qkv = torch.randn(t, qs + 2 * kvs, generator=g).to(device, dtype)
    slots = torch.tensor([5, 0, 9, 63, 1, 2, 40], device=device)
    k_cache, v_cache = (torch.full((64, kv_heads, head_dim), 7.0, device=device, dtype=dtype) for _ in range(2))
    want_q = rope_reference(qkv[:, :qs].view(t, heads, head_dim), cos.unsqueeze(1), sin.unsqueeze(1)).float()
    want_k = rope_reference(qkv[:, qs:qs + kvs].view(t, kv_heads, head_dim), cos.unsqueeze(1), sin.unsqueeze(1))
    want_v = qkv[:, qs + kvs:].view(t, kv_heads, head_dim).clone()
    triton_ops.rope_write_(qkv, cos, sin, heads, kv_heads, head_dim, slots, k_cache, v_cache)
    others = torch.ones(64, dtype=torch.bool, device=device)
    others[slots] = False
    assert bool((k_cache[others] == 7.0).all()) and bool((v_cache[others] == 7.0).all()), "other slots must not move"
    assert torch.equal(v_cache[slots], want_v) and torch.equal(qkv[:, qs + kvs:].view(t, kv_heads, head_dim), want_v)
    assert torch.equal(k_cache[slots], qkv[:, qs:qs + kvs].view(t, kv_heads, head_dim)), "the cache holds the rotated k"
    write_err = max(((qkv[:, :qs].view(t, heads, head_dim).float() - want_q).abs().max() / want_q.abs().max()).item(),
                    ((k_cache[slots].float() - want_k.float()).abs().max() / want_k.float().abs().max()).item())

    # Token masks of constrained rows (llguidance's bitmask: bit t % 32 of int32 word t // 32), in place.
    vocab = 2500  # more than one block, not a multiple of 32
    logits = torch.randn(9, vocab, generator=g).to(device, torch.float32)
    rows = torch.tensor([7, 0, 3], device=device)
    bits = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), generator=g, dtype=torch.int64)
    bits = bits.to(torch.int32).to(device)
    allowed = ((bits.unsqueeze(-1) >> torch.arange(32, device=device, dtype=torch.int32)) & 1).view(3, -1)[:, :vocab]
    want = logits.clone()
    want[rows] = logits[rows].masked_fill(allowed == 0, float("-inf"))
    triton_ops.mask_tokens_(logits, rows, bits)
    assert torch.equal(logits, want) and 0 < int(torch.isinf(logits).sum()) < 3 * vocab
    return norm_err, rope_err, act_err, write_err


def test_kernels_under_the_interpreter_equal_references() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sys, torch; sys.path[:0] = ['tests', 'tests/engines/text']; "
            "from test_triton_ops import max_errors; print('errors', *max_errors('cpu', torch.float32))")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    errors = [float(v) for v in run.stdout.split("errors", 1)[1].split()]
    assert len(errors) == 4 and max(errors) < 1e-6, run.stdout


if torch.cuda.is_available():  # collected only where it can run (like the CUDA cases of test_correctness)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_kernels_on_cuda_equal_references(dtype: torch.dtype) -> None:
        errors = max_errors("cuda", dtype)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert max(errors) < tol, errors
