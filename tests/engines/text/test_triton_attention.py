"""The Triton paged decode attention equals the PyTorch gather-then-attend path: on CUDA where there
is one, and always under Triton's interpreter on the CPU (a subprocess: the interpreter is chosen
when kernels are defined). Shuffled block tables, GQA, lengths that end mid-block, a window."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import ROOT

triton = pytest.importorskip("triton", reason="Triton is not installed (CI installs it with the dev extra)")


def max_error(device: str, dtype: torch.dtype) -> float:
    from daemon.engines.text.config import ModelSpec
    from daemon.engines.text.kv import PagedKV, decode_attention, gather_index
    from daemon.engines.text.triton_attention import paged_decode

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, bs = 8, 2, 64, 16
    spec = ModelSpec(name="t", family="llama", vocab_size=10, hidden_size=heads * dim, num_layers=1, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=dim, intermediate_size=16, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False)
    kv = PagedKV(spec, num_blocks=40, block_size=bs, device=torch.device(device), dtype=dtype)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    lens = torch.tensor([1, 17, 64, 130, 200])
    order = torch.randperm(39, generator=g) + 1  # blocks in no particular order
    width = 16
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for r, n in enumerate(lens.tolist()):
        need = -(-n // bs)
        tables[r, :need] = order[used:used + need]
        used += need
    q = torch.randn(len(lens), heads, dim, generator=g).to(device, dtype)
    # A transposed copy, as CUDA graphs keep their tables: rows are not contiguous.
    tables, lens = tables.t().contiguous().to(device).t(), lens.to(device)
    worst = 0.0
    for window in (None, 50):
        want = decode_attention(q, kv, 0, gather_index(tables, int(lens.max()), bs), lens, window).float()
        got = paged_decode(q, kv.k[0], kv.v[0], tables, lens, window, bs)
        assert got is not None
        worst = max(worst, ((got.float() - want).abs().max() / want.abs().max()).item())
    return worst


def test_kernel_under_the_interpreter_equals_the_gather_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sys, torch; sys.path[:0] = ['tests', 'tests/engines/text']; "
            "from test_triton_attention import max_error; print('error', max_error('cpu', torch.float32))")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    err = float(run.stdout.split("error", 1)[1].split()[0])
    assert err < 1e-5, run.stdout


if torch.cuda.is_available():

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_kernel_on_cuda_equals_the_gather_path(dtype: torch.dtype) -> None:
        assert max_error("cuda", dtype) < (1e-4 if dtype == torch.float32 else 2e-2)


def prefill_error(device: str, dtype: torch.dtype) -> float:
    """The prefill kernel against `kv.prefill_attention` on three chunks: one from position 0, two
    after cached prefixes, one ending mid-block; with and without a window."""
    from daemon.engines.text.config import ModelSpec
    from daemon.engines.text.kv import PagedKV, PrefillChunk, PrefillPack, prefill_attention
    from daemon.engines.text.triton_attention import paged_prefill

    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, bs = 8, 2, 32, 16
    spec = ModelSpec(name="t", family="llama", vocab_size=10, hidden_size=heads * dim, num_layers=1, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=dim, intermediate_size=16, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False)
    kv = PagedKV(spec, num_blocks=48, block_size=bs, device=torch.device(device), dtype=dtype)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    # (pos0, count) per chunk; their sequences' blocks in no particular order
    shapes = [(0, 37), (96, 64), (150, 5)]
    order = torch.randperm(47, generator=g) + 1
    tables = torch.zeros(len(shapes), 16, dtype=torch.long)
    used = 0
    chunks, start = [], 0
    for j, (pos0, count) in enumerate(shapes):
        need = -(-(pos0 + count) // bs)
        tables[j, :need] = order[used:used + need]
        used += need
        chunks.append(PrefillChunk(start=start, end=start + count, pos0=pos0, table=j))
        start += count
    q = torch.randn(start, heads, dim, generator=g).to(device, dtype)
    tables = tables.to(device)
    meta = torch.tensor([[c.start, c.end - c.start, c.pos0] for c in chunks], device=device)
    worst = 0.0
    for window in (None, 40):
        pack = PrefillPack.build(chunks, tables, bs, window)
        want = torch.zeros_like(q, dtype=torch.float32)
        want[pack.tokens] = prefill_attention(q, kv, 0, pack).float()
        out = torch.zeros_like(q)
        assert paged_prefill(q, kv.k[0], kv.v[0], tables, meta, out, window, bs, 64)
        worst = max(worst, ((out.float() - want).abs().max() / want.abs().max()).item())
    return worst


def test_prefill_kernel_under_the_interpreter_equals_the_gather_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sys, torch; sys.path[:0] = ['tests', 'tests/engines/text']; "
            "from test_triton_attention import prefill_error; print('error', prefill_error('cpu', torch.float32))")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    err = float(run.stdout.split("error", 1)[1].split()[0])
    assert err < 1e-5, run.stdout


if torch.cuda.is_available():

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_prefill_kernel_on_cuda_equals_the_gather_path(dtype: torch.dtype) -> None:
        assert prefill_error("cuda", dtype) < (1e-4 if dtype == torch.float32 else 2e-2)
