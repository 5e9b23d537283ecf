"""Time the paged prompt-attention kernel's tile configurations (CUDA only).

    python benchmarks/tune_prefill_attention.py --shape 1b --chunk 256 --prompt 1536

The case is the latency issue's: one prompt of --prompt tokens joins in --chunk-token chunks, and a
step attends one chunk (at each of the prompt's chunk positions in turn, so that every prefix length
is in the mean) over the cached prefix and itself. Each configuration runs once per layer inside one
CUDA graph (as the engine runs it), every layer with its own KV pool; times are per launch, the mean
over the chunk positions. The search is coordinate descent from the kernel's defaults (one
parameter at a time, two passes); `triton_attention.prefill_config` was chosen from its output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engines.text import triton_attention

SHAPES = {"1b": (32, 8, 64, 16), "8b": (32, 8, 128, 32)}  # heads, KV heads, head dim, layers
SPACE = {"ROWS": (16, 32, 64, 128), "TILE": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4)}
BLOCK = 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--prompt", type=int, default=1536)
    p.add_argument("--chunks", type=int, default=1, help="prompts joining in the same step (each its own chunk)")
    args = p.parse_args()
    import triton

    heads, kv_heads, dim, layers = SHAPES[args.shape]
    dev, dtype = torch.device("cuda"), torch.bfloat16
    blocks = -(-args.prompt // BLOCK) * args.chunks + 1
    pools = [(torch.randn(blocks * BLOCK, kv_heads, dim, device=dev, dtype=dtype),
              torch.randn(blocks * BLOCK, kv_heads, dim, device=dev, dtype=dtype)) for _ in range(layers)]
    per = -(-args.prompt // BLOCK)
    perm = torch.randperm(blocks - 1, generator=torch.Generator().manual_seed(0)) + 1  # scattered blocks
    tables = perm[:per * args.chunks].view(args.chunks, per).to(dev)
    tokens = args.chunk * args.chunks
    q = torch.randn(tokens, heads, dim, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    positions = list(range(0, args.prompt - args.chunk + 1, args.chunk))
    metas = [torch.tensor([[j * args.chunk, args.chunk, pos0] for j in range(args.chunks)], device=dev)
             for pos0 in positions]

    def per_launch_us(cfg: dict | None) -> float:
        def every_layer(meta: torch.Tensor) -> bool:
            return all([triton_attention.paged_prefill(q, k, v, tables, meta, out, None, BLOCK, args.chunk, cfg)
                        for k, v in pools])
        try:
            times = []
            for meta in metas:
                if not every_layer(meta):
                    return float("inf")
                times.append(triton.testing.do_bench_cudagraph(lambda m=meta: every_layer(m), rep=30))
            return 1000 * sum(times) / len(times) / layers
        except Exception:  # e.g. tiles that need more shared memory or registers than the GPU has
            return float("inf")

    default = triton_attention.prefill_config(dim, dtype)
    seen: dict[tuple, float] = {}

    def cost(cfg: dict) -> float:
        k = tuple(sorted(cfg.items()))
        if k not in seen:
            seen[k] = per_launch_us(cfg)
        return seen[k]

    base = cost(default)
    best = dict(default)
    for _ in range(2):
        for name, values in SPACE.items():
            best = min(({**best, name: v} for v in values), key=cost)
    mean_keys = sum(p0 + args.chunk / 2 for p0 in positions) / len(positions)
    flops = 4 * tokens * mean_keys * heads * dim
    print(f"{args.shape}: {args.chunks} chunk(s) of {args.chunk} over a {args.prompt}-token prompt, {layers} layers; "
          f"per launch: defaults {base:.1f} us {default}; best {cost(best):.1f} us {best} "
          f"({flops / cost(best) / 1e6:.0f} TFLOP/s; {len(seen)} tried)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
