"""Latency under game load, side by side in one run (`loraloom bench latency` runs this file).

    python benchmarks/bench_latency.py --model random:llama-1b --ambient 31 --players 6 --player-prompt 1500

The scenario: N ambient NPC streams, each on its own adapter, decode for a long time; while they
run, player lines arrive one after another (a ~1,500-token persona + history prompt each, on an
adapter of their own), and after each answer that conversation's next turn (the same prompt, the
answer and 60 new tokens). Reported for each configuration (prefix cache off/on, priorities off/on,
and on a GPU steps one at a time against the default overlapped steps; on one engine, one after the
other): player time to first token (turn 1 and turn 2), the ambient
streams' token gaps (p50, p99, worst; worst while a player prompt is being prefilled), the steps
that carry a prompt chunk next to the decodes, tokens/s of everything, and the CUDA graphs recorded
during the configuration (shapes the warm-up did not meet; each recording stalls its step).

The engine is driven directly on this thread: each step is timed from the host, from its launch
(or, with steps overlapped, from the last step's tokens reaching the host, if that is later) to its
own tokens reaching the host, so a step's time includes the device's work. A token's time is when
the host has it. Random token prompts; `ignore_eos`, so every stream runs to its length.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import torch

from benchmarks.bench_text import kv_mb, write_adapters
from benchmarks.fixtures.random_model import SHAPES, random_llama
from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.blocks import BlockPool
from daemon.engines.text.config import ModelSpec
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.model import TextModel
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest


@dataclass
class Trace:
    """What one configuration's run saw."""

    tokens: dict[Any, list[float]] = field(default_factory=dict)  # request key -> time of each sampled token
    submitted: dict[Any, float] = field(default_factory=dict)
    steps: list[tuple[float, float, int, int]] = field(default_factory=list)  # (start, end, decode rows, chunk tokens)
    chunk_owners: list[set[Any]] = field(default_factory=list)  # keys with a prompt chunk in each step
    cached: dict[Any, int] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 2)


def run_scenario(engine: TextEngine, versions: list[Any], args: argparse.Namespace, *, cache: bool,
                 priorities: bool, seed: int) -> dict[str, Any]:
    # A fresh pool per configuration: nothing cached from the one before.
    engine.pool = engine.scheduler.pool = BlockPool(engine.pool.num_blocks, engine.pool.block_size,
                                                    prefix_cache=cache)
    engine.scheduler.priorities = priorities
    trace = Trace()
    g = torch.Generator().manual_seed(seed)
    vocab = min(engine.spec.vocab_size, len(engine.tokenizer))

    def tokens(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    sampled: list[Any] = []  # keys whose logits the current step produced

    def hook(keys: list[Any], logits: torch.Tensor) -> None:
        sampled.extend(keys)  # the logits may still be in flight on the device: timed when the step returns

    done: dict[Any, Any] = {}

    def submit(key: Any, ids: list[int], version: Any, new: int, priority: str) -> None:
        trace.submitted[key] = time.perf_counter()
        engine.submit(TextRequest(key=key, prompt_ids=ids, adapters=[(version, 1.0)], priority=priority,
                                  sampling=SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)),
                      lambda e: done.__setitem__(e.key, e) if type(e).__name__ != "TextChunkEvent" else None)

    launch = engine.runner.launch

    def timed(plan: Any, *rest: Any) -> Any:
        start = time.perf_counter()
        launched = launch(plan, *rest)
        keys = list(sampled)
        sampled.clear()
        take = launched.tokens

        def tokens() -> list[int]:  # the tokens reach the host here (overlapped: during the next step)
            out = take()
            now = time.perf_counter()
            for k in keys:
                trace.tokens.setdefault(k, []).append(now)
            # A step's time from its launch, or (overlapped) from the last step's tokens, if later.
            begin = max(start, trace.steps[-1][1]) if trace.steps else start
            trace.steps.append((begin, now, len(plan.decode), sum(c.length for c in plan.chunks)))
            trace.chunk_owners.append({c.seq.key for c in plan.chunks})
            return out

        launched.tokens = tokens  # type: ignore[method-assign]
        return launched

    engine.runner.on_logits = hook
    engine.runner.launch = timed  # type: ignore[method-assign]
    captures = engine.graphs.captures if engine.graphs else 0
    ambient_priority = "background" if priorities else "normal"
    active = {}

    def chatter(i: int) -> None:  # an NPC's next line, on its own adapter
        generation = active.get(i, (None, -1))[1] + 1
        key = ("ambient", i, generation)
        active[i] = (key, generation)
        submit(key, tokens(args.ambient_prompt), versions[i % len(versions)], args.ambient_tokens, ambient_priority)

    def tick() -> None:
        engine.step()
        for i, (key, _) in list(active.items()):
            if key in done:
                chatter(i)

    try:
        for i in range(args.ambient):
            chatter(i)
        for _ in range(20):  # every ambient stream decoding
            tick()
        start = time.perf_counter()
        for p in range(args.players):
            version = versions[(args.ambient + p) % len(versions)]
            prompt = tokens(args.player_prompt)
            submit(("player", p, 1), prompt, version, args.player_tokens, "player")
            while ("player", p, 1) not in done:
                tick()
            turn2 = prompt + list(done[("player", p, 1)].token_ids) + tokens(args.turn_tokens)
            submit(("player", p, 2), turn2, version, args.player_tokens, "player")
            while ("player", p, 2) not in done:
                tick()
            for _ in range(args.gap_steps):
                tick()
        elapsed = time.perf_counter() - start
        for key, _ in active.values():
            engine.cancel(key)
        engine.run_until_idle()
    finally:
        engine.runner.on_logits = None
        engine.runner.launch = launch  # type: ignore[method-assign]
    failed = [e for e in done.values() if not hasattr(e, "finish_reason")]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    return summarize(trace, done, args, elapsed, start) | {
        "graph_captures": (engine.graphs.captures if engine.graphs else 0) - captures}


