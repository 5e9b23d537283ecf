"""Time the Triton LoRA expand kernel's tile configurations against the PyTorch path (CUDA only).

    python benchmarks/tune_lora_expand.py --rows 32 --slots 32 --rank 16

Shapes are Llama-3.2-1B's projection groups (hidden 2048, MLP 8192, 8 KV heads of 64). Each
configuration is timed inside a CUDA graph (as the engine runs it); with B small enough to stay
in L2 the absolute numbers are optimistic, the ranking is what the defaults in
daemon/engines/text/triton_lora.py were chosen from.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engines.text import triton_lora
from daemon.engines.text.lora import GROUPS, GroupSlots, LoraSlotStorage, lora_expand_fused

HIDDEN, MLP, KV = 2048, 8192, 512
DIMS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}


class _Weights:
    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, None]:
        members = dict(GROUPS)[key]
        out = sum(DIMS[t][1] for t in members)
        return torch.randn(out + rows, DIMS[members[0]][0], device="cuda", dtype=torch.bfloat16), None


def _tune(key: str, group: GroupSlots, weights: torch.Tensor, rows: int) -> None:
    import triton

    y = torch.randn(rows, group.fused.shape[0], device="cuda", dtype=torch.bfloat16)
    t_torch = triton.testing.do_bench_cudagraph(lambda: lora_expand_fused(y, group, weights), rep=50)
    t_default = triton.testing.do_bench_cudagraph(lambda: triton_lora.expand_fused(y, group, weights), rep=50)
    results = []
    for bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (32, 64, 128), (2, 4, 8), (2, 3, 4)):
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if not triton_lora.expand_fused(y, group, weights, cfg):
            continue
        results.append((triton.testing.do_bench_cudagraph(
            lambda: triton_lora.expand_fused(y, group, weights, cfg), rep=30), cfg))  # noqa: B023
    results.sort(key=lambda r: r[0])
    mb = group.b_cat.numel() * group.b_cat.element_size() / 1e6
    print(f"{key}: {rows} rows, B {mb:.1f} MB; PyTorch {t_torch * 1000:.1f} us, "
          f"kernel defaults {t_default * 1000:.1f} us; best:")
    for t, cfg in results[:3]:
        print(f"    {t * 1000:6.1f} us {cfg}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    storage = LoraSlotStorage(_Weights(), num_layers=1, target_dims=DIMS, targets=tuple(DIMS), num_slots=args.slots,
                              max_rank=args.rank, device=torch.device("cuda"), dtype=torch.bfloat16)
    for group in storage.groups[0].values():  # every pool row in use: each row its own slot's rows
        group.b_cat.normal_()
    width = storage.pool_rows
    weights = torch.zeros(args.rows, width, device="cuda", dtype=torch.bfloat16)
    for t in range(args.rows):
        slot = t % args.slots
        weights[t, slot * args.rank:(slot + 1) * args.rank] = 1
    for key, group in storage.groups[0].items():
        _tune(key, group, weights, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
