"""Where a decode step's time goes: kernels by device time, and the device's busy share of the step.

    python benchmarks/profile_step.py --model random:llama-1b --streams 32 --ranks 16

N streams on N adapters decode until every one is in the batch; then --steps decode steps run under
torch.profiler. Printed: the wall time of a step (host included, as bench_text.py measures it), the
kernels' device time per step (the sum over kernels: the step's busy time), and the top kernels by
device time per step. Busy well under wall means the host (Python, launches, sampling) is the cost;
busy near wall means the kernels are. CUDA graphs replay as recorded (profilers see their kernels);
--eager profiles the launches one by one; --host adds a cProfile of the host's side of the steps.
--constrained puts every stream under its own JSON schema (as bench_text.py --constrained does);
--chunk N adds an N-token prompt chunk to every profiled step (the latency issue's "decode rows plus
a player's chunk" step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_text import ALL_TARGETS, compile_schemas, kv_mb, write_adapters
from benchmarks.fixtures.random_model import SHAPES, random_llama
from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.model import TextModel
from daemon.engines.text.quant_formats import DENSE, QuantScheme
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-1b", help=f"random:{{{','.join(SHAPES)}}}")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--ranks", default="16")
    p.add_argument("--context", type=int, default=160, help="prompt tokens of each stream")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--base-only", action="store_true", help="no adapters")
    p.add_argument("--deterministic", action="store_true", help="the engine in deterministic mode (invariant.py)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "fp8"])
    p.add_argument("--host", action="store_true", help="also the host's side: cProfile of the same steps")
    p.add_argument("--constrained", action="store_true", help="every stream under its own JSON schema")
    p.add_argument("--chunk", type=int, default=0,
                   help="every profiled step also carries a prompt chunk of this many tokens (of 1,536-token "
                        "prompts, one after another, as a player's line joining the streams)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, ranks = args.streams, [int(r) for r in args.ranks.split(",")]
    context = args.context + 64 + args.steps * (4 if args.chunk else 2) + 16
    long_prompt = 1536 if args.chunk else 0
    spec, tensors, tokenizer = random_llama(args.model.split(":", 1)[1], device=device, dtype=dtype)
    extra = 1 if args.chunk else 0  # the row of the joining prompts
    cfg = EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch."), max_seqs=n + extra,
                       max_context=max(context, long_prompt + 8), lora_slots=n + extra, max_lora_rank=max(ranks),
                       cuda_graphs=not args.eager, prefill_chunk=args.chunk or 256,
                       max_step_tokens=n + args.chunk if args.chunk else 512,
                       kv_cache_mb=kv_mb(args.model, None, dtype, n * context + 2 * long_prompt),
                       quantize=args.quantize, deterministic=args.deterministic)
    scheme = QuantScheme("rtn", kind=args.quantize) if args.quantize else DENSE  # type: ignore[arg-type]
    engine = TextEngine(TextModel(spec, dict(tensors), device=device, dtype=dtype, scheme=scheme), tokenizer, cfg)
    adapters: list[list] = [[] for _ in range(n)]
    if not args.base_only:
        for i, d in enumerate(write_adapters(spec, Path(tempfile.mkdtemp(prefix="loraloom-prof-")), n, ranks,
                                             ALL_TARGETS)):
            files = read_adapter_files(d, "text")
            prepared = engine.prepare_adapter(files)
            adapters[i] = [(files.to_version(d.name, i + 1, prepared.payload, prepared.rank, prepared.targets), 1.0)]
    g = torch.Generator().manual_seed(0)
    vocab = min(spec.vocab_size, len(engine.tokenizer))
    grammars = compile_schemas(engine, n)["grammars"] if args.constrained else [None] * n
    for i in range(n):
        engine.submit(TextRequest(key=i, prompt_ids=torch.randint(5, vocab, (args.context,), generator=g).tolist(),
                                  adapters=adapters[i], constraint=grammars[i], sampling=SamplingParams(
                                      temperature=0.0, max_tokens=context - args.context - 2, ignore_eos=True)),
                      lambda e: None)
    warm = 0
    while warm < 8:  # every stream decoding, and graphs recorded
        engine.step()
        warm += engine.runner.last_batch_size == n
    if args.chunk:  # enough joining prompts for the warm-up and every profiled step (each gives 1536/chunk steps)
        steps_each = -(-long_prompt // args.chunk)
        for j in range(-(-(3 * args.steps + 8) // steps_each) + 1):
            ids = torch.randint(5, vocab, (long_prompt,), generator=g).tolist()
            engine.submit(TextRequest(key=("join", j), prompt_ids=ids,
                                      sampling=SamplingParams(temperature=0.0, max_tokens=1)), lambda e: None)
        for _ in range(8):  # the chunk graphs recorded
            engine.step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        sync()
        walls.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        sync()
    walls.sort()
    host = None
    if args.host:
        import cProfile
        import io
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        for _ in range(args.steps):
            engine.step()
        sync()
        prof_host.disable()
        buf = io.StringIO()
        pstats.Stats(prof_host, stream=buf).sort_stats("tottime").print_stats(args.top)
        host = buf.getvalue()
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if device.type == "cuda" else "CPU")]
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time_total for e in kernels) / 1000 / args.steps  # us -> ms per step
    else:
        busy = float("nan")
    rows = sorted(((e.device_time_total if device.type == "cuda" else e.cpu_time_total) / 1000 / args.steps,
                   e.count // args.steps, e.key) for e in events)[::-1]
    print(f"profile_step: {spec.name} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"{n} streams, {'base only' if args.base_only else f'{n} adapters of rank {args.ranks}'}, "
          f"{args.quantize or str(dtype).removeprefix('torch.')}, {'eager' if args.eager else 'CUDA graphs'}"
          f"{', deterministic' if args.deterministic else ''}{', JSON schemas' if args.constrained else ''}"
          f"{f', a {args.chunk}-token prompt chunk a step' if args.chunk else ''}")
    print(f"step wall median {1000 * walls[len(walls) // 2]:.3f} ms; kernels' device time {busy:.3f} ms a step")
    print(f"{'ms/step':>8} {'calls':>6}  kernel")
    for ms, calls, key in rows[:args.top]:
        print(f"{ms:8.3f} {calls:6d}  {key[:110]}")
    if host is not None:
        print(f"host, {args.steps} steps under cProfile (its own overhead included), by time in the function itself:")
        print(host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