def summarize(trace: Trace, done: dict[Any, Any], args: argparse.Namespace, elapsed: float,
              start: float) -> dict[str, Any]:
    ttft = {turn: [trace.tokens[("player", p, turn)][0] - trace.submitted[("player", p, turn)]
                   for p in range(args.players)] for turn in (1, 2)}
    joins = [(s, e) for (s, e, _, _), owners in zip(trace.steps, trace.chunk_owners, strict=True)
             if any(k[0] == "player" for k in owners) and s >= start]
    gaps, gaps_joining = [], []
    for key, times in trace.tokens.items():
        if key[0] != "ambient":
            continue
        for a, b in itertools.pairwise(times):
            if a < start:
                continue
            gaps.append(b - a)
            if any(s <= b and e >= a for s, e in joins):
                gaps_joining.append(b - a)
    full = min(args.ambient, args.max_seqs or args.ambient + 1)  # decode rows of a steady step
    decode_steps = [e - s for (s, e, d, c) in trace.steps if s >= start and c == 0 and d == full]
    mixed = [e - s for (s, e, d, c) in trace.steps if s >= start and c and d >= full - 1]
    produced = sum(len(v) for v in trace.tokens.values())
    cached = [done[("player", p, 2)].cached_tokens for p in range(args.players)]
    return {
        "player_ttft_ms": {"p50": _ms(_pct(ttft[1], 0.5)), "p99": _ms(_pct(ttft[1], 0.99))},
        "turn2_ttft_ms": {"p50": _ms(_pct(ttft[2], 0.5)), "p99": _ms(_pct(ttft[2], 0.99))},
        "turn2_cached_tokens": statistics.median(cached) if cached else 0,
        "ambient_gap_ms": {"p50": _ms(_pct(gaps, 0.5)), "p99": _ms(_pct(gaps, 0.99)),
                           "worst": _ms(max(gaps, default=0)),
                           "worst_while_joining": _ms(max(gaps_joining, default=0))},
        "decode_step_ms": _ms(_pct(decode_steps, 0.5)),
        "step_with_prompt_chunk_ms": _ms(_pct(mixed, 0.5)),
        "stall_per_join_ms": _ms(sum(e - s for s, e in joins) / max(1, 2 * args.players)),
        "tokens_per_s": round(produced / elapsed, 1),
    }


