"""Multi-LoRA decode throughput, side by side in one run (`loraloom bench text` runs this file).

    python benchmarks/bench_text.py --model default --streams 8 --new-tokens 64 --json benchmarks/results/text_cpu.json


N concurrent streams on N distinct adapters through our engine, against
  (a) the same engine serving the base model only (same N streams),
  (b) transformers + PEFT mixed-adapter batch generation (`generate(..., adapter_names=[...])`),
  (c) one request at a time per adapter through our engine,
  (with --constrained) the same N streams with every row under its own JSON schema,
  (with --deterministic) the same N streams on a second engine in deterministic mode (invariant.py),
plus, on CUDA, the step time against the floor of reading the weights once per step.
Prints one table, writes JSON. Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.fixtures.random_model import SHAPES, random_adapter_tensors, random_llama
from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.config import ModelSpec
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.kv import PagedKV
from daemon.engines.text.model import TextModel
from daemon.engines.text.quant import weight_nbytes
from daemon.engines.text.quant_formats import DENSE, QuantScheme
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def kv_mb(model: str, spec: ModelSpec | None, dtype: torch.dtype, tokens: int) -> int:
    """A KV pool that holds `tokens` (every stream at full length: a throughput run never pauses one)."""
    if spec is None:
        if model.startswith("random:"):
            hidden, layers, heads, kv, *_ = SHAPES[model.split(":", 1)[1]]
            per = 2 * layers * kv * (hidden // heads) * torch.empty((), dtype=dtype).element_size()
            return -(-(tokens + 64) * per // 2**20)
        from daemon.engines.text.default_model import ensure_default_text_model

        spec = ModelSpec.from_folder(ensure_default_text_model())
    return -(-(tokens + 64) * PagedKV.bytes_per_token(spec, dtype) // 2**20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_adapters(spec: Any, folder: Path, n: int, ranks: list[int], targets: tuple[str, ...]) -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    for i in range(n):
        rank = ranks[i % len(ranks)]
        d = folder / f"adapter{i:02d}"
        d.mkdir(parents=True)
        save_file(random_adapter_tensors(spec, rank=rank, targets=targets, seed=100 + i),
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": list(targets), "bias": "none"}))
        paths.append(d)
    return paths


def _run_engine(engine: TextEngine, prompts: list[list[int]], adapters: list[list[Any]], new_tokens: int,
                constraints: list[Any] | None = None) -> dict:
    """All requests at once; aggregate tokens/s, and the inter-token latency every stream sees:
    the time of each decode step (every running stream gets one token per step)."""
    step_times: list[float] = []
    other = 0.0  # steps with prompt tokens (and the ramp-up and -down)
    for i, (ids, ad) in enumerate(zip(prompts, adapters, strict=True)):
        engine.submit(TextRequest(key=i, prompt_ids=ids, adapters=ad,
                                  constraint=constraints[i] if constraints else None,
                                  sampling=SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)),
                      lambda e: None)
    start = time.perf_counter()
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        _sync(engine.device)
        if engine.runner.last_batch_size == len(prompts):  # a decode step with every stream in it
            step_times.append(time.perf_counter() - t0)
        else:
            other += time.perf_counter() - t0
    total = time.perf_counter() - start
    tokens = len(prompts) * new_tokens
    ordered = sorted(step_times)
    return {"tokens": tokens, "seconds": total, "tokens_per_s": tokens / total, "other_steps_ms": 1000 * other,
            "step_ms_median": 1000 * statistics.median(ordered) if ordered else None,
            "itl_ms_p50": 1000 * statistics.median(ordered) if ordered else None,
            "itl_ms_p99": 1000 * ordered[int(0.99 * (len(ordered) - 1))] if ordered else None}


def _run_peft(model_dir_or_parts: Any, adapter_dirs: list[Path], prompts: list[list[int]], new_tokens: int,
              device: torch.device, dtype: torch.dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    kind, value = model_dir_or_parts
    if kind == "folder":
        base = AutoModelForCausalLM.from_pretrained(str(value), dtype=dtype).to(device)
    else:
        spec, tensors = value
        cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                          num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                          num_key_value_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
                          rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta,
                          tie_word_embeddings=spec.tie_word_embeddings, max_position_embeddings=4096)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        missing, _ = base.load_state_dict(tensors, strict=False)
        assert set(missing) <= {"lm_head.weight"}, missing
    base.generation_config.pad_token_id = 0
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    names = [f"a{i % len(adapter_dirs)}" for i in range(len(prompts))]
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(prompts)
    del model, base
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def compile_schemas(engine: TextEngine, n: int) -> dict[str, Any]:
    """One JSON schema per stream (an NPC's line and mood, under its own key), each compiled anew.
    The line is a long string, so a greedy row keeps generating until max_tokens like the others."""
    from daemon.engines.text.constraints import Constraint

    grammars, times = [], []
    for i in range(n):
        schema = {"type": "object", "additionalProperties": False, "required": [f"npc_{i}", "mood"],
                  "properties": {f"npc_{i}": {"type": "string", "minLength": 2000},
                                 "mood": {"enum": ["calm", "angry", "afraid"]}}}
        started = time.perf_counter()
        grammars.append(engine.prepare_constraint(Constraint("json_schema", json.dumps(schema))))
        times.append(1000 * (time.perf_counter() - started))
    return {"grammars": grammars, "compile_ms": times}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _copy_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del x, y
    return 2 * 2 * 1024**3 / statistics.median(times)  # read + write bytes per second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loraloom bench text", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default",
                   help=f"a model folder, 'default' (embedded SmolLM2) or random:{{{','.join(SHAPES)}}}")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--adapters", type=int, default=None, help="distinct adapters (default: one per stream)")
    p.add_argument("--ranks", default="8,16", help="adapter ranks, cycled")
    p.add_argument("--targets", default=",".join(ALL_TARGETS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--peft-new-tokens", type=int, default=None, help="tokens for the PEFT peer (default: same)")
    p.add_argument("--sequential-streams", type=int, default=None, help="how many of the streams (c) runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (to measure what they bring)")
    p.add_argument("--lora-kernel", default="auto", choices=["auto", "dense", "bgmv"])
    p.add_argument("--no-kernels", "--no-triton", dest="no_kernels", action="store_true",
                   help="PyTorch ops only (no Triton kernels on CUDA, no numba LoRA loop on the CPU)")
    p.add_argument("--constrained", action="store_true",
                   help="also run every stream under its own JSON schema (and time compiling and masks)")
    p.add_argument("--deterministic", action="store_true",
                   help="also time the multi-LoRA streams on an engine in deterministic mode (its price)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "fp8"],
                   help="quantize the base weights at load (weight-only, round-to-nearest); LoRA stays in --dtype")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    n = args.streams
    n_adapters = args.adapters or n
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = tuple(t for t in args.targets.split(",") if t)
    context = args.prompt_tokens + args.new_tokens + 8
    shape_spec = (ModelSpec.from_folder(Path(args.model)) if not args.model.startswith("random:")
                  and args.model != "default" else None)
    cfg = EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch."), max_seqs=n,
                       max_context=context, lora_slots=n_adapters,
                       max_lora_rank=max(ranks), prefill_chunk=512, max_step_tokens=max(512, n),
                       cuda_graphs=not args.eager, lora_layout=args.lora_kernel,
                       kernels=not args.no_kernels, kv_cache_mb=kv_mb(args.model, shape_spec, dtype, n * context),
                       quantize=args.quantize)
    if args.quantize:
        args.no_peft = True  # the PEFT peer would run the bf16 weights: not the same model
    tmp = Path(tempfile.mkdtemp(prefix="loraloom-bench-"))
    if args.model.startswith("random:"):
        spec, tensors, tokenizer = random_llama(args.model.split(":", 1)[1], device=device, dtype=dtype)
        peer_model: Any = ("parts", (spec, dict(tensors)))

        def build(config: EngineConfig) -> TextEngine:
            scheme = QuantScheme("rtn", kind=config.quantize) if config.quantize else DENSE  # type: ignore[arg-type]
            return TextEngine(TextModel(spec, dict(tensors), device=device, dtype=dtype, scheme=scheme), tokenizer,
                              config)
        name = spec.name
    else:
        def build(config: EngineConfig) -> TextEngine:
            return TextEngine.from_folder(args.model, config)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    engine = build(cfg)
    # What building the engine allocated on the GPU (quantized weights, KV pool, LoRA pool, tables); a dense
    # random model's weights are the fixture's own tensors, so there it counts only what the engine adds.
    allocated_mb = None if before is None else (torch.cuda.memory_allocated(device) - before) / 2**20
    if not args.model.startswith("random:"):
        assert engine.model_dir is not None
        peer_model = ("folder", engine.model_dir)
        name = engine.spec.name
    spec = engine.spec
    adapter_dirs = write_adapters(spec, tmp, n_adapters, ranks, targets)

    def load_versions(e: TextEngine) -> list:
        out = []
        for i, d in enumerate(adapter_dirs):
            files = read_adapter_files(d, "text")
            prepared = e.prepare_adapter(files)
            out.append(files.to_version(d.name, i + 1, prepared.payload, prepared.rank, prepared.targets))
        return out
    versions = load_versions(engine)
    g = torch.Generator().manual_seed(0)
    vocab = min(spec.vocab_size, len(engine.tokenizer))
    prompts = [torch.randint(5, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(n)]
    multi = [[(versions[i % n_adapters], 1.0)] for i in range(n)]
    base = [[] for _ in range(n)]

    schemas = compile_schemas(engine, n) if args.constrained else None
    det_engine = build(dataclasses.replace(cfg, deterministic=True)) if args.deterministic else None
    det_multi = None
    if det_engine is not None:
        det_versions = load_versions(det_engine)
        det_multi = [[(det_versions[i % n_adapters], 1.0)] for i in range(n)]
        _run_engine(det_engine, prompts, det_multi, 8)
    # Warm up both (load the slots; compile kernels and record the graphs for either path), twice: the
    # second pass meets the shapes of prompts whose blocks the prefix cache holds, as every repeat does
    # (at 128 streams on 128 adapters a repeat that recorded those graphs itself ran at 0.2x the next).
    for _ in range(2):
        _run_engine(engine, prompts, multi, 8)
        _run_engine(engine, prompts, base, 8)
    if schemas:
        _run_engine(engine, prompts, multi, 8, schemas["grammars"])
    rows: dict[str, list[dict]] = {"multi": [], "base": [], "sequential": [], "constrained": [], "deterministic": []}
    seq_n = min(args.sequential_streams or n, n)
    for rep in range(args.repeats):
        # Alternate which goes first, so neither always runs on a machine just warmed (or slowed) by the other.
        for kind, adapters in (("multi", multi), ("base", base))[::1 if rep % 2 == 0 else -1]:
            rows[kind].append(_run_engine(engine, prompts, adapters, args.new_tokens))
        if schemas:
            rows["constrained"].append(_run_engine(engine, prompts, multi, args.new_tokens, schemas["grammars"]))
        if det_engine is not None and det_multi is not None:
            rows["deterministic"].append(_run_engine(det_engine, prompts, det_multi, args.new_tokens))
        seq = [_run_engine(engine, prompts[i:i + 1], multi[i:i + 1], args.new_tokens) for i in range(seq_n)]
        tokens = sum(r["tokens"] for r in seq)
        seconds = sum(r["seconds"] for r in seq)
        rows["sequential"].append({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                   "step_ms_median": statistics.median(r["step_ms_median"] for r in seq)})

    def med(kind: str, key: str) -> float | None:
        vals = [r[key] for r in rows[kind] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def paired(kind: str) -> list[float]:
        """ours / `kind` in tokens/s within each repeat (measured minutes apart at most, so a drifting
        machine moves both): on a noisy machine the median of these is steadier than a ratio of medians."""
        return [m["tokens_per_s"] / r["tokens_per_s"] for m, r in zip(rows["multi"], rows[kind], strict=True)]

    peft = None
    if not args.no_peft:
        peft = _run_peft(peer_model, adapter_dirs, prompts, args.peft_new_tokens or args.new_tokens, device, dtype)
    bw = _copy_bandwidth(device)
    weight_bytes = sum(weight_nbytes(x) for layer in engine.model.layers for x in layer.values()
                       if x is not None) + weight_nbytes(engine.model.lm_head)
    slot_bytes = engine.storage.nbytes()
    ours = med("multi", "tokens_per_s")
    assert ours is not None
    result = {
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "cuda_graphs": engine.graphs is not None, "lora_kernel": args.lora_kernel, "kernel": engine.kernels.name,
        "model": name, "parameters": spec.num_parameters(), "dtype": str(dtype).removeprefix("torch."),
        "weights": engine.model.scheme.label, "weights_mb": engine.model.nbytes() / 2**20,
        "engine_mb": (engine.model.nbytes() + engine.kv.nbytes() + engine.storage.pool_nbytes()) / 2**20,
        "allocated_mb": allocated_mb,
        "streams": n, "adapters": n_adapters, "ranks": ranks, "targets": list(targets),
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
        "ours_multi_lora": {k: med("multi", k) for k in ("tokens_per_s", "step_ms_median", "itl_ms_p50", "itl_ms_p99",
                                                          "other_steps_ms")},
        "a_base_only": {k: med("base", k) for k in ("tokens_per_s", "step_ms_median", "itl_ms_p50", "itl_ms_p99",
                                                   "other_steps_ms")},
        "b_peft_mixed_batch": peft,
        "c_one_at_a_time": {k: med("sequential", k) for k in ("tokens_per_s", "step_ms_median")},
        "constrained": {k: med("constrained", k) for k in ("tokens_per_s", "step_ms_median", "itl_ms_p50",
                                                            "itl_ms_p99")} if schemas else None,
        "deterministic": {k: med("deterministic", k) for k in ("tokens_per_s", "step_ms_median", "itl_ms_p50",
                                                                "itl_ms_p99")} if det_engine else None,
        "schema_compile_ms": schemas and {"p50": _pct(schemas["compile_ms"], 0.5),
                                          "p99": _pct(schemas["compile_ms"], 0.99)},
        "mask_us_per_row_token": (1000 * engine.runner.masks.mask_ms / engine.runner.masks.masked_rows
                                  if schemas and engine.runner.masks else None),
        "paired_ratio_a": paired("base"),
        "paired_ratio_c": paired("sequential"),
        "copy_bandwidth_bytes_per_s": bw,
        # Reading the weights once per step at the copy bandwidth (bytes moved per second).
        "floor_ms_base": None if bw is None else 1000 * weight_bytes / bw,
        "floor_ms_with_adapters": None if bw is None else 1000 * (weight_bytes + slot_bytes) / bw,
        "runs": rows,
    }
    base_rate = result["a_base_only"]["tokens_per_s"]
    lines = [
        f"loraloom bench text: {name} ({spec.num_parameters() / 1e6:.0f}M params, {result['dtype']}, weights "
        f"{result['weights']} {result['weights_mb']:.0f} MiB) on "
        f"{result['machine']['device']}; {n} streams on {n_adapters} adapters (ranks {args.ranks}, "
        f"{len(targets)} targets), {args.new_tokens} new tokens, median of {args.repeats}"
        f"{'' if engine.kernels.name == 'torch' else f'; {engine.kernels.name} kernels'}",
        f"{'configuration':44} {'tokens/s':>10} {'step ms':>9} {'ITL p50':>8} {'ITL p99':>8} {'ours is':>9}",
    ]

    def line(label: str, d: dict | None) -> None:
        if not d:
            return
        rate = d.get("tokens_per_s")
        ratio = f"{ours / rate:.2f}x" if rate else ""
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"{label:44} {rate or 0:>10.1f} {fmt(d.get('step_ms_median')):>9} "
                     f"{fmt(d.get('itl_ms_p50')):>8} {fmt(d.get('itl_ms_p99')):>8} {ratio:>9}")

    line(f"ours: {n} streams, {n_adapters} distinct adapters", result["ours_multi_lora"])
    line("(a) ours, base model only", result["a_base_only"])
    line("(b) transformers+PEFT mixed-adapter batch", peft)
    line(f"(c) ours, one request at a time ({seq_n} runs)", result["c_one_at_a_time"])
    line("ours, every row under its own JSON schema", result["constrained"])
    line("ours, deterministic mode", result["deterministic"])
    lines.append(f"multi-LoRA / base-only = {ours / base_rate:.2f}")
    if schemas:
        c = result["constrained"]["step_ms_median"]
        lines.append(f"constrained decode step / unconstrained = {c / result['ours_multi_lora']['step_ms_median']:.3f}"
                     f"; schema compile p50 {result['schema_compile_ms']['p50']:.2f} ms, p99 "
                     f"{result['schema_compile_ms']['p99']:.2f} ms; mask {result['mask_us_per_row_token']:.1f} us "
                     "per row and token (host, on llguidance's threads)")
    if det_engine is not None:
        d = result["deterministic"]["step_ms_median"]
        lines.append(f"deterministic decode step / default = {d / result['ours_multi_lora']['step_ms_median']:.3f}")
    for label, key in (("(a) base only", "paired_ratio_a"), ("(c) one at a time", "paired_ratio_c")):
        vals = result[key]
        lines.append(f"paired within each repeat, ours / {label}: median {statistics.median(vals):.2f}x "
                     f"(range {min(vals):.2f}-{max(vals):.2f} over {len(vals)})")
    if bw is not None:
        lines.append(f"copy bandwidth {bw / 1e12:.2f} TB/s; floor per step: {result['floor_ms_base']:.3f} ms base, "
                     f"{result['floor_ms_with_adapters']:.3f} ms with adapters; ours "
                     f"{result['ours_multi_lora']['step_ms_median']:.3f} ms, base-only "
                     f"{result['a_base_only']['step_ms_median']:.3f} ms")
    lines.append(f"engine memory {result['engine_mb']:.0f} MiB (weights + KV + LoRA pool)"
                 + ("" if allocated_mb is None else f"; building it allocated {allocated_mb:.0f} MiB on the GPU"))
    lines.extend(f"kernel failure (fell back to PyTorch ops): {f}" for f in engine.kernels.failures)
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
