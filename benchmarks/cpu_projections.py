"""Where a CPU decode step's projection time goes: SmolLM2-135M's projection shapes over 30 layers,
each layer with its own weights (so they come from memory, not cache), timed side by side.

    python benchmarks/cpu_projections.py --rows 8 --ranks 8,16 --adapters 8

Rows (medians of --rounds interleaved rounds, ms per pass over every projection of every layer):
- `x @ W^T`: torch.nn.functional.linear, the plain form;
- `W @ x^T`: the engine's `lora.linear` (the weight as the left operand, then a transposing copy);
- `+ LoRA`: the engine's `lora.lora_project` on the dense path (A rows fused into the base
  weights, the shrink scaled and expanded) with the given adapters resident, one per row;
- `+ LoRA, numba loop`: the same through `cpu_lora.py` (what CPU decode steps run when numba is
  installed): the base GEMM, then per group one compiled loop over each row's own pool rows;
- `+ LoRA, B in bf16`: the expands with B stored in bfloat16 and converted per layer and group, to
  see whether halving the adapters' bytes pays on a CPU without bf16 arithmetic (timing only: its
  shrink is not scaled, which only flatters it).
The vocabulary projection is left out (the same in every row).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engines.text import cpu_lora
from daemon.engines.text.kernels import NumbaKernels, TorchKernels
from daemon.engines.text.lora import linear, lora_project
from daemon.engines.text.lora_plan import LoraBatch
from daemon.engines.text.lora_pool import GROUPS, LoraSlotStorage

HIDDEN, MLP, KV, LAYERS = 576, 1536, 192, 30
DIMS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}


class _Weights:
    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, None]:
        members = dict(GROUPS)[key]
        return torch.randn(sum(DIMS[t][1] for t in members) + rows, DIMS[members[0]][0]), None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    storage = LoraSlotStorage(_Weights(), num_layers=LAYERS, target_dims=DIMS, targets=tuple(DIMS),
                              num_slots=args.adapters, max_rank=max(ranks), device=torch.device("cpu"),
                              dtype=torch.float32)
    # Pool rows as the rank pool packs them: adapter i takes ranks[i % len(ranks)] rows.
    width = sum(ranks[i % len(ranks)] for i in range(args.adapters))
    weights = torch.zeros(args.rows, width)
    first = 0
    for i in range(args.adapters):
        r = ranks[i % len(ranks)]
        weights[i % args.rows, first:first + r] = 1.0
        first += r
    storage.used = width
    for layer in storage.groups:
        for g in layer.values():
            g.fused[g.base_out:].normal_()
            g.b_cat.normal_()
    batch = LoraBatch(mode="dense", weights=weights)
    groups = [[(g, g.fused[:g.base_out]) for g in layer.values()] for layer in storage.groups]
    b16 = [[g.b_cat[:width].bfloat16() for g in layer.values()] for layer in storage.groups]
    x = {d: torch.randn(args.rows, d) for d in (HIDDEN, MLP)}
    torch_kernels, numba_kernels = TorchKernels(torch.device("cpu")), NumbaKernels(torch.device("cpu"))

    def plain() -> None:
        for layer in groups:
            for _, w in layer:
                F.linear(x[w.shape[1]], w)

    def left() -> None:
        for layer in groups:
            for _, w in layer:
                linear(x[w.shape[1]], w)

    def lora() -> None:
        for layer in groups:
            for g, w in layer:
                lora_project(x[w.shape[1]], w, None, g, batch, torch_kernels)

    def lora_numba() -> None:
        for layer in groups:
            for g, w in layer:
                lora_project(x[w.shape[1]], w, None, g, batch, numba_kernels)

    def lora_bf16_b() -> None:
        for layer, bs in zip(groups, b16, strict=True):
            for (g, w), b in zip(layer, bs, strict=True):
                y = linear(x[w.shape[1]], g.fused[:g.base_out + width * len(g.members)])
                b32 = b.float()
                for j, (lo, hi) in enumerate(g.out_cols):
                    blo, bhi = g.b_cols[j]
                    y[:, lo:hi].addmm_(y[:, g.base_out:g.base_out + width], b32[:, blo:bhi])

    cases = {"x @ W^T": plain, "W @ x^T": left, "+ LoRA": lora, "+ LoRA, numba loop": lora_numba,
             "+ LoRA, B in bf16": lora_bf16_b}
    if not cpu_lora.available():
        del cases["+ LoRA, numba loop"]
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    base_mb = sum(w.numel() * 4 for layer in groups for _, w in layer) / 1e6
    lora_mb = storage.nbytes() / 1e6
    print(f"{args.rows} rows, {LAYERS} layers: base projections {base_mb:.0f} MB, adapters {lora_mb:.0f} MB "
          f"({args.adapters} of ranks {args.ranks}); medians of {args.rounds} rounds")
    ref = statistics.median(times["W @ x^T"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:20} {m:8.1f} ms   {ref / m:5.2f}x of W @ x^T")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