def idle_ttft(engine: TextEngine, version: Any, args: argparse.Namespace) -> float:
    """A player prompt on an idle engine (nothing cached): the floor for turn 1."""
    engine.cancel("idle")
    engine.pool = engine.scheduler.pool = BlockPool(engine.pool.num_blocks, engine.pool.block_size,
                                                    prefix_cache=False)
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(5, min(engine.spec.vocab_size, len(engine.tokenizer)), (args.player_prompt,), generator=g)
    events: list[Any] = []
    start = time.perf_counter()
    engine.submit(TextRequest(key="idle", prompt_ids=ids.tolist(), adapters=[(version, 1.0)],
                              sampling=SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)), events.append)
    engine.run_until_idle()  # one token: done when its step is
    elapsed = time.perf_counter() - start
    if getattr(events[-1], "finish_reason", None) != "length":
        raise RuntimeError(f"the idle request failed: {events[-1]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loraloom bench latency", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help=f"a model folder, 'default' or random:{{{','.join(SHAPES)}}}")
    p.add_argument("--ambient", type=int, default=7, help="ambient streams, each on its own adapter")
    p.add_argument("--ambient-prompt", type=int, default=64)
    p.add_argument("--ambient-tokens", type=int, default=120, help="tokens of each ambient line; each NPC's "
                   "next line follows as soon as one ends")
    p.add_argument("--max-seqs", type=int, default=None, help="sequences at once (default: the ambient streams + "
                   "1; as many as the ambient streams: a player line must pause one, or wait for one to end)")
    p.add_argument("--players", type=int, default=3, help="player conversations, one after the other")
    p.add_argument("--player-prompt", type=int, default=1000)
    p.add_argument("--player-tokens", type=int, default=32)
    p.add_argument("--turn-tokens", type=int, default=60, help="new tokens of each conversation's second turn")
    p.add_argument("--gap-steps", type=int, default=5, help="decode steps between conversations")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--step-tokens", type=int, default=None, help="the engine's max_step_tokens (default: its own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = args.max_seqs or args.ambient + 1
    context = args.player_prompt + 2 * args.player_tokens + args.turn_tokens + 16
    context = max(context, args.ambient_prompt + args.ambient_tokens + 16)
    adapters = args.ambient + args.players
    cfg = EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch."), max_seqs=n, max_context=context,
                       lora_slots=adapters, max_lora_rank=args.rank,
                       **({"max_step_tokens": args.step_tokens} if args.step_tokens else {}),
                       kv_cache_mb=kv_mb(args.model, None if args.model.startswith("random:") or args.model == "default"
                                         else ModelSpec.from_folder(Path(args.model)), dtype, (n + 1) * context))
    if args.model.startswith("random:"):
        spec, tensors, tokenizer = random_llama(args.model.split(":", 1)[1], device=device, dtype=dtype,
                                                max_positions=max(4096, context))
        engine = TextEngine(TextModel(spec, tensors, device=device, dtype=dtype), tokenizer, cfg)
    else:
        engine = TextEngine.from_folder(args.model, cfg)
    tmp = Path(tempfile.mkdtemp(prefix="loraloom-latency-"))
    versions = []
    for i, d in enumerate(write_adapters(engine.spec, tmp, adapters, [args.rank], ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj", "gate_proj", "up_proj",
                                                                                  "down_proj"))):
        files = read_adapter_files(d, "text")
        prepared = engine.prepare_adapter(files)
        versions.append(files.to_version(d.name, i + 1, prepared.payload, prepared.rank, prepared.targets))
    # Warm up with the same scenario: kernels compiled, graphs recorded, slots loaded for every shape it meets.
    run_scenario(engine, versions, args, cache=True, priorities=True, seed=0)
    idle = min(idle_ttft(engine, versions[-1], args) for _ in range(2))  # the first pays for new shapes
    configs = [("cache on, priorities on", True, True), ("cache off, priorities on", False, True),
               ("cache on, priorities off", True, False)]
    rows = {label: run_scenario(engine, versions, args, cache=cache, priorities=prio, seed=1)
            for label, cache, prio in configs}
    if engine.overlap_steps:  # the default first; then each step launched only after the last one's tokens
        engine.overlap_steps = False
        rows["one step at a time"] = run_scenario(engine, versions, args, cache=True, priorities=True, seed=1)
        engine.overlap_steps = True
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine())
    result = {"machine": machine, "model": engine.spec.name, "ambient": args.ambient, "players": args.players,
              "player_prompt": args.player_prompt, "idle_ttft_ms": _ms(idle), "configs": rows}
    print(f"loraloom bench latency: {engine.spec.name} on {machine}; max_step_tokens {cfg.max_step_tokens}; "
          f"{args.ambient} ambient streams, "
          f"{args.players} players with {args.player_prompt}-token prompts (+{args.turn_tokens} on turn 2); "
          f"idle TTFT {_ms(idle)} ms")
    head = (f"{'configuration':28} {'TTFT p50':>9} {'p99':>8} {'turn2':>8} {'cached':>7} {'gap p50':>8} "
            f"{'p99':>7} {'worst':>7} {'join':>7} {'decode':>7} {'+chunk':>7} {'tok/s':>8} {'graphs':>6}")
    print(head)
    for label, r in rows.items():
        gap = r["ambient_gap_ms"]
        print(f"{label:28} {r['player_ttft_ms']['p50']:>9} {r['player_ttft_ms']['p99']:>8} "
              f"{r['turn2_ttft_ms']['p50']:>8} {r['turn2_cached_tokens']:>7} {gap['p50']:>8} {gap['p99']:>7} "
              f"{gap['worst']:>7} {gap['worst_while_joining']:>7} {r['decode_step_ms']!s:>7} "
              f"{r['step_with_prompt_chunk_ms']!s:>7} {r['tokens_per_s']:>8} {r['graph_captures']:>6}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
