"""The LoRA paths (dense over the pool prefix, dense over gathered rows, bgmv) equal the plain
reference loop, for base rows, single adapters and mixes; the pool packs adapters by their rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import itertools

from fused_case import ALL, SOME, build, check, compare, make_lora, rows_case, slot_matrix

from daemon.engines.text import cpu_lora
from daemon.engines.text.lora_plan import LoraBatch
from daemon.engines.text.lora_pool import LoraSlotStorage

CPU = torch.device("cpu")


@pytest.mark.parametrize("path", ["prefix", "rows", "bgmv"])
def test_paths_equal_reference(path: str) -> None:
    """Each path gives the reference result on every projection group, mixes and zero-scale rows
    included; the planner really took the path asked for."""
    model, storage, loras = build(ALL)
    if path == "rows":  # two small adapters of a wide pool: gathering their rows is cheaper
        slots, scales = [[0], [2], [0, 2], [], [2]], [[1.0], [-0.5], [0.3, 0.7], [], [0.0]]
    else:
        slots, scales = rows_case(9)
    batch = LoraBatch.plan(slot_matrix(slots, scales), storage, dtype=torch.float32, prefer_prefix=path == "prefix",
                           force="bgmv" if path == "bgmv" else None)
    assert batch.mode == ("bgmv" if path == "bgmv" else "dense")
    if path != "bgmv":
        assert (batch.rows is None) == (path == "prefix")
    if path == "rows":
        assert batch.rows is not None and sorted(batch.rows.tolist()) == list(range(0, 4)) + list(range(12, 14))
    assert compare(model, storage, loras, batch, slots, scales) < 1e-6


def test_base_rows_only_skip_lora() -> None:
    _, storage, _ = build(SOME)
    batch = LoraBatch.plan(slot_matrix([[], [1]], [[], [0.0]]), storage, dtype=torch.float32, prefer_prefix=False)
    assert batch.mode == "none"


def test_planner_picks_the_prefix_for_busy_steps_and_bgmv_for_many_wide_adapters() -> None:
    """Decode with every adapter busy: the fused prefix. 64 tokens on 64 rank-64 adapters:
    per-token gathers (dense would multiply every token by 4096 rows)."""
    _, storage, _ = build(ALL)
    slots = [[i % 4] for i in range(8)]
    batch = LoraBatch.plan(slot_matrix(slots, [[1.0]] * 8), storage, dtype=torch.float32, prefer_prefix=False)
    assert batch.mode == "dense" and batch.rows is None

    from fused_case import DIMS, FakeModel

    wide = LoraSlotStorage(FakeModel(torch.float32, "cpu", 0), num_layers=1, target_dims=DIMS, targets=("q_proj",),
                           num_slots=64, max_rank=64, device=CPU, dtype=torch.float32)
    lora = make_lora(64, ("q_proj",), 1)
    for s in range(64):
        wide.load(s, lora)
    weights = torch.eye(64)
    assert LoraBatch.plan(weights, wide, dtype=torch.float32, prefer_prefix=False).mode == "bgmv"


def test_pool_packs_by_rank_reuses_holes_and_compacts() -> None:
    """Ranks 4, 8, 2, 8 take 22 rows (not 4 x 8); a freed hole is reused by an adapter that fits
    it; one that fits no hole packs the others to the front; results stay exact throughout."""
    model, storage, loras = build(ALL)
    assert storage.used == 22 and storage.width() == 32
    assert [storage.span(s) for s in range(4)] == [(0, 4), (4, 8), (12, 2), (14, 8)]
    assert storage.row_slot[:22].tolist() == [0] * 4 + [1] * 8 + [2] * 2 + [3] * 8

    storage.clear(1)  # a hole of 8 rows at 4..11
    assert storage.row_slot[4:12].tolist() == [4] * 8  # free rows map to no slot
    small = make_lora(3, ALL, 50)
    storage.load(1, small)
    assert storage.span(1) == (4, 3) and storage.compactions == 0
    loras[1] = small

    storage.clear(2)  # holes: 7..13 (7 rows) and 22..31 (10 rows)
    big = make_lora(8, ALL, 51)
    storage.load(2, big)  # fits the tail
    assert storage.span(2) == (22, 8) and storage.compactions == 0
    loras[2] = big
    storage.clear(0)  # holes: 0..3 (4 rows), 7..13 (7); tail 30..31 (2)
    wide = make_lora(8, ALL, 52)
    storage.load(0, wide)  # 13 rows free, no run of 8: compaction
    loras[0] = wide
    assert storage.compactions == 1
    spans = sorted(storage.span(s) for s in range(4))
    assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert storage.used == 3 + 8 + 8 + 8
    slots, scales = rows_case(9)
    for prefer_prefix in (True, False):
        batch = LoraBatch.plan(slot_matrix(slots, scales), storage, dtype=torch.float32, prefer_prefix=prefer_prefix)
        assert compare(model, storage, loras, batch, slots, scales) < 1e-6


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("targets", ["all", "some"])
def test_fused_projection_equals_base_plus_reference(rows: int, targets: str) -> None:
    """One GEMM over the weight with every pool row's A appended, then the expand: equal to the
    base projection plus the plain loop, for every group, also when only some members are targeted."""
    assert check(torch.float32, "cpu", rows, kernel="torch", targets=ALL if targets == "all" else SOME) < 1e-6


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("targets", ["all", "some"])
def test_numba_loop_equals_base_plus_reference(rows: int, targets: str) -> None:
    """The CPU decode kernel (cpu_lora.py: only each row's own pool rows, no fused GEMM) gives the
    base projection plus the plain loop on every group, residuals, mixes and zero-scale rows included."""
    assert cpu_lora.available(), "numba is part of the engine extra"
    assert check(torch.float32, "cpu", rows, kernel="numba", targets=ALL if targets == "all" else SOME) < 1e-6


def test_numba_loop_leaves_prompt_sized_steps_to_gemms() -> None:
    """Steps above cpu_lora.MAX_ROWS rows (prompt chunks) and non-float32 steps take the GEMM path."""
    assert cpu_lora.usable(torch.zeros(cpu_lora.MAX_ROWS, 8))
    assert not cpu_lora.usable(torch.zeros(cpu_lora.MAX_ROWS + 1, 8))
    assert not cpu_lora.usable(torch.zeros(4, 8, dtype=torch.bfloat16))
