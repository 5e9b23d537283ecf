"""Sharing the GPU with a game, side by side in one run (`loraloom bench gpu_share` runs this file).

    python benchmarks/bench_gpu_share.py --model random:llama-1b --streams 32 --hz 120 --frame-ms 3.5

A stand-in game in its own process renders frames as a fixed device workload (matmuls sized to take
--frame-ms alone) paced at --hz; it reports each frame's start to this process (as a plugin would
send `frame`), and measures each frame's time from its start to the end of its own work. Beside it
the text engine decodes --streams streams on their own adapters, and a player line (a 256-token
prompt) arrives every second. Configurations, one after the other on the same engine and game: the
game alone, no budget, duty caps of 25, 50 and 75%, and the frame-synchronised mode (the engine's
steps in the part of each frame the game leaves free) four times: with the game's part set to 1.1x
--frame-ms; with each frame report carrying the game's measured time of its last frame (as the
plugins send it; the daemon then takes the part from those); and so, with steps allowed --overlaps ms
(1 and 2 by default) into the next frame (`overlap_ms`). Reported: the game's frame p50/p99/max, frames over the frame
budget (1000/hz ms), the engine's tokens/s and steps/s, the player's time to first token, and the
game's part of a frame that frame sync used.

On a CPU the "device" is the CPU (the game takes one core): the mechanics, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_text import kv_mb, write_adapters
from benchmarks.fixtures.random_model import SHAPES, random_llama
from daemon.adapters.loader import read_adapter_files
from daemon.budget import BudgetSpec, FrameSync, GpuBudget
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.model import TextModel
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest


def game(device: str, hz: float, frame_ms: float, frames: int, marks: Any, results: Any, go: Any) -> None:
    """The stand-in game: calibrate a frame's work to `frame_ms`, then render `frames` frames per run."""
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    n = 1024 if dev.type == "cuda" else 256
    a = torch.randn(n, n, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)

    def work(reps: int) -> None:
        x = a
        for _ in range(reps):
            x = a @ x
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    work(10)
    started = time.perf_counter()
    work(50)
    per = (time.perf_counter() - started) / 50
    reps = max(1, round(frame_ms / 1000 / per))
    period = 1 / hz
    while True:
        label = go.get()
        if label is None:
            return
        times: list[float] = []
        t = time.perf_counter()
        for _ in range(frames):
            marks.put(times[-1] if times else None)  # a frame starts, with its last frame's work (as plugins send)
            start = time.perf_counter()
            work(reps)
            times.append((time.perf_counter() - start) * 1000)
            t += period
            time.sleep(max(0.0, t - time.perf_counter()))
        results.put((label, times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loraloom bench gpu_share", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-1b", help=f"random:{{{','.join(SHAPES)}}}")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--hz", type=float, default=120.0)
    p.add_argument("--frame-ms", type=float, default=3.5, help="the game's own work per frame, alone")
    p.add_argument("--frames", type=int, default=960)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--overlaps", default="1,2", help="the frame-sync overlap_ms values to run, comma-separated")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # the other core is the game's
    n, context = args.streams, 4096  # streams long enough to outlast a run
    spec, tensors, tokenizer = random_llama(args.model.split(":", 1)[1], device=device, dtype=dtype)
    cfg = EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch."), max_seqs=n + 1,
                       max_context=context, lora_slots=n + 1, max_lora_rank=16,
                       kv_cache_mb=kv_mb(args.model, None, dtype, (n + 1) * context))
    engine = TextEngine(TextModel(spec, tensors, device=device, dtype=dtype), tokenizer, cfg)
    budget = engine.budget = GpuBudget()
    tmp = Path(tempfile.mkdtemp(prefix="loraloom-share-"))
    versions = []
    for i, d in enumerate(write_adapters(engine.spec, tmp, n + 1, [16], ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"))):
        files = read_adapter_files(d, "text")
        prepared = engine.prepare_adapter(files)
        versions.append(files.to_version(d.name, i + 1, prepared.payload, prepared.rank, prepared.targets))
    g = torch.Generator().manual_seed(0)
    vocab = min(spec.vocab_size, len(engine.tokenizer))

    ctx = mp.get_context("spawn")
    marks, results, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=game, args=(str(device), args.hz, args.frame_ms, args.frames, marks, results, go),
                       daemon=True)
    proc.start()
    stop = threading.Event()

    measured = threading.Event()  # pass the game's measured frame times on (the "measured" configuration)

    def relay() -> None:  # frame starts from the game, as a plugin's `frame` messages
        while not stop.is_set():
            try:
                last_ms = marks.get(timeout=0.1)
            except Exception:
                continue
            budget.frame(last_ms if measured.is_set() else None)

    threading.Thread(target=relay, daemon=True).start()
    engine.start()
    period_ms = 1000 / args.hz
    configs: list[tuple[str, BudgetSpec | None]] = [
        ("game alone", None), ("no budget", BudgetSpec()), ("duty cap 25%", BudgetSpec(duty_cap=0.25)),
        ("duty cap 50%", BudgetSpec(duty_cap=0.5)), ("duty cap 75%", BudgetSpec(duty_cap=0.75)),
        ("frame sync", BudgetSpec(frame_sync=FrameSync(period_ms, args.frame_ms * 1.1, 0.5))),
        ("sync, measured", BudgetSpec(frame_sync=FrameSync(period_ms, args.frame_ms * 1.1, 0.5)))]
    configs += [(f"sync, overlap {ms:g}", BudgetSpec(frame_sync=FrameSync(period_ms, args.frame_ms * 1.1, 0.5,
                                                                           overlap_ms=ms)))
                for ms in (float(x) for x in args.overlaps.split(",") if x.strip())]
    # Warm up: kernels compiled, slots loaded, graphs recorded for the shapes the runs meet.
    for i in range(n + 1):
        engine.submit(TextRequest(key=("warm", i), prompt_ids=torch.randint(5, vocab, (256 if i == n else 64,),
                                                                            generator=g).tolist(),
                                  adapters=[(versions[i], 1.0)], sampling=SamplingParams(
                                      temperature=0.0, max_tokens=16, ignore_eos=True)), _ignore)
    while engine.stats()["running"] or engine.stats()["queued"]:
        time.sleep(0.05)
    rows: dict[str, Any] = {}
    sampled: list[tuple[float, list[Any]]] = []  # (when, the keys of the rows a step sampled)
    engine.runner.on_logits = lambda keys, logits: sampled.append((time.perf_counter(), list(keys)))
    try:
        for label, bspec in configs:
            budget.set(bspec or BudgetSpec())
            if label.startswith("sync,"):
                measured.set()
            else:
                measured.clear()
            keys: list[Any] = [(label, i) for i in range(n)] if bspec is not None else []
            for i, key in enumerate(keys):
                engine.submit(TextRequest(
                    key=key, prompt_ids=torch.randint(5, vocab, (64,), generator=g).tolist(),
                    adapters=[(versions[i], 1.0)], priority="background",
                    sampling=SamplingParams(temperature=0.0, max_tokens=context - 80, ignore_eos=True)), _ignore)
            if keys:
                time.sleep(1.0)  # every stream decoding
            sampled.clear()
            go.put(label)
            started = time.perf_counter()
            players: dict[Any, float] = {}
            while results.empty():
                if keys and time.perf_counter() - started > len(players) + 0.5:  # a player line every second
                    key = (label, "player", len(players))
                    players[key] = time.perf_counter()
                    engine.submit(TextRequest(
                        key=key, prompt_ids=torch.randint(5, vocab, (256,), generator=g).tolist(),
                        adapters=[(versions[n], 1.0)], priority="player",
                        sampling=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)), _ignore)
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
            game_part = budget.game_ms()  # what frame sync took as the game's part of a frame
            _, frames = results.get()
            for key in keys:
                engine.cancel(key)
            time.sleep(0.3)
            every = list(sampled)
            steps = [(t, ks) for t, ks in every if t <= started + elapsed]
            tokens = sum(sum(1 for k in ks if k[1] != "player") for _, ks in steps)
            first = {k: min(t for t, ks in every if k in ks) for k in players if any(k in ks for _, ks in every)}
            ttft = [first[k] - players[k] for k in first]
            ordered = sorted(frames)
            rows[label] = {"frame_p50_ms": statistics.median(frames),
                           "frame_p99_ms": ordered[int(0.99 * (len(ordered) - 1))], "frame_max_ms": ordered[-1],
                           "over_budget": sum(1 for f in frames if f > period_ms), "frames": len(frames),
                           "tokens_per_s": tokens / elapsed if keys else None,
                           "steps_per_s": len(steps) / elapsed if keys else None, "game_part_ms": game_part,
                           "player_ttft_ms": 1000 * statistics.median(ttft) if ttft else None}
    finally:
        stop.set()
        go.put(None)
        engine.stop()
        proc.join(5)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"loraloom bench gpu_share: {spec.name} on {machine}; {n} streams on their own adapters beside a game at "
          f"{args.hz:g} Hz with {args.frame_ms} ms of work per frame ({args.frames} frames per configuration)")
    print(f"{'configuration':16} {'frame p50':>10} {'p99':>8} {'max':>8} {'over':>10} {'tokens/s':>9} "
          f"{'player TTFT':>12} {'steps/s':>8} {'game part':>10}")
    for label, r in rows.items():
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        ttft_s = "" if r["player_ttft_ms"] is None else f"{r['player_ttft_ms']:.0f} ms"
        sps = "" if r["steps_per_s"] is None else f"{r['steps_per_s']:.0f}"
        part = "" if r["game_part_ms"] is None else f"{r['game_part_ms']:.2f} ms"
        print(f"{label:16} {r['frame_p50_ms']:>10.2f} {r['frame_p99_ms']:>8.2f} {r['frame_max_ms']:>8.2f} "
              f"{r['over_budget']:>5}/{r['frames']:<4} {tps:>9} {ttft_s:>12} {sps:>8} {part:>10}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                         "configs": rows}, indent=2))
    return 0


def _ignore(event: Any) -> None:
    pass


if __name__ == "__main__":
    raise SystemExit(main())
