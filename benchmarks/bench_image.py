"""Image engine throughput and latency: images per second and time to the first progress event.

Scenarios run side by side in one process on one engine, so their ratios are comparable:

  sequential   one request at a time, no adapter (what a naive server does)
  base         N requests at once, no adapter (batched up to --max-batch images per call)
  one-lora     N requests at once, all with the same LoRA
  mixed-K      N requests at once, cycling over K different LoRAs (K groups served round robin)
  idle-ttfp    single requests on an idle engine: time from submit to the first progress event

The tiny placeholder pipeline is the default (CPU-friendly). `--unet-size real` swaps in a UNet
with the Stable Diffusion 1.5 configuration and random weights (VAE and text encoder stay tiny), for
GPU runs: the numbers then reflect the real denoiser's cost, not picture quality.

    python benchmarks/bench_image.py                          # tiny, quick, CPU
    python benchmarks/bench_image.py --unet-size real --size 512 --steps 20 --requests 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.adapters.version import AdapterVersion  # noqa: E402
from daemon.engines.image import (  # noqa: E402
    ImageDoneEvent,
    ImageEngine,
    ImageErrorEvent,
    ImageProgressEvent,
    ImageRequest,
)


class _Waiter:
    def __init__(self) -> None:
        self.first_progress: float | None = None
        self.result: Any = None
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        if isinstance(event, ImageProgressEvent) and self.first_progress is None:
            self.first_progress = time.perf_counter()
        elif isinstance(event, (ImageDoneEvent, ImageErrorEvent)):
            self.result = event
            self.done.set()


def _versions(pipe: Any, count: int, rank: int, folder: Path) -> list[AdapterVersion]:
    """Write LoRA folders and read them back the way the registry does."""
    from safetensors.torch import load_file

    from daemon.engines.image.tiny_lora import write_image_lora

    out = []
    for i in range(count):
        path = write_image_lora(folder / f"style{i}", pipe, rank=rank, seed=100 + i, std=0.05)
        out.append(AdapterVersion(name=f"style{i}", kind="image", number=1, hash=f"{i:016x}", tensors=load_file(path)))
    return out


def _run_batch(engine: ImageEngine, requests: list[ImageRequest]) -> dict[str, Any]:
    calls_before = engine.stats.pipeline_calls
    waiters = [_Waiter() for _ in requests]
    start = time.perf_counter()
    for req, w in zip(requests, waiters, strict=True):
        engine.submit(req, w)
    for w in waiters:
        if not w.done.wait(3600):
            raise RuntimeError("a request did not finish within an hour")
    wall = time.perf_counter() - start
    for w in waiters:
        if isinstance(w.result, ImageErrorEvent):
            raise RuntimeError(f"request failed: {w.result.code}: {w.result.message}")
    images = sum(len(w.result.images) for w in waiters)
    ttfp = [(w.first_progress - start) * 1000 for w in waiters if w.first_progress is not None]
    return {
        "requests": len(requests),
        "images": images,
        "wall_s": round(wall, 4),
        "images_per_s": round(images / wall, 3),
        "ttfp_p50_ms": round(statistics.median(ttfp), 2) if ttfp else None,
        "ttfp_max_ms": round(max(ttfp), 2) if ttfp else None,
        "pipeline_calls": engine.stats.pipeline_calls - calls_before,
    }


def _run_sequential(engine: ImageEngine, requests: list[ImageRequest]) -> dict[str, Any]:
    calls_before = engine.stats.pipeline_calls
    ttfp: list[float] = []
    images = 0
    start = time.perf_counter()
    for req in requests:
        w = _Waiter()
        t0 = time.perf_counter()
        engine.submit(req, w)
        w.done.wait(3600)
        if isinstance(w.result, ImageErrorEvent):
            raise RuntimeError(f"request failed: {w.result.code}: {w.result.message}")
        images += len(w.result.images)
        if w.first_progress is not None:
            ttfp.append((w.first_progress - t0) * 1000)
    wall = time.perf_counter() - start
    return {
        "requests": len(requests),
        "images": images,
        "wall_s": round(wall, 4),
        "images_per_s": round(images / wall, 3),
        "ttfp_p50_ms": round(statistics.median(ttfp), 2),
        "ttfp_max_ms": round(max(ttfp), 2),
        "pipeline_calls": engine.stats.pipeline_calls - calls_before,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet-size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, float16 elsewhere (real UNet)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (tiny: 64, real: 512)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (tiny: 4, real: 20)")
    ap.add_argument("--requests", type=int, default=8, help="requests per batched scenario")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--loras", type=int, default=4, help="distinct LoRAs in the mixed scenario")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ttfp-samples", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default: print only)")
    args = ap.parse_args(argv)

    import torch

    from daemon.engines.image.default_pipeline import build_tiny_pipeline, real_unet_config

    size = args.size or (64 if args.unet_size == "tiny" else 512)
    steps = args.steps or (4 if args.unet_size == "tiny" else 20)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" or args.unet_size == "tiny" else "float16"
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]

    t0 = time.perf_counter()
    unet_config = real_unet_config() if args.unet_size == "real" else None
    pipe = build_tiny_pipeline(unet_config=unet_config)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        versions = _versions(pipe, max(1, args.loras), args.rank, Path(tmp))
    pipe = pipe.to(dtype=torch_dtype)
    name = "random-sd15-unet" if args.unet_size == "real" else "placeholder-tiny"
    engine = ImageEngine.from_pipeline(
        pipe,
        name=name,
        placeholder=True,
        device=device,
        max_batch=args.max_batch,
        adapter_slots=args.loras + 1,
    )
    engine.start()
    try:

        def req(key: str, i: int, adapters: list[tuple[AdapterVersion, float]]) -> ImageRequest:
            return ImageRequest(
                key=key,
                prompt=f"test prompt {i}",
                width=size,
                height=size,
                steps=steps,
                seed=i,
                adapters=adapters,
            )

        n = args.requests
        # Warm-up: first calls pay for allocator growth, kernel selection and adapter loading.
        _run_batch(engine, [req(f"w{i}", i, []) for i in range(2)])
        _run_batch(engine, [req(f"wl{i}", i, [(v, 1.0)]) for i, v in enumerate(versions)])

        rows: dict[str, dict[str, Any]] = {}
        rows["sequential"] = _run_sequential(engine, [req(f"s{i}", i, []) for i in range(min(n, 4))])
        rows["base"] = _run_batch(engine, [req(f"b{i}", i, []) for i in range(n)])
        rows["one-lora"] = _run_batch(engine, [req(f"o{i}", i, [(versions[0], 1.0)]) for i in range(n)])
        k = len(versions)
        rows[f"mixed-{k}"] = _run_batch(engine, [req(f"m{i}", i, [(versions[i % k], 1.0)]) for i in range(n)])
        idle = [_run_batch(engine, [req(f"t{i}", i, [])]) for i in range(args.ttfp_samples)]
        rows["idle-ttfp"] = {
            "requests": len(idle),
            "images": len(idle),
            "wall_s": round(sum(r["wall_s"] for r in idle), 4),
            "images_per_s": round(len(idle) / sum(r["wall_s"] for r in idle), 3),
            "ttfp_p50_ms": round(statistics.median(r["ttfp_p50_ms"] for r in idle), 2),
            "ttfp_max_ms": round(max(r["ttfp_p50_ms"] for r in idle), 2),
            "pipeline_calls": len(idle),
        }
    finally:
        engine.stop()

    base_rate = rows["base"]["images_per_s"]
    print(
        f"image engine: unet={args.unet_size} device={device} dtype={dtype} size={size}x{size} "
        f"steps={steps} max_batch={args.max_batch} rank={args.rank} (build {build_s:.1f}s)"
    )
    header = f"{'scenario':<12} {'req':>4} {'img':>4} {'calls':>5} {'wall s':>8} {'img/s':>8} {'vs base':>8} "
    header += f"{'ttfp p50 ms':>12} {'ttfp max ms':>12}"
    print(header)
    print("-" * len(header))
    for scenario, r in rows.items():
        ratio = r["images_per_s"] / base_rate if base_rate else float("nan")
        print(
            f"{scenario:<12} {r['requests']:>4} {r['images']:>4} {r['pipeline_calls']:>5} "
            f"{r['wall_s']:>8.3f} "
            f"{r['images_per_s']:>8.2f} {ratio:>8.2f} {r['ttfp_p50_ms']:>12.1f} {r['ttfp_max_ms']:>12.1f}"
        )
    result = {
        "benchmark": "image_engine",
        "unet": args.unet_size,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": dtype,
        "size": size,
        "steps": steps,
        "max_batch": args.max_batch,
        "rank": args.rank,
        "torch": torch.__version__,
        "scenarios": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
