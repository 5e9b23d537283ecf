"""The engine's logits equal transformers + PEFT on the same weights (float32, tiny random models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import write_text_adapter

from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.graphs import StepGraphs
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest

ADAPTERS = {
    "a_qv": dict(rank=4, targets=("q_proj", "v_proj"), seed=21),
    "b_all": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  seed=22),
    "c_mlp": dict(rank=2, targets=("gate_proj", "up_proj", "down_proj"), seed=23, use_rslora=True),
    "d_ok": dict(rank=6, targets=("k_proj", "o_proj"), seed=24, alpha=3.0),
}


def load_version(engine: TextEngine, folder: Path, number: int = 1):
    files = read_adapter_files(folder, "text")
    prepared = engine.prepare_adapter(files)
    return files.to_version(folder.name, number, prepared.payload, prepared.rank, prepared.targets)


def reference_models(model_dir: Path, adapter_dirs: dict[str, Path]):
    """A PEFT model holding every adapter, plus per-module PEFT delta weights for mixes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(adapter_dirs[n], adapter_name=n)
    peft.eval()
    return peft


@torch.no_grad()
def reference_logits(peft, ids: list[int], adapters: list[tuple[str, float]]) -> torch.Tensor:
    """Logits [len(ids), V] of the base model plus the scaled adapters (PEFT's math)."""
    x = torch.tensor([ids])
    if not adapters:
        with peft.disable_adapter():
            return peft(input_ids=x).logits[0].float()
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        peft.set_adapter(adapters[0][0])
        return peft(input_ids=x).logits[0].float()
    # A weighted mix: add sum(scale * PEFT's delta weight) onto the base weights, then run the base.
    from peft.tuners.lora import LoraLayer

    saved = []
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            delta = None
            for name, scale in adapters:
                if name in module.lora_A:
                    d = module.get_delta_weight(name) * scale
                    delta = d if delta is None else delta + d
            if delta is not None:
                w = module.get_base_layer().weight
                saved.append((w, w.detach().clone()))
                w.data += delta
    try:
        with peft.disable_adapter():
            return peft(input_ids=x).logits[0].float()
    finally:
        for w, old in saved:
            w.data.copy_(old)


# "cpu": decode steps through the numba LoRA loop; "cpu-torch": PyTorch ops only; "cpu-graphs": decode
# steps through the CUDA-graph input buffers (layout, padding to a batch bucket, tables sent by the row,
# dense LoRA scales) run eagerly, not recorded. CUDA runs (eager prefill + graph-replayed decode) exist
# only where a GPU does; CI has none.
DEVICES = ["cpu", "cpu-torch", "cpu-graphs", *(["cuda"] if torch.cuda.is_available() else [])]


def make_engine(model_dir: Path, device: str, **config: object) -> TextEngine:
    engine = TextEngine.from_folder(model_dir, EngineConfig(device="cuda" if device == "cuda" else "cpu",
                                                            kernels=device != "cpu-torch", **config))  # type: ignore[arg-type]
    if device == "cpu-graphs":
        engine.graphs = engine.runner.graphs = StepGraphs(
            engine.model, engine.kv, engine.storage, max_rows=engine.config.max_seqs,
            table_width=engine.runner.table_width, max_context=engine.max_context, record=False)
    return engine


def check_graphs(engine: TextEngine, device: str) -> None:
    if device in ("cuda", "cpu-graphs"):
        assert engine.graphs is not None and engine.graphs.replays > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch_fixture", ["tiny_model_dir", "tiny_qwen_dir", "tiny_qwen_swa_dir", "tiny_mistral_dir"])
