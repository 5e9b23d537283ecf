"""Time the Triton LoRA expand kernel's tile configurations against the PyTorch path (CUDA only).

    python benchmarks/tune_lora_expand.py --rows 32 --slots 32 --rank 16 --layers 16

Shapes are Llama-3.2-1B's projection groups (hidden 2048, MLP 8192, 8 KV heads of 64). Each
configuration runs once per layer inside one CUDA graph (as the engine runs it), every layer with
its own B, so that B comes from HBM as in a real step and not from L2; times are per launch. The
search is coordinate descent from the kernel's defaults (one tile parameter at a time, two
passes); the defaults in daemon/engines/text/triton_lora.py were chosen from its output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engines.text import triton_lora
from daemon.engines.text.lora import lora_expand_fused
from daemon.engines.text.lora_pool import GROUPS, GroupSlots, LoraSlotStorage

HIDDEN, MLP, KV = 2048, 8192, 512
DIMS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}
SPACE = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128, 256), "BLOCK_K": (32, 64, 128),
         "num_warps": (1, 2, 4, 8), "num_stages": (2, 3, 4, 5, 6)}


class _Weights:
    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, None]:
        members = dict(GROUPS)[key]
        out = sum(DIMS[t][1] for t in members)
        return torch.randn(out + rows, DIMS[members[0]][0], device="cuda", dtype=torch.bfloat16), None


def _per_launch_us(fn, groups: list[GroupSlots], ys: list[torch.Tensor], weights: torch.Tensor) -> float | None:
    import triton

    def every_layer() -> bool:
        return all([fn(y, g, weights) for y, g in zip(ys, groups, strict=True)])

    try:
        if not every_layer():
            return None
        return triton.testing.do_bench_cudagraph(every_layer, rep=40) * 1000 / len(groups)
    except Exception:  # e.g. tiles that need more shared memory than the GPU has
        return None


def _tune(key: str, groups: list[GroupSlots], weights: torch.Tensor, rows: int) -> dict:
    ys = [torch.randn(rows, g.fused.shape[0], device="cuda", dtype=torch.bfloat16) for g in groups]
    t_torch = _per_launch_us(lambda y, g, w: lora_expand_fused(y, g, w) or True, groups, ys, weights)
    t_default = _per_launch_us(triton_lora.expand_fused, groups, ys, weights)
    seen: dict[tuple, float | None] = {}

    def cost(cfg: dict) -> float:
        k = tuple(sorted(cfg.items()))
        if k not in seen:
            seen[k] = _per_launch_us(lambda y, g, w: triton_lora.expand_fused(y, g, w, dict(cfg)), groups, ys, weights)
        return seen[k] if seen[k] is not None else float("inf")

    best = ({"BLOCK_M": 16 if rows <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
            if rows <= 32 else {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3})
    for _ in range(2):
        for name, values in SPACE.items():
            best = min(({**best, name: v} for v in values), key=cost)
    mb = groups[0].b_cat.numel() * groups[0].b_cat.element_size() / 1e6
    print(f"{key}: {rows} rows, B {mb:.1f} MB per layer ({mb / 4.0:.1f} us at 4 TB/s); per launch: PyTorch "
          f"{t_torch:.1f} us, kernel defaults {t_default:.1f} us, best {cost(best):.1f} us {best} "
          f"({len(seen)} tried)", flush=True)
    return {"group": key, "rows": rows, "torch_us": t_torch, "default_us": t_default, "best_us": cost(best),
            "best": best}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[32])
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=16, help="copies of every B (one per layer), to read from HBM")
    args = p.parse_args()
    storage = LoraSlotStorage(_Weights(), num_layers=args.layers, target_dims=DIMS, targets=tuple(DIMS),
                              num_slots=args.slots, max_rank=args.rank, device=torch.device("cuda"),
                              dtype=torch.bfloat16)
    for layer in storage.groups:  # every pool row in use: each row its own slot's rows
        for group in layer.values():
            group.b_cat.normal_()
    width = storage.pool_rows
    for rows in args.rows:
        weights = torch.zeros(rows, width, device="cuda", dtype=torch.bfloat16)
        for t in range(rows):
            slot = t % args.slots
            weights[t, slot * args.rank:(slot + 1) * args.rank] = 1
        for key in storage.groups[0]:
            _tune(key, [layer[key] for layer in storage.groups], weights, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
