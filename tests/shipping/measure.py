"""Shipping figures for docs/SHIPPING.md: a runtime's size and cold start, and the memory plan
against what the engine really takes on a CUDA device.

    python tests/shipping/measure.py start --runtime build/rt/loraloom --pack PACK [--runs 3] [--empty-env]
    python tests/shipping/measure.py start --runtime "python -m daemon" --pack PACK
    python tests/shipping/measure.py memory --model DIR [--device cuda]

`start`: from spawning `RUNTIME serve --pack PACK` to the first answered request (a one-token
`generate` through the Python client), each run on a fresh process; the median and every run.
`memory`: the plan of daemon/memory.py for an engine, the bytes its tensors take after start, and
the allocator's peak over a full batch of prompts and decode steps (CUDA) or the process's RSS (CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bridge


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20, 1)


async def first_answer(runtime: list[str], pack: Path, empty_env: bool, timeout: float = 600) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rt = work / "d.json"
        cmd = [*runtime, "serve", "--pack", str(pack), "--port", "0", "--runtime-file", str(rt), "--token", "m",
               "--cache-dir", str(work / "cache")]
        if empty_env:
            cmd = ["env", "-i", *cmd]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=(work / "log").open("w"))
        try:
            while not rt.exists():
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    raise RuntimeError((work / "log").read_text())
                await asyncio.sleep(0.02)
            listening = time.monotonic() - t0
            while True:  # the runtime file is written just before the socket answers
                try:
                    info = json.loads(rt.read_text())
                    async with bridge.connect(info["url"], "m") as client:
                        await client.complete("Hello", max_tokens=1, temperature=0.0)
                    break
                except (OSError, ValueError, bridge.LoraloomError):
                    await asyncio.sleep(0.02)
            return {"runtime_file_s": round(listening, 2), "first_answer_s": round(time.monotonic() - t0, 2)}
        finally:
            proc.terminate()
            proc.wait(30)


def cmd_start(args: argparse.Namespace) -> None:
    runtime = shlex.split(args.runtime)
    runs = [asyncio.run(first_answer(runtime, args.pack, args.empty_env)) for _ in range(args.runs)]
    exe = Path(runtime[0])
    out = {"runtime": args.runtime, "pack": str(args.pack), "empty_env": args.empty_env, "runs": runs,
           "median_first_answer_s": statistics.median(r["first_answer_s"] for r in runs)}
    if exe.is_file() and (exe.parent / "_internal").is_dir():
        out["bundle_mb"] = folder_mb(exe.parent)
    out["pack_mb"] = folder_mb(args.pack)
    print(json.dumps(out, indent=2))


def cmd_memory(args: argparse.Namespace) -> None:
    import torch

    from daemon.engines.text.engine import TextEngine
    from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest
    from daemon.memory import MIB, measured_bytes, plan_for_settings
    from daemon.settings import Settings

    settings = Settings(text_model=str(args.model), image_model="none", device=args.device, max_seqs=args.max_seqs,
                        max_context=args.max_context, gpu_memory_mb=args.gpu_memory_mb)
    plan = plan_for_settings(settings, args.model)
    assert plan.text is not None
    cuda = plan.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    cfg = EngineConfig(device=args.device, max_seqs=args.max_seqs, max_context=args.max_context,
                       kv_cache_mb=plan.text.kv_cache_mb, lora_slots=plan.text.lora_slots,
                       max_lora_rank=settings.max_lora_rank, max_step_tokens=settings.step_tokens)
    engine = TextEngine.from_folder(args.model, cfg)
    after_start = (torch.cuda.memory_allocated() - base) if cuda else measured_bytes("cpu")
    done: list[object] = []
    ids = [(7 * j) % (engine.spec.vocab_size - 10) + 5 for j in range(args.max_context // 2)]
    for i in range(args.max_seqs):
        engine.submit(TextRequest(key=("m", i), prompt_ids=[i + 5, *ids],
                                  sampling=SamplingParams(max_tokens=args.max_context // 4, seed=i)),
                      done.append)
    engine.run_until_idle()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else measured_bytes("cpu")
    t = plan.text
    print(json.dumps({
        "device": plan.device, "budget_mb": args.gpu_memory_mb,
        "plan_mb": {"reserved": round(plan.reserved / MIB, 1), "weights": round(t.weights / MIB, 1),
                    "kv_cache": round(t.kv_cache / MIB, 1), "lora_pool": round(t.lora_pool / MIB, 1),
                    "workspace": round(t.workspace / MIB, 1), "lora_slots": t.lora_slots},
        "engine_tensors_mb": {"weights": round(engine.model.nbytes() / MIB, 1),
                              "kv_cache": round(engine.kv.nbytes() / MIB, 1),
                              "lora_pool": round(engine.storage.pool_nbytes() / MIB, 1)},
        "allocated_after_start_mb": round(after_start / MIB, 1), "peak_under_load_mb": round(peak / MIB, 1),
        "reserved_by_allocator_mb": round(measured_bytes(plan.device) / MIB, 1)}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("start")
    p.add_argument("--runtime", required=True, help="the command: a bundle's executable, or 'python -m daemon'")
    p.add_argument("--pack", type=Path, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--empty-env", action="store_true", help="start it under env -i")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("memory")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--gpu-memory-mb", type=int)
    p.set_defaults(func=cmd_memory)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
