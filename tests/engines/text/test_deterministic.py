"""Deterministic mode (`invariant.py`): a seeded or greedy request gets the same logits, to the bit,
whatever shares its batch — alone or among 1..31 others on other adapters and mixes, arriving
first, in the middle, last or mid-stream, after a prefix-cache hit, across a preemption, with its
mix listed in either order and its adapters in other slots."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from pathlib import Path

import pytest
import torch
from tiny import TARGETS, write_text_adapter

from daemon.adapters.loader import read_adapter_files
from daemon.adapters.version import AdapterVersion
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.invariant import InvariantKernels, NotDeterministic, probe
from daemon.engines.text.request import EngineConfig, TextDoneEvent, TextRequest
from daemon.engines.text.sampler import SamplingParams

CONFIG = EngineConfig(device="cpu", max_seqs=32, max_context=256, lora_slots=8, max_lora_rank=8, prefill_chunk=24,
                      max_step_tokens=96, deterministic=True)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("det-adapters")
    return [write_text_adapter(root / f"a{i}", tiny_model_dir, rank=4 + 2 * (i % 3), targets=TARGETS, seed=10 + i)
            for i in range(7)]


def load(engine: TextEngine, folders: list[Path]) -> list[AdapterVersion]:
    versions = []
    for folder in folders:
        files = read_adapter_files(folder, "text")
        prepared = engine.prepare_adapter(files)
        versions.append(files.to_version(folder.name, 1, prepared.payload, prepared.rank, prepared.targets))
    return versions


def fixed_rows(engine: TextEngine) -> TextEngine:
    """The engine with the GPU's layout of deterministic mode (fixed row counts), here on the CPU."""
    engine.kernels = engine.model.kernels = engine.runner.kernels = InvariantKernels(
        engine.device, engine.dtype, fixed_rows=True)
    return engine


# The CPU's layout (at least MIN_ROWS rows), and the GPU's (fixed row counts: invariant.py), run here.
@pytest.fixture(scope="module", params=["cpu-layout", "fixed-rows"])
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> TextEngine:
    engine = TextEngine.from_folder(tiny_model_dir, CONFIG)
    return fixed_rows(engine) if request.param == "fixed-rows" else engine


@pytest.fixture(scope="module")
def versions(engine: TextEngine, adapter_dirs: list[Path]) -> list[AdapterVersion]:
    return load(engine, adapter_dirs)


class Recorder:
    """Runs requests on an engine (optionally submitting some after a few steps) and keeps the
    logits of every step of the watched request."""

    def __init__(self, engine: TextEngine, watch: Hashable = "t") -> None:
        self.engine, self.watch = engine, watch
        self.logits: list[torch.Tensor] = []
        engine.runner.on_logits = self._hook

    def _hook(self, keys: list[Hashable], logits: torch.Tensor) -> None:
        for i, k in enumerate(keys):
            if k == self.watch:
                self.logits.append(logits[i].clone())

    def run(self, first: list[TextRequest], later: list[TextRequest] = (), after_steps: int = 0) -> dict:
        self.logits = []
        done: dict = {}

        def sink(e: object) -> None:
            if isinstance(e, TextDoneEvent):
                done[e.key] = e

        for r in first:
            self.engine.submit(r, sink)
        steps = 0
        while self.engine.has_work() or later:
            if later and steps >= after_steps:
                for r in later:
                    self.engine.submit(r, sink)
                later = []
            self.engine.step()
            steps += 1
        return done


def target(versions: list[AdapterVersion], temperature: float, mix: bool = False) -> TextRequest:
    adapters = [(versions[1], 0.7), (versions[2], 0.5)] if mix else [(versions[0], 1.0)]
    return TextRequest(key="t", prompt_ids=list(range(3, 40)), adapters=adapters, sampling=SamplingParams(
        temperature=temperature, seed=7, max_tokens=16, ignore_eos=True))


def companion(versions: list[AdapterVersion], i: int, **kw: object) -> TextRequest:
    mine = versions[3 + i % 4]
    adapters = [(mine, 1.0)] if i % 3 else [(mine, 0.6), (versions[1 + i % 2], 0.8)]
    if i % 5 == 4:
        adapters = []  # the base model
    return TextRequest(key=i, prompt_ids=[5 + (i * 7 + j) % 50 for j in range(4 + 3 * (i % 6))], adapters=adapters,
                       sampling=SamplingParams(temperature=0.8, seed=i, max_tokens=6 + i % 9, ignore_eos=True), **kw)


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> int | None:
    """The first step whose logits differ (None: all equal, to the bit)."""
    assert len(a) == len(b)
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not torch.equal(x, y)), None)


