"""The quantized matmul alone (`daemon/engines/text/triton_quant.py`), side by side with the bf16 GEMM
over the same weights and with the dequantize-then-GEMM reference, on the 8B shape's projections.

    python benchmarks/bench_quant_matmul.py --rows 16

Each line: the Triton kernel's time, the bytes of codes and scales it reads per second, the bf16
F.linear over the dequantized weight, the reference (`QuantWeight.linear`), and the kernel's error
against the float32 product (max |difference| / max |product|). CUDA only: on a CPU the engine takes
the reference path. Times are `triton.testing.do_bench` medians of whole calls (with the Python
dispatch, which CUDA graphs remove in the engine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from daemon.engines.text import triton_quant
from daemon.engines.text.quant import QUANTIZE_KINDS, quantize_rtn

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loraloom bench quant_matmul", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="16", help="rows of x (decode steps: the batch), comma-separated")
    p.add_argument("--kinds", default=",".join(QUANTIZE_KINDS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant_matmul: needs a CUDA device (the CPU runs the reference path)")
        return 1
    from triton.testing import do_bench

    dev = torch.device("cuda")
    torch.manual_seed(0)
    lines = [f"loraloom bench quant_matmul on {torch.cuda.get_device_name(dev)}; times in us",
             f"{'kind':5} {'rows':>4} {'matrix':12} {'triton':>8} {'GB/s':>6} {'bf16':>8} {'ref':>8} {'error':>8}"]
    for kind in args.kinds.split(","):
        for name, (n, k) in SHAPES_8B.items():
            w = quantize_rtn(torch.randn(n, k, device=dev), kind, torch.bfloat16)  # type: ignore[arg-type]
            dense = w.dequantize(torch.bfloat16)
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                y = triton_quant.matmul(x, w)
                if y is None:
                    lines.append(f"{kind:5} {m:>4} {name:12} the kernel does not take this (reference path)")
                    continue
                want = x.float() @ dense.float().T
                err = float((y.float() - want).abs().max() / want.abs().max())
                t_q = do_bench(lambda: triton_quant.matmul(x, w), warmup=10, rep=50)  # noqa: B023
                t_d = do_bench(lambda: torch.nn.functional.linear(x, dense), warmup=10, rep=50)  # noqa: B023
                t_r = do_bench(lambda: w.linear(x), warmup=5, rep=20)  # noqa: B023
                lines.append(f"{kind:5} {m:>4} {name:12} {t_q * 1e3:>8.1f} {w.nbytes() / t_q / 1e6:>6.0f} "
                             f"{t_d * 1e3:>8.1f} {t_r * 1e3:>8.1f} {err:>8.1e}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
