"""Hot-reload latency: from the moment a changed adapter file is complete on disk to the first
request served by the new version, through a real daemon (watchdog, validation, slot swap).

    python benchmarks/bench_reload.py --rounds 20 --json benchmarks/results/reload_cpu.json

Uses a tiny random Llama by default (the latency is the watcher's and the registry's, not the
model's); `--model default` measures it on the embedded SmolLM2 with its real adapter sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bridge  # noqa: E402


async def measure(url: str, token: str, folder: Path, sources: list[Path], rounds: int, mode: str) -> dict:
    latencies, event_latencies = [], []
    async with bridge.connect(url, token) as client:
        events = client.events()
        for i in range(rounds):
            src = sources[i % len(sources)]
            target = folder / "npc" / "adapter_model.safetensors"
            if mode == "rename":
                tmp = folder / "npc" / ".adapter_model.safetensors.tmp"
                shutil.copy(src / "adapter_model.safetensors", tmp)
                os.replace(tmp, target)
            else:
                data = (src / "adapter_model.safetensors").read_bytes()
                with target.open("wb") as f:
                    for k in range(0, len(data), 65536):
                        f.write(data[k:k + 65536])
            complete = time.perf_counter()
            expected = None
            async for e in events:
                if e.adapter.name == "npc" and e.event == "updated":
                    expected = e.adapter.version
                    event_latencies.append(time.perf_counter() - complete)
                    break
            while True:
                r = await client.complete("Hi", adapters=["npc"], max_tokens=1, temperature=0.0)
                if r.adapter_versions["npc"] == expected:
                    latencies.append(time.perf_counter() - complete)
                    break
            await asyncio.sleep(0.3)
        await events.aclose()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"rounds": rounds, "mode": mode,
            "served_ms_median": 1000 * statistics.median(latencies), "served_ms_p95": pct(latencies, 0.95),
            "event_ms_median": 1000 * statistics.median(event_latencies), "event_ms_p95": pct(event_latencies, 0.95)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random, built here) or 'default' (SmolLM2)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--debounce-ms", type=int, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from tiny import build_tiny_model, write_text_adapter

    work = Path(tempfile.mkdtemp(prefix="loraloom-reload-"))
    if args.model == "tiny":
        model = build_tiny_model(work / "model")
        rank = 4
    else:
        from daemon.engines.text.default_model import ensure_default_text_model

        model = ensure_default_text_model()
        rank = 8
    folder = work / "adapters"
    folder.mkdir()
    write_text_adapter(folder / "npc", model, rank=rank, seed=0, std=0.02)
    sources = [write_text_adapter(work / f"v{i}", model, rank=rank, seed=i + 1, std=0.02, atomic=False)
               for i in range(4)]
    runtime = work / "daemon.json"
    cmd = [sys.executable, "-m", "daemon", "serve", "--port", "0", "--text-model", str(model), "--image-model",
           "none", "--text-adapters", str(folder), "--runtime-file", str(runtime), "--token", "bench",
           "--log-level", "warning", "--max-context", "256"]
    env = dict(os.environ)
    if args.debounce_ms is not None:
        env["LORALOOM_RELOAD_DEBOUNCE_MS"] = str(args.debounce_ms)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        while not runtime.exists():
            if proc.poll() is not None:
                raise SystemExit("the daemon did not start")
            time.sleep(0.1)
        url = json.loads(runtime.read_text())["url"]
        results = [asyncio.run(measure(url, "bench", folder, sources, args.rounds, mode))
                   for mode in ("rename", "in-place")]
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(work, ignore_errors=True)
    print(f"hot reload on {platform.machine()} ({os.cpu_count()} cores), model {args.model}, {args.rounds} rounds each")
    print(f"{'save style':12} {'event p50':>10} {'event p95':>10} {'served p50':>11} {'served p95':>11}  (ms)")
    for r in results:
        print(f"{r['mode']:12} {r['event_ms_median']:>10.1f} {r['event_ms_p95']:>10.1f} "
              f"{r['served_ms_median']:>11.1f} {r['served_ms_p95']:>11.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