@pytest.mark.parametrize(("temperature", "mix", "crowds", "arrivals"), [
    (0.9, False, (1, 3, 7, 15, 31), ("first", "middle", "last", "mid-stream")),
    (0.0, False, (5, 31), ("first", "mid-stream")),
    (0.9, True, (2, 31), ("last", "mid-stream"))])
def test_a_row_is_the_same_bits_whatever_shares_its_batch(engine: TextEngine, versions: list[AdapterVersion],
                                                          temperature: float, mix: bool, crowds: tuple[int, ...],
                                                          arrivals: tuple[str, ...]) -> None:
    rec = Recorder(engine)
    alone = rec.run([target(versions, temperature, mix)])["t"]
    reference = rec.logits
    assert len(reference) == 16
    for n in crowds:
        companions = [companion(versions, i) for i in range(n)]
        for arrival in arrivals:
            t = target(versions, temperature, mix)
            if arrival == "first":
                done = rec.run([t, *companions])
            elif arrival == "middle":
                done = rec.run([*companions[:n // 2], t, *companions[n // 2:]])
            elif arrival == "last":
                done = rec.run([*companions, t])
            else:  # the others are decoding when it arrives
                done = rec.run(companions, [t], after_steps=3)
            assert same_bits(reference, rec.logits) is None, (n, arrival, same_bits(reference, rec.logits))
            assert done["t"].token_ids == alone.token_ids
            companions = [companion(versions, i) for i in range(n)]  # fresh requests for the next arrival


# Where there is a GPU, its own layout on it too (bf16, Triton kernels, CUDA graphs).
LAYOUTS = pytest.mark.parametrize("layout", ["cpu-layout", "fixed-rows"] + ["cuda"] * torch.cuda.is_available())


def build(model_dir: Path, cfg: EngineConfig, layout: str) -> TextEngine:
    if layout == "cuda":
        return TextEngine.from_folder(model_dir, dataclasses.replace(cfg, device="cuda", dtype="bfloat16"))
    engine = TextEngine.from_folder(model_dir, cfg)
    return fixed_rows(engine) if layout == "fixed-rows" else engine


@LAYOUTS
def test_mix_order_and_slot_placement_do_not_change_the_bits(tiny_model_dir: Path, adapter_dirs: list[Path],
                                                             layout: str) -> None:
    """The same mix on two engines whose slots were filled in other orders, listed either way round."""
    one = build(tiny_model_dir, CONFIG, layout)
    v1 = load(one, adapter_dirs)
    rec = Recorder(one)
    rec.run([TextRequest(key="t", prompt_ids=list(range(3, 40)), adapters=[(v1[1], 0.7), (v1[2], 0.5)],
                         sampling=SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True))])
    reference = rec.logits

    other = build(tiny_model_dir, CONFIG, layout)
    v2 = load(other, adapter_dirs)
    rec2 = Recorder(other)
    # Fill slots with other adapters first (they stay resident), so the mix lands in other slots.
    rec2.run([TextRequest(key=f"warm{i}", prompt_ids=[4, 5, 6], adapters=[(v2[i], 1.0)],
                          sampling=SamplingParams(max_tokens=1)) for i in (6, 5, 2, 4, 3)])
    rec2.run([TextRequest(key="t", prompt_ids=list(range(3, 40)), adapters=[(v2[2], 0.5), (v2[1], 0.7)],
                          sampling=SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True))])
    placed = [(e.slots.resident()[v[1].key], e.slots.resident()[v[2].key]) for e, v in ((one, v1), (other, v2))]
    assert placed[0] != placed[1], f"the test meant the mix to sit in other slots: {placed}"
    assert same_bits(reference, rec2.logits) is None


@LAYOUTS
def test_prefix_cache_hits_and_preemptions_keep_the_bits(tiny_model_dir: Path, adapter_dirs: list[Path],
                                                         layout: str) -> None:
    """A long prompt again (most of it from the prefix cache), and a background request paused for
    player lines in a small KV pool and resumed: the same logits as its first, undisturbed run."""
    cfg = EngineConfig(device="cpu", max_seqs=16, max_context=512, kv_cache_mb=1, lora_slots=8, max_lora_rank=8,
                       prefill_chunk=24, max_step_tokens=96, deterministic=True)
    engine = build(tiny_model_dir, cfg, layout)
    versions = load(engine, adapter_dirs)
    rec = Recorder(engine)

    def watched() -> TextRequest:
        return TextRequest(key="t", prompt_ids=[3 + j % 60 for j in range(150)], adapters=[(versions[0], 1.0)],
                           priority="background", sampling=SamplingParams(temperature=0.9, seed=7, max_tokens=60,
                                                                          ignore_eos=True))

    first = rec.run([watched()])["t"]
    reference = rec.logits
    again = rec.run([watched()])["t"]
    assert again.cached_tokens >= 128 and same_bits(reference, rec.logits) is None

    before = engine.scheduler.preempted
    more = 2 if layout == "cuda" else 1  # bf16: the same megabyte holds twice the tokens
    players = [TextRequest(key=f"p{i}", prompt_ids=[7 + (i + j) % 40 for j in range(100 * more)], priority="player",
                           adapters=[(versions[1 + i % 5], 1.0)],
                           sampling=SamplingParams(temperature=0.8, seed=i, max_tokens=150 * more, ignore_eos=True))
               for i in range(12)]
    done = rec.run([watched()], players, after_steps=12)
    assert engine.scheduler.preempted > before, "the small pool was meant to pause the background request"
    assert same_bits(reference, rec.logits) is None
    assert done["t"].token_ids == first.token_ids


def test_decode_rows_chunk_metadata_is_built_once_a_forward() -> None:
    """On a GPU decode rows go through the prompt-chunk kernel as one-token chunks: their [rows, 3]
    metadata is built by the first layer of a forward and read by the others (not four launches a
    layer), and built anew by the next forward."""
    kernels = InvariantKernels(torch.device("cpu"), torch.float32, fixed_rows=True)
    seen: list[torch.Tensor] = []

    class Attention:  # stands in for triton_attention (CUDA only): records the metadata it is given
        @staticmethod
        def paged_prefill(q, k, v, tables, meta, out, window, block_size, longest) -> bool:
            seen.append(meta)
            return True

    kernels._attention = Attention  # type: ignore[assignment]

    class KV:
        block_size = 16
        k = v = [torch.zeros(1)] * 3

    q, tables = torch.zeros(3, 4, 8), torch.zeros(3, 2, dtype=torch.long)
    for lens in (torch.tensor([5, 9, 17]), torch.tensor([6, 10, 18])):
        kernels.begin_forward()
        for layer in range(3):
            kernels.paged_decode(q, KV, layer, tables, lens, None)
    assert seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5] and seen[0] is not seen[3]
    assert seen[0].tolist() == [[0, 1, 4], [1, 1, 8], [2, 1, 16]]
    assert seen[3].tolist() == [[0, 1, 5], [1, 1, 9], [2, 1, 17]]