def test_logits_match_peft_for_mixed_batch(arch_fixture: str, device: str, request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    """One batch: a base row, rows on four adapters of different ranks/targets, a weighted mix,
    different prompt lengths, chunked prefill and rows joining mid-decode: logits within 1e-4."""
    model_dir: Path = request.getfixturevalue(arch_fixture)
    dirs = {n: write_text_adapter(tmp_path / n, model_dir, **spec) for n, spec in ADAPTERS.items()}
    engine = make_engine(model_dir, device, dtype="float32", max_seqs=8, max_context=128, lora_slots=6,
                         max_lora_rank=8, prefill_chunk=5, max_step_tokens=24)
    assert engine.kernels.name == {"cpu": "numba", "cpu-torch": "torch", "cpu-graphs": "numba",
                                   "cuda": "triton"}[device]
    versions = {n: load_version(engine, d) for n, d in dirs.items()}
    peft = reference_models(model_dir, dirs)
    prompts = ["Ahoy matey", "The elven archivist keeps the old scrolls", "Hammer",
               "Gold coins, silver rings, and a map",
               "Once upon a time", "Hello, who goes there? A traveller from the northern hills"]
    rows = [
        [],
        [("a_qv", 1.0)],
        [("b_all", 1.0)],
        [("c_mlp", 1.0)],
        [("d_ok", 1.0)],
        [("a_qv", 0.7), ("b_all", -0.4), ("c_mlp", 1.3)],
    ]
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(rows))}
    done: dict[int, object] = {}

    def hook(keys: list[int], logits: torch.Tensor) -> None:
        for k, row in zip(keys, logits, strict=True):
            captured[k].append(row.detach().cpu().clone())

    engine.runner.on_logits = hook
    ids = [engine.encode_prompt(p) for p in prompts]

    def submit(i: int) -> None:
        engine.submit(TextRequest(
            key=i, prompt_ids=ids[i], sampling=SamplingParams(temperature=0.0, max_tokens=6),
            adapters=[(versions[n], s) for n, s in rows[i]]),
            lambda e: done.__setitem__(e.key, e) if not type(e).__name__.endswith("ChunkEvent") else None)

    for i in range(4):
        submit(i)
    for _ in range(3):  # the first rows are prefilling/decoding when the others join
        engine.step()
    for i in range(4, len(rows)):
        submit(i)
    while engine.has_work():
        engine.step()
    assert engine.slots.stats.loads == 4
    if device == "cuda":
        assert engine.graphs is not None and engine.graphs.replays > engine.graphs.chunk_replays > 0
    check_graphs(engine, device)
    for i, adapters in enumerate(rows):
        event = done[i]
        assert event.finish_reason in ("length", "stop"), event
        generated = list(event.token_ids)
        full = ids[i] + generated
        ref = reference_logits(peft, full, adapters)
        n_prompt = len(ids[i])
        assert len(captured[i]) >= len(generated)
        for j, got in enumerate(captured[i]):
            want = ref[n_prompt - 1 + j]
            rel = (got - want).abs().max() / want.abs().max()
            assert rel < 1e-4, f"row {i} ({adapters}) step {j}: relative error {rel:.2e}"
        if adapters:  # the adapter really changed this row
            with torch.no_grad():
                base = reference_logits(peft, full, [])[n_prompt - 1]
            assert (base - captured[i][0]).abs().max() > 1e-3


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu-torch"])
def test_prefix_hits_and_paused_sequences_match_peft(device: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Second turns served from the prefix cache, and background sequences paused for a player line
    and resumed from their cached blocks: every sampled row's logits still equal PEFT's."""
    dirs = {n: write_text_adapter(tmp_path / n, tiny_model_dir, **spec) for n, spec in ADAPTERS.items()}
    engine = make_engine(tiny_model_dir, device, dtype="float32", max_seqs=2, max_context=128, lora_slots=6,
                         max_lora_rank=8, block_size=4, prefill_chunk=8, max_step_tokens=16)
    versions = {n: load_version(engine, d) for n, d in dirs.items()}
    peft = reference_models(tiny_model_dir, dirs)
    captured: dict[str, list[torch.Tensor]] = {}
    done: dict[str, object] = {}

    def hook(keys: list[str], logits: torch.Tensor) -> None:
        for k, row in zip(keys, logits, strict=True):
            captured.setdefault(k, []).append(row.detach().cpu().clone())

    engine.runner.on_logits = hook
    persona = engine.encode_prompt("The elven archivist keeps the old scrolls in a library under the roots.")
    mix = [("a_qv", 0.7), ("b_all", -0.4)]

    def submit(key: str, ids: list[int], adapters: list[tuple[str, float]], priority: str = "normal",
               tokens: int = 6) -> None:
        engine.submit(TextRequest(key=key, prompt_ids=ids, sampling=SamplingParams(temperature=0.0, max_tokens=tokens,
                                                                                    ignore_eos=True),
                                  adapters=[(versions[n], s) for n, s in adapters], priority=priority),
                      lambda e: done.__setitem__(e.key, e) if not type(e).__name__.endswith("ChunkEvent") else None)

    submit("turn1", persona, mix)
    engine.run_until_idle()
    turn2 = persona + list(done["turn1"].token_ids) + engine.encode_prompt(" And then?")
    submit("turn2", turn2, mix)
    submit("base2", turn2, [])  # the same tokens on the base model: no reuse
    engine.run_until_idle()
    assert done["turn1"].cached_tokens == 0
    assert done["turn2"].cached_tokens >= len(persona) - 4 and done["base2"].cached_tokens == 0
    # Two background lines decoding; a player line arrives and one of them pauses.
    submit("bg1", persona, [("c_mlp", 1.0)], "background", tokens=12)
    submit("bg2", engine.encode_prompt("Gold coins, silver rings"), [("d_ok", 1.0)], "background", tokens=12)
    for _ in range(6):
        engine.step()
    submit("player", engine.encode_prompt("Hello"), [("a_qv", 1.0)], "player")
    engine.run_until_idle()
    assert engine.scheduler.preempted >= 1
    check_graphs(engine, device)
    prompts = {"turn1": (persona, mix), "turn2": (turn2, mix), "base2": (turn2, []),
               "bg1": (persona, [("c_mlp", 1.0)]), "bg2": (engine.encode_prompt("Gold coins, silver rings"),
                                                         [("d_ok", 1.0)]),
               "player": (engine.encode_prompt("Hello"), [("a_qv", 1.0)])}
    for key, (ids, adapters) in prompts.items():
        generated = list(done[key].token_ids)
        ref = reference_logits(peft, ids + generated, adapters)
        assert len(captured[key]) == len(generated), key
        for j, got in enumerate(captured[key]):
            want = ref[len(ids) - 1 + j]
            rel = (got - want).abs().max() / want.abs().max()
            assert rel < 1e-4, f"{key} step {j}: relative error {rel:.2e}"
    assert engine.pool.in_use == 0


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu-torch"])
def test_a_lone_request_on_an_idle_engine_matches_peft(device: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Steps that are one prompt chunk and nothing else (an idle engine; on CUDA, chunk-only graphs),
    then its decode steps alone: logits equal PEFT's."""
    folder = write_text_adapter(tmp_path / "b_all", tiny_model_dir, **ADAPTERS["b_all"])
    engine = make_engine(tiny_model_dir, device, dtype="float32", max_seqs=4, max_context=128, lora_slots=2,
                         max_lora_rank=8, prefill_chunk=16, max_step_tokens=16)
    version = load_version(engine, folder)
    peft = reference_models(tiny_model_dir, {"b_all": folder})
    captured: list[torch.Tensor] = []
    engine.runner.on_logits = lambda keys, logits: captured.extend(r.detach().cpu().clone() for r in logits)
    ids = engine.encode_prompt("The elven archivist keeps the old scrolls in a library under the roots of an oak.")
    assert len(ids) > 16  # more than one chunk
    events: list[object] = []
    engine.submit(TextRequest(key="lone", prompt_ids=ids, adapters=[(version, 1.0)],
                              sampling=SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)), events.append)
    engine.run_until_idle()
    done = events[-1]
    assert getattr(done, "finish_reason", None) == "length", done
    if device == "cuda":
        assert engine.graphs is not None and engine.graphs.chunk_replays >= 2
    check_graphs(engine, device)
    generated = list(done.token_ids)
    ref = reference_logits(peft, ids + generated, [("b_all", 1.0)])
    assert len(captured) == len(generated)
    for j, got in enumerate(captured):
        want = ref[len(ids) - 1 + j]
        assert (got - want).abs().max() / want.abs().max() < 1e-4, f"step {j}"


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu-torch"])
def test_rows_that_change_hands_read_their_own_blocks(device: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Prompts of one length that finish one after another: a decode row then holds another sequence
    whose block table is as long as the last one's (the graphs' tables are sent only where they
    differ); every sampled row's logits still equal PEFT's."""
    folder = write_text_adapter(tmp_path / "b_all", tiny_model_dir, **ADAPTERS["b_all"])
    engine = make_engine(tiny_model_dir, device, dtype="float32", max_seqs=4, max_context=128, lora_slots=2,
                         max_lora_rank=8, block_size=8, prefill_chunk=16, max_step_tokens=64)
    version = load_version(engine, folder)
    peft = reference_models(tiny_model_dir, {"b_all": folder})
    lengths = [2, 7, 13, 18]  # ends between block boundaries, while 3 rows still share the 4-row graph
    captured: dict[int, list[torch.Tensor]] = {}
    engine.runner.on_logits = lambda keys, logits: [captured.setdefault(k, []).append(r.detach().cpu().clone())
                                                    for k, r in zip(keys, logits, strict=True)]
    words = ["Ahoy", "Halt", "Hello", "Greetings"]
    ids = [engine.encode_prompt(f"{w} there, traveller of the roads") for w in words]
    ids = [x[:min(map(len, ids))] for x in ids]  # one length
    done: dict[int, object] = {}
    for i, prompt in enumerate(ids):
        engine.submit(TextRequest(key=i, prompt_ids=prompt, adapters=[(version, 1.0)] if i % 2 else [],
                                  sampling=SamplingParams(temperature=0.0, max_tokens=lengths[i], ignore_eos=True)),
                      lambda e: done.__setitem__(e.key, e) if not type(e).__name__.endswith("ChunkEvent") else None)
    engine.run_until_idle()
    check_graphs(engine, device)
    for i, prompt in enumerate(ids):
        generated = list(done[i].token_ids)
        assert len(generated) == lengths[i]
        ref = reference_logits(peft, prompt + generated, [("b_all", 1.0)] if i % 2 else [])
        for j, got in enumerate(captured[i]):
            want = ref[len(prompt) - 1 + j]
            assert (got - want).abs().max() / want.abs().max() < 1e-4, f"row {i} step {j}"
