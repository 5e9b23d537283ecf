"""Image engine throughput and latency, and whether a request's bytes depend on its companions.

Scenarios run side by side in one process on one engine, so their ratios are comparable:

  sequential   one request at a time, no adapter (each call padded to --max-batch images)
  base         N requests at once, no adapter (seeds 0..N-1: home rows in turn, full calls)
  base-noseed  N requests at once, no adapter and no seed (the engine picks seeds on free home rows)
  one-lora     N requests at once, all with the same LoRA
  mixed-K      N requests at once, cycling over K different LoRAs (K groups served round robin, one
               call per turn; seeds 0, 1, ... inside each group)
  idle-ttfp    single requests on an idle engine: time from submit to the first progress event
  lone-mb1     one request at a time on a separate engine with max_batch=1 (run first): calls of one image,
               unpadded, which is what a lone request cost before calls were padded; its ratio to
               `sequential` is the latency price of the fixed batch shape

Determinism check: one request alone, then with 1 companion, then with max_batch-1 companions,
arriving at every position among them (no adapter, and last with a LoRA), then behind a companion
that wants the same home row (seed % max_batch) and so takes it: the target waits for the next
call, there with other companions. Every image sits at its home row, so the target's row never
changes; what changes is its arrival order, its companions and its call. Companions have other
prompts and seeds, and wait behind a busy call so that they really are admitted together; the
number of calls they took is checked. Every PNG must equal the lone one. The max_batch=1 engine's
bytes are reported too: another batch shape, so they may differ, and that is not a failure.

The tiny placeholder pipeline is the default (CPU-friendly). `--unet-size real` swaps in a UNet
with the Stable Diffusion 1.5 configuration and random weights (VAE and text encoder stay tiny), for
GPU runs: the numbers then reflect the real denoiser's cost, not picture quality.

    python benchmarks/bench_image.py                          # tiny, quick, CPU
    python benchmarks/bench_image.py --unet-size real --size 512 --steps 20 --requests 16 --max-batch 8 --rank 16

(`--device` defaults to cuda when there is one; `--json FILE` keeps the numbers.)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
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
from daemon.engines.base import EngineError  # noqa: E402
from daemon.engines.image import (  # noqa: E402
    ImageConfig,
    ImageDoneEvent,
    ImageEngine,
    ImageProgressEvent,
    ImageRequest,
)


class _Waiter:
    def __init__(self) -> None:
        self.first_progress: float | None = None
        self.finished: float | None = None
        self.result: Any = None
        self.started = threading.Event()
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        if isinstance(event, ImageProgressEvent) and self.first_progress is None:
            self.first_progress = time.perf_counter()
            self.started.set()
        elif isinstance(event, (ImageDoneEvent, EngineError)):
            self.finished = time.perf_counter()
            self.result = event
            self.done.set()

    def images(self) -> list[bytes]:
        if not self.done.wait(3600):
            raise RuntimeError("a request did not finish within an hour")
        if isinstance(self.result, EngineError):
            raise RuntimeError(f"request failed: {self.result.code}: {self.result.message}")
        return list(self.result.images)


def _versions(pipe: Any, count: int, rank: int, folder: Path) -> list[AdapterVersion]:
    """Write LoRA folders and read them back the way the registry does."""
    from safetensors.torch import load_file

    from benchmarks.fixtures.image_lora import write_image_lora

    out = []
    for i in range(count):
        path = write_image_lora(folder / f"style{i}", pipe, rank=rank, seed=100 + i, std=0.05)
        out.append(AdapterVersion(name=f"style{i}", kind="image", number=1, hash=f"{i:016x}", tensors=load_file(path)))
    return out


def _run_batch(engine: ImageEngine, requests: list[ImageRequest]) -> dict[str, Any]:
    calls_before = engine.counters().pipeline_calls
    waiters = [_Waiter() for _ in requests]
    start = time.perf_counter()
    for req, w in zip(requests, waiters, strict=True):
        engine.submit(req, w)
    for w in waiters:
        if not w.done.wait(3600):
            raise RuntimeError("a request did not finish within an hour")
    wall = time.perf_counter() - start
    for w in waiters:
        if isinstance(w.result, EngineError):
            raise RuntimeError(f"request failed: {w.result.code}: {w.result.message}")
    images = sum(len(w.result.images) for w in waiters)
    ttfp = [(w.first_progress - start) * 1000 for w in waiters if w.first_progress is not None]
    latency = [(w.finished - start) * 1000 for w in waiters if w.finished is not None]
    return {
        "requests": len(requests),
        "images": images,
        "wall_s": round(wall, 4),
        "images_per_s": round(images / wall, 3),
        "ttfp_p50_ms": round(statistics.median(ttfp), 2) if ttfp else None,
        "ttfp_max_ms": round(max(ttfp), 2) if ttfp else None,
        "latency_p50_ms": round(statistics.median(latency), 2),
        "pipeline_calls": engine.counters().pipeline_calls - calls_before,
    }


def _run_sequential(engine: ImageEngine, requests: list[ImageRequest]) -> dict[str, Any]:
    calls_before = engine.counters().pipeline_calls
    ttfp: list[float] = []
    latency: list[float] = []
    images = 0
    start = time.perf_counter()
    for req in requests:
        w = _Waiter()
        t0 = time.perf_counter()
        engine.submit(req, w)
        images += len(w.images())
        latency.append((time.perf_counter() - t0) * 1000)
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
        "latency_p50_ms": round(statistics.median(latency), 2),
        "pipeline_calls": engine.counters().pipeline_calls - calls_before,
    }


def _shared_calls(engine: ImageEngine, requests: list[ImageRequest], blocker: ImageRequest) -> tuple[list[bytes], int]:
    """Run `requests` together: they are submitted while `blocker` (another batch key) is running,
    so they are admitted side by side. Returns the first image of each request and how many
    pipeline calls they took."""
    before = engine.counters().pipeline_calls
    busy = _Waiter()
    engine.submit(blocker, busy)
    if not busy.started.wait(3600):
        raise RuntimeError("the blocking request never started")
    waiters = [_Waiter() for _ in requests]
    for req, w in zip(requests, waiters, strict=True):
        engine.submit(req, w)
    firsts = [w.images()[0] for w in waiters]
    busy.images()
    return firsts, engine.counters().pipeline_calls - before - 1


def _differing_pixels(a: bytes, b: bytes) -> int:
    import numpy as np
    from PIL import Image

    pa, pb = (np.asarray(Image.open(io.BytesIO(x))) for x in (a, b))
    return int((pa != pb).any(axis=-1).sum())


def _colours(png: bytes) -> int:
    from PIL import Image

    return len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(1 << 24) or [])


def _determinism(engine: ImageEngine, req: Any, max_batch: int, lora: AdapterVersion, steps: int) -> dict[str, Any]:
    """The target request alone vs with companions, arriving at every position; see the module
    docstring."""
    seed = 424242
    home = seed % max_batch
    others = [row for row in range(max_batch) if row != home]

    def target(key: str, adapters: list[tuple[AdapterVersion, float]]) -> ImageRequest:
        return dataclasses.replace(req(key, seed, adapters), prompt="the determinism target")

    def companion(key: str, row: int, adapters: list[tuple[AdapterVersion, float]], lap: int = 0) -> ImageRequest:
        return req(key, (1000 + lap) * max_batch + row, adapters)  # its home row is `row`

    def blocker(key: str) -> ImageRequest:
        return dataclasses.replace(req(key, 7, []), steps=steps + 1)

    checks: list[dict[str, Any]] = []
    colours = 0
    for adapters, label in (([], "no adapter"), ([(lora, 1.0)], "one LoRA")):
        w = _Waiter()
        engine.submit(target(f"alone-{label}", adapters), w)
        alone = w.images()[0]
        # (companions before the target, companions after it, rival first, calls expected)
        layouts: list[tuple[list[int], list[int], bool, int]] = []
        if max_batch > 1 and not adapters:
            layouts.append(([], others[:1], False, 1))
            layouts += [(others[:p], others[p:], False, 1) for p in range(max_batch)]
            layouts.append((others, others, True, 2))
        elif max_batch > 1:
            layouts.append((others, [], False, 1))
        for before, after, rival, expected_calls in layouts:
            n = len(checks)
            first = [companion(f"c{n}-a{i}-{label}", row, adapters) for i, row in enumerate(before)]
            if rival:
                first.insert(0, companion(f"c{n}-rival-{label}", home, adapters, lap=1))
            then = [companion(f"c{n}-b{i}-{label}", row, adapters, lap=2) for i, row in enumerate(after)]
            batch = [*first, target(f"t{n}-{label}", adapters), *then]
            position = len(first)
            firsts, calls = _shared_calls(engine, batch, blocker(f"busy{n}-{label}"))
            checks.append(
                {
                    "adapters": label,
                    "companions": len(batch) - 1,
                    "arrived": position + 1,
                    "rival_first": rival,
                    "calls": calls,
                    "calls_expected": expected_calls,
                    "bytes_equal": firsts[position] == alone,
                    "pixels_differing": _differing_pixels(firsts[position], alone),
                }
            )
        if not adapters:
            colours = _colours(alone)
    # Random weights in half precision can overflow to a flat image, which would match anything.
    return {
        "target_home_row": home,
        "checks": checks,
        "all_equal": all(c["bytes_equal"] for c in checks),
        "target_colours": colours,
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
    n = args.requests

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

    rows: dict[str, dict[str, Any]] = {}
    # First a max_batch=1 engine on the fresh pipeline (no LoRA injected yet): unpadded calls of one
    # image, the latency a lone request had before every call was padded to max_batch.
    single = ImageEngine(pipe, ImageConfig(device=device, max_batch=1), name=name, placeholder=True)
    single.start()
    try:
        _run_batch(single, [req(f"w{i}", i, []) for i in range(2)])
        rows["lone-mb1"] = _run_sequential(single, [req(f"u{i}", i, []) for i in range(min(n, 4))])
        w = _Waiter()
        single.submit(dataclasses.replace(req("mb1-target", 424242, []), prompt="the determinism target"), w)
        single_target = w.images()[0]
    finally:
        single.stop()

    engine = ImageEngine(pipe, ImageConfig(device=device, max_batch=args.max_batch, adapter_slots=args.loras + 1),
                         name=name, placeholder=True)
    engine.start()
    try:
        # Warm-up: first calls pay for allocator growth, kernel selection and adapter loading.
        _run_batch(engine, [req(f"w{i}", i, []) for i in range(2)])
        _run_batch(engine, [req(f"wl{i}", i, [(v, 1.0)]) for i, v in enumerate(versions)])

        rows["sequential"] = _run_sequential(engine, [req(f"s{i}", i, []) for i in range(min(n, 4))])
        rows["base"] = _run_batch(engine, [req(f"b{i}", i, []) for i in range(n)])
        noseed = [dataclasses.replace(req(f"n{i}", i, []), seed=None) for i in range(n)]
        rows["base-noseed"] = _run_batch(engine, noseed)
        rows["one-lora"] = _run_batch(engine, [req(f"o{i}", i, [(versions[0], 1.0)]) for i in range(n)])
        k = len(versions)
        # Seeds count up inside each LoRA's group (home rows in turn): seed i for request i would put a
        # whole group on one home row whenever k divides max_batch (one image per call).
        mixed = [dataclasses.replace(req(f"m{i}", i, [(versions[i % k], 1.0)]), seed=i // k) for i in range(n)]
        rows[f"mixed-{k}"] = _run_batch(engine, mixed)
        idle = [_run_batch(engine, [req(f"t{i}", i, [])]) for i in range(args.ttfp_samples)]
        rows["idle-ttfp"] = {
            "requests": len(idle),
            "images": len(idle),
            "wall_s": round(sum(r["wall_s"] for r in idle), 4),
            "images_per_s": round(len(idle) / sum(r["wall_s"] for r in idle), 3),
            "ttfp_p50_ms": round(statistics.median(r["ttfp_p50_ms"] for r in idle), 2),
            "ttfp_max_ms": round(max(r["ttfp_p50_ms"] for r in idle), 2),
            "latency_p50_ms": round(statistics.median(r["latency_p50_ms"] for r in idle), 2),
            "pipeline_calls": len(idle),
        }
        t0 = time.perf_counter()
        determinism = _determinism(engine, req, args.max_batch, versions[0], steps)
        determinism["seconds"] = round(time.perf_counter() - t0, 1)
        w = _Waiter()
        engine.submit(dataclasses.replace(req("mb-target", 424242, []), prompt="the determinism target"), w)
        determinism["equal_to_max_batch_1"] = w.images()[0] == single_target
        padding = engine.counters().padding_images
        collision_padding = engine.counters().collision_padding
    finally:
        engine.stop()

    base_rate = rows["base"]["images_per_s"]
    print(
        f"image engine: unet={args.unet_size} device={device} dtype={dtype} size={size}x{size} "
        f"steps={steps} max_batch={args.max_batch} rank={args.rank} (build {build_s:.1f}s)"
    )
    header = f"{'scenario':<12} {'req':>4} {'img':>4} {'calls':>5} {'wall s':>8} {'img/s':>8} {'vs base':>8} "
    header += f"{'ttfp p50 ms':>12} {'ttfp max ms':>12} {'lat p50 ms':>11}"
    print(header)
    print("-" * len(header))
    for scenario, r in rows.items():
        ratio = r["images_per_s"] / base_rate if base_rate else float("nan")
        print(
            f"{scenario:<12} {r['requests']:>4} {r['images']:>4} {r['pipeline_calls']:>5} "
            f"{r['wall_s']:>8.3f} "
            f"{r['images_per_s']:>8.2f} {ratio:>8.2f} {r['ttfp_p50_ms']:>12.1f} {r['ttfp_max_ms']:>12.1f} "
            f"{r['latency_p50_ms']:>11.1f}"
        )
    lone, unpadded = rows["sequential"], rows["lone-mb1"]
    print(
        f"fixed batch shape: a lone request takes {lone['latency_p50_ms']:.1f} ms padded to {args.max_batch} images "
        f"vs {unpadded['latency_p50_ms']:.1f} ms unpadded (max_batch=1): "
        f"{lone['latency_p50_ms'] / unpadded['latency_p50_ms']:.2f}x; {padding} padding images computed in all, "
        f"{collision_padding} of them while images of the call's group waited for a taken home row"
    )
    print(
        f"determinism ({determinism['seconds']}s): the same request alone vs batched with companions "
        f"(its home row: {determinism['target_home_row']})"
    )
    for c in determinism["checks"]:
        rival = ", after one on its home row" if c["rival_first"] else ""
        calls = f" (warning: {c['calls']} calls, {c['calls_expected']} expected)"
        calls = "" if c["calls"] == c["calls_expected"] else calls
        print(
            f"  {c['adapters']:<10} {c['companions']} companion(s){rival}, target arrived {c['arrived']}:"
            + (" bytes equal yes" if c["bytes_equal"] else f" bytes equal NO ({c['pixels_differing']} pixels differ)")
            + calls
        )
    if not determinism["checks"]:
        print("  n/a: max_batch=1 never batches")
    verdict = "yes" if determinism["all_equal"] else "NO"
    if determinism["target_colours"] < 2:
        verdict += " (INCONCLUSIVE: the target image is flat; the weights overflowed?)"
    print(f"  all equal: {verdict}; the target image has {determinism['target_colours']} distinct colours")
    other = "yes" if determinism["equal_to_max_batch_1"] else "no (another batch shape; not a failure)"
    print(f"  equal to the max_batch=1 engine's bytes: {other}")
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
        "padding_images": padding,
        "collision_padding": collision_padding,
        "determinism": determinism,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
