"""The fast LoRA paths (bgmv, dense) equal the plain reference loop, for base rows, single adapters and mixes."""

from __future__ import annotations

import pytest
import torch

from daemon.engines.text.lora import LoraBatch, lora_apply, lora_reference


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, r, d_in, d_out, t = 6, 8, 32, 24, 9
    a = torch.randn(s, r, d_in, generator=g)
    b = torch.randn(s, r, d_out, generator=g)
    x = torch.randn(t, d_in, generator=g)
    slots = [[], [0], [1], [2], [3], [0, 4], [5, 1, 2], [3], [4]]
    scales = [[], [1.0], [0.5], [-1.0], [2.0], [0.3, 0.7], [1.0, -0.5, 0.25], [0.0], [1.0]]
    return a, b, x, slots, scales


@pytest.mark.parametrize("mode", ["bgmv", "dense"])
@pytest.mark.parametrize("prefer_dense", [False, True])
def test_fast_paths_equal_reference(mode: str, prefer_dense: bool) -> None:
    """Both paths give the reference result, with mixes and zero-scale rows in one batch."""
    a, b, x, slots, scales = _case()
    batch = LoraBatch.build(slots, scales, max_rank=a.shape[1], num_slots=a.shape[0], device=torch.device("cpu"),
                            dtype=torch.float32, prefer_dense=prefer_dense, force=mode)  # type: ignore[arg-type]
    assert batch.mode == mode
    out = torch.zeros(x.shape[0], b.shape[2])
    lora_apply(x, out, a, b, batch)
    ref = lora_reference(x, a, b, slots, scales)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out[0].abs().max() == 0 and out[7].abs().max() == 0  # base row, zero scale


def test_dense_with_few_adapters_and_many_tokens() -> None:
    """A prefill-like step (many tokens, one adapter) plans the dense path over the active slot only."""
    a, b, x, _, _ = _case(1)
    slots = [[2]] * x.shape[0]
    scales = [[0.8]] * x.shape[0]
    batch = LoraBatch.build(slots, scales, max_rank=8, num_slots=6, device=torch.device("cpu"),
                            dtype=torch.float32, prefer_dense=False)
    assert batch.mode == "dense" and batch.active is not None and batch.active.tolist() == [2]
    out = torch.zeros(x.shape[0], b.shape[2])
    lora_apply(x, out, a, b, batch)
    torch.testing.assert_close(out, lora_reference(x, a, b, slots, scales), rtol=1e-5, atol=1e-5)


def test_all_base_rows_skip_lora() -> None:
    """A batch with no adapter anywhere does no LoRA work at all (the base-model fast path)."""
    batch = LoraBatch.build([[], [0]], [[], [0.0]], max_rank=4, num_slots=2, device=torch.device("cpu"),
                            dtype=torch.float32, prefer_dense=False)
    assert batch.mode == "none"


def test_planner_picks_bgmv_only_for_many_wide_adapters() -> None:
    """Eight decode tokens on eight rank-8 adapters: dense over all slots (no gathers at all);
    64 tokens on 64 rank-64 adapters: per-token gathers (dense would multiply by 4096 columns)."""
    slots = [[i] for i in range(8)]
    batch = LoraBatch.build(slots, [[1.0]] * 8, max_rank=8, num_slots=8, device=torch.device("cpu"),
                            dtype=torch.float32, prefer_dense=False)
    assert batch.mode == "dense" and batch.active is None
    slots = [[i] for i in range(64)]
    batch = LoraBatch.build(slots, [[1.0]] * 64, max_rank=64, num_slots=64, device=torch.device("cpu"),
                            dtype=torch.float32, prefer_dense=False)
    assert batch.mode == "bgmv"


@pytest.mark.parametrize("use_all", [True, False])
def test_grouped_dense_equals_per_target(use_all: bool) -> None:
    """Stacked A's of a projection group (q/k/v) give the same updates as one target at a time."""
    from daemon.engines.text.lora import lora_apply_group

    g = torch.Generator().manual_seed(5)
    n, s, r, d_in = 3, 8, 8, 32
    a_group = torch.randn(n, s, r, d_in, generator=g)
    bs = [torch.randn(s, r, d, generator=g) for d in (24, 8, 8)]
    x = torch.randn(5, d_in, generator=g)
    slots = [[0], [1], [3], [1, 3], []] if not use_all else [[0], [1], [3], [4, 5], [6, 7]]
    scales = [[1.0], [0.5], [-1.0], [0.3, 0.7], []] if not use_all else [[1.0], [0.5], [-1.0], [0.3, 0.7], [2, 1]]
    batch = LoraBatch.build(slots, scales, max_rank=r, num_slots=s, device=torch.device("cpu"),
                            dtype=torch.float32, prefer_dense=True, force="dense")
    assert (batch.active is None) == use_all
    fused = torch.zeros(5, 40)
    outs = [fused[:, :24], fused[:, 24:32], fused[:, 32:]]
    lora_apply_group(x, outs, a_group, bs, batch)
    for j, (lo, hi) in enumerate(((0, 24), (24, 32), (32, 40))):
        torch.testing.assert_close(fused[:, lo:hi], lora_reference(x, a_group[j], bs[j], slots, scales),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("targets", ["all", "some"])
def test_fused_projection_equals_base_plus_reference(rows: int, targets: str) -> None:
    """One GEMM over the weight with every slot's A appended, then the expand: equal to the base
    projection plus the plain loop, for every group, also when only some members are targeted."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fused_case import ALL, SOME, check

    assert check(torch.float32, "cpu", rows, triton=False, targets=ALL if targets == "all" else SOME) < 1e-6