def test_the_mode_is_refused_where_it_cannot_hold() -> None:
    probe(torch.device("cpu"), torch.float32)  # holds on this machine's BLAS
    probe(torch.device("cpu"), torch.float32, fixed_rows=True)
    with pytest.raises(NotDeterministic, match="CPU"):  # rows independent of the count: not asked of a GPU
        probe(torch.device("cuda"), torch.bfloat16)


if torch.cuda.is_available():  # collected only where it can run (like the CUDA cases of test_correctness)

    def test_on_cuda_a_row_is_the_same_bits_alone_and_among_31_at_every_arrival(tiny_model_dir: Path,
                                                                                 adapter_dirs: list[Path]) -> None:
        """The GPU's layout on the GPU (bf16): a seeded and a greedy request, with and without a mix,
        alone vs among 1, 7 and 31 companions arriving before, after and while it decodes."""
        engine = TextEngine.from_folder(tiny_model_dir, dataclasses.replace(CONFIG, device="cuda", dtype="bfloat16"))
        assert isinstance(engine.kernels, InvariantKernels) and engine.kernels.fixed_rows
        assert engine.graphs is not None and engine.graphs.fixed_rows
        versions = load(engine, adapter_dirs)
        rec = Recorder(engine)
        for temperature, mix in ((0.9, False), (0.0, False), (0.9, True)):
            alone = rec.run([target(versions, temperature, mix)])["t"]
            reference = rec.logits
            for n in (1, 7, 31):
                for arrival in ("first", "last", "mid-stream"):
                    companions = [companion(versions, i) for i in range(n)]
                    t = target(versions, temperature, mix)
                    done = (rec.run([t, *companions]) if arrival == "first" else rec.run([*companions, t])
                            if arrival == "last" else rec.run(companions, [t], after_steps=3))
                    assert same_bits(reference, rec.logits) is None, (temperature, mix, n, arrival)
                    assert done["t"].token_ids == alone.token_ids
        assert engine.graphs.replays > 0, "decode steps were meant to replay recorded graphs"
