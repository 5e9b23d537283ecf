"""Deterministic mode's attention on a GPU (`invariant.InvariantKernels` with Triton): a query gets
the same bits as a decode row alone, as a decode row among others, and inside prompt chunks of any
start and length beside other chunks, with and without a window; and it equals the gather path.
On CUDA where there is one, and always under Triton's interpreter on the CPU (a subprocess: the
interpreter is chosen when kernels are defined)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import ROOT

pytest.importorskip("triton", reason="Triton is not installed (CI installs it with the dev extra)")


def attention_problems(device: str, dtype: torch.dtype) -> list[str]:
    from daemon.engines.text.config import ModelSpec
    from daemon.engines.text.invariant import InvariantKernels
    from daemon.engines.text.kv import PagedKV, decode_attention, gather_index

    dev = torch.device(device)
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, bs = 8, 2, 64, 16
    spec = ModelSpec(name="t", family="llama", vocab_size=10, hidden_size=heads * dim, num_layers=1, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=dim, intermediate_size=16, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False)
    kv = PagedKV(spec, num_blocks=64, block_size=bs, device=dev, dtype=dtype)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    kernels = InvariantKernels(dev, dtype, fixed_rows=True)
    assert kernels._attention is not None, "the Triton path was meant to run"
    lens = [130, 1, 17, 64, 200, 90, 33, 5]  # sequence 0 is the one watched
    order = (torch.randperm(63, generator=g) + 1).tolist()
    width = 16
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    for r, n in enumerate(lens):
        need = -(-n // bs)
        tables[r, :need] = torch.tensor(order[:need])
        order = order[need:]
    tables = tables.to(dev)
    target = 0
    pos = lens[target] - 1
    chunk_q = torch.randn(48, heads, dim, generator=g).to(dev, dtype)  # queries at positions pos-47 .. pos
    q_last = chunk_q[-1:]
    others = torch.randn(len(lens) - 1, heads, dim, generator=g).to(dev, dtype)
    problems = []
    for window in (None, 50):
        alone = kernels.paged_decode(q_last, kv, 0, tables[:1], torch.tensor([lens[0]], device=dev), window)
        assert alone is not None
        want = decode_attention(q_last, kv, 0, gather_index(tables[:1], lens[0], bs),
                                torch.tensor([lens[0]], device=dev), window).float()
        err = ((alone.float() - want).abs().max() / want.abs().max()).item()
        if err > (1e-5 if dtype == torch.float32 else 2e-2):
            problems.append(f"window {window}: {err:.2e} from the gather path")
        # Among the others, third of eight rows.
        rows = torch.cat([others[:2], q_last, others[2:]])
        order_rows = [1, 2, 0, 3, 4, 5, 6, 7]
        out = kernels.paged_decode(rows, kv, 0, tables[order_rows], torch.tensor([lens[i] for i in order_rows],
                                                                                   device=dev), window)
        if not torch.equal(out[2:3], alone):
            problems.append(f"window {window}: a decode row among others differs from it alone")
        # In prompt chunks: the tail of the sequence as chunks of 48, 13 and 1 tokens, after another
        # sequence's chunk of 20.
        for length in (48, 13, 1):
            q_chunk = chunk_q[48 - length:]
            lead = torch.randn(20, heads, dim, generator=g).to(dev, dtype)
            q = torch.cat([lead, q_chunk])
            meta = torch.tensor([[0, 20, lens[4] - 20], [20, length, pos - length + 1]], device=dev)
            out = torch.zeros_like(q)
            assert kernels.paged_prefill(q, kv, 0, tables[[4, 0]], meta, out, window, 20 if length < 20 else length)
            if not torch.equal(out[-1:], alone):
                problems.append(f"window {window}: the query in a prompt chunk of {length} differs from the decode row")
    return problems


def test_under_the_interpreter_a_query_gets_the_same_bits_wherever_it_is_computed() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sys, torch; sys.path[:0] = ['tests', 'tests/engines/text']; "
            "from test_invariant_attention import attention_problems; "
            "print('problems', attention_problems('cpu', torch.float32))")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "problems []" in run.stdout, run.stdout


if torch.cuda.is_available():

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_on_cuda_a_query_gets_the_same_bits_wherever_it_is_computed(dtype: torch.dtype) -> None:
        assert attention_problems("cuda", dtype) == []
