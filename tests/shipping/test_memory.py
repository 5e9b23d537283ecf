"""The memory budget (daemon/memory.py): the plan against the tensors a real engine allocates, the
fitting of unset sizes into `gpu_memory_mb`, a refusal with its numbers, and the report in
`welcome` and `/healthz` of a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import health
from support import ROOT, serve_command, start_daemon, stop_daemon
from tiny import build_tiny_model

import bridge
from daemon.engines.text.config import ModelSpec
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig
from daemon.memory import MIB, OverBudget, fit_text_memory, plan_for_settings, text_memory
from daemon.settings import Settings


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of ~16 MiB of float32 weights: large enough for MiB budgets to bite."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "wide", "llama", hidden=256, layers=4, heads=4,
                            kv_heads=2, intermediate=1024, max_positions=1024)


@pytest.mark.parametrize("arch", ["tiny_model_dir", "tiny_qwen_dir"])
@pytest.mark.parametrize(("kv_cache_mb", "slots", "rank", "context"), [(None, 3, 8, 256), (1, 5, 16, 100)])
def test_the_plan_is_what_the_engine_allocates(arch: str, kv_cache_mb: int | None, slots: int, rank: int,
                                               context: int, request: pytest.FixtureRequest) -> None:
    """Weights, KV pool, LoRA pool and KV positions, byte for byte (Llama untied; Qwen2 tied, with biases)."""
    folder: Path = request.getfixturevalue(arch)
    cfg = EngineConfig(device="cpu", dtype="float32", max_seqs=4, max_context=context, kv_cache_mb=kv_cache_mb,
                       lora_slots=slots, max_lora_rank=rank)
    engine = TextEngine.from_folder(folder, cfg)
    plan = text_memory(ModelSpec.from_folder(folder), 4, max_seqs=4, max_context=context, kv_cache_mb=kv_cache_mb,
                       lora_slots=slots, max_lora_rank=rank, step_tokens=cfg.max_step_tokens)
    assert plan.weights == engine.model.nbytes()
    assert plan.kv_cache == engine.kv.nbytes()
    assert plan.lora_pool == engine.storage.pool_nbytes()
    assert plan.kv_cache_tokens == engine.stats()["kv_blocks"] * engine.stats()["kv_block_size"]
    assert plan.workspace > 0


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_quantized_checkpoint_is_planned_at_its_int4_size(method: str, tmp_path: Path) -> None:
    """An AWQ or GPTQ folder's weights as the engine holds them (int4 codes, scales, zero points)."""
    from tiny import write_quantized_model

    dense = build_tiny_model(tmp_path / "dense", "llama", hidden=128, intermediate=256, heads=4, kv_heads=2)
    folder, _ = write_quantized_model(dense, tmp_path / "q", tmp_path / "ref", method=method)
    settings = Settings(text_model=str(folder), image_model="none", device="cpu", dtype="float32", max_context=256,
                        max_seqs=2, lora_slots=4, max_lora_rank=8)
    plan = plan_for_settings(settings, folder)
    engine = TextEngine.from_folder(folder, EngineConfig(device="cpu", dtype="float32", max_seqs=2, max_context=256,
                                                         lora_slots=4, max_lora_rank=8))
    assert plan.text is not None and plan.text.weights == engine.model.nbytes()
    assert plan.text.weights < plan_for_settings(settings, dense).text.weights  # type: ignore[union-attr]
    assert plan.text.lora_pool == engine.storage.pool_nbytes() and plan.text.kv_cache == engine.kv.nbytes()


def test_unset_sizes_are_fitted_into_the_budget(wide_model_dir: Path) -> None:
    """lora_slots shrinks first until one sequence fits, then the KV cache takes what is left."""
    spec = ModelSpec.from_folder(wide_model_dir)
    common = dict(max_seqs=8, max_context=1024, kv_cache_mb=None, lora_slots=16, max_lora_rank=64, step_tokens=512)
    free = fit_text_memory(spec, 4, budget=None, **common)  # type: ignore[arg-type]
    budget = 80 * MIB
    assert free.total > budget  # the defaults would not fit
    fitted = fit_text_memory(spec, 4, budget=budget, **common)  # type: ignore[arg-type]
    assert fitted.total <= budget
    assert 1 <= fitted.lora_slots < 16
    # Never fewer slots than one request's mix holds at once (max_adapters_per_request): refused instead.
    assert fitted.lora_slots < 8
    with pytest.raises(OverBudget, match=r"LoRA pool \d+ MiB \(8 slot.*/ max_adapters_per_request"):
        fit_text_memory(spec, 4, budget=budget, min_slots=8, **common)  # type: ignore[arg-type]
    one_sequence = 1024 // 16 * fitted.kv_block_bytes
    assert fitted.kv_cache >= one_sequence
    # A roomy budget leaves the slots alone and caps the KV cache at every sequence at full length.
    roomy = fit_text_memory(spec, 4, budget=4096 * MIB, **common)  # type: ignore[arg-type]
    assert roomy.lora_slots == 16
    assert roomy.kv_cache_tokens >= 8 * 1024
    assert roomy.kv_cache_tokens < 8 * 1024 + 2 * 1024  # not the whole budget: only prefix cache beyond that


def test_explicit_sizes_are_honoured_or_refused(wide_model_dir: Path) -> None:
    spec = ModelSpec.from_folder(wide_model_dir)
    common = dict(max_seqs=8, max_context=1024, max_lora_rank=64, step_tokens=512)
    kept = fit_text_memory(spec, 4, budget=200 * MIB, kv_cache_mb=20, lora_slots=16,  # type: ignore[arg-type]
                           explicit=frozenset({"lora_slots"}), **common)
    assert (kept.kv_cache_mb, kept.lora_slots) == (20, 16)
    with pytest.raises(OverBudget, match=r"gpu_memory_mb=40: it needs \d+ MiB .*LoRA pool \d+ MiB \(16 slot"):
        fit_text_memory(spec, 4, budget=40 * MIB, kv_cache_mb=None, lora_slots=16,  # type: ignore[arg-type]
                        explicit=frozenset({"lora_slots"}), **common)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_a_model_quantized_at_load_is_planned_at_that_size(kind: str, tmp_path: Path) -> None:
    """`quantize` (int8 | int4 | fp8 at load): the plan holds the weights the engine then holds."""
    dense = build_tiny_model(tmp_path / "dense", "llama", hidden=256, intermediate=512, heads=4, kv_heads=2)
    sizes = dict(max_context=256, max_seqs=2, lora_slots=4, max_lora_rank=8)
    settings = Settings(text_model=str(dense), image_model="none", device="cpu", dtype="float32", quantize=kind,
                        **sizes)  # type: ignore[arg-type]
    plan = plan_for_settings(settings, dense)
    engine = TextEngine.from_folder(dense, EngineConfig(device="cpu", dtype="float32", quantize=kind, **sizes))
    assert plan.text is not None and plan.text.weights == engine.model.nbytes()
    dense_plan = plan_for_settings(Settings(text_model=str(dense), image_model="none", device="cpu",
                                            dtype="float32", **sizes), dense)  # type: ignore[arg-type]
    assert dense_plan.text is not None and plan.text.weights < dense_plan.text.weights


def test_settings_plan_reads_the_model_and_its_dtype(wide_model_dir: Path) -> None:
    s = Settings(text_model=str(wide_model_dir), image_model="none", device="cpu", dtype="bfloat16",
                 gpu_memory_mb=64, max_context=512)
    plan = plan_for_settings(s, wide_model_dir)
    assert plan.text is not None
    assert plan.text.weights == text_memory(ModelSpec.from_folder(wide_model_dir), 2, max_seqs=16, max_context=512,
                                            kv_cache_mb=None, lora_slots=1, max_lora_rank=64,
                                            step_tokens=512).weights
    assert plan.reserved <= 64 * MIB
    report = plan.describe()
    assert report["budget_mb"] == 64 and report["reserved_mb"] <= 64 and report["measured_mb"] > 0


def test_the_image_model_is_planned_from_its_weights(tmp_path: Path) -> None:
    """The placeholder pipeline's planned bytes are its loaded modules' parameters and buffers."""
    import torch
    from diffusers import StableDiffusionPipeline

    from daemon.engines.image.default_pipeline import ensure_default_image_model

    folder = ensure_default_image_model(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    loaded = sum(t.numel() * 4 for part in (pipe.unet, pipe.vae, pipe.text_encoder)
                 for t in (*part.parameters(), *part.buffers()) if t.is_floating_point())
    plan = plan_for_settings(Settings(text_model="none", image_model="default", device="cpu", dtype="float32",
                                      cache_dir=tmp_path), None)
    assert plan.text is None and plan.image > 0
    assert abs(plan.image - loaded) <= 0.01 * loaded  # non-persistent buffers (position ids) aside
    with pytest.raises(OverBudget, match="the image model does not fit in gpu_memory_mb=1"):
        plan_for_settings(Settings(text_model="none", image_model="default", device="cpu", gpu_memory_mb=1,
                                   cache_dir=tmp_path), None)


def test_a_budget_too_small_is_refused_at_start(tmp_path: Path, wide_model_dir: Path) -> None:
    """The daemon exits before loading anything, saying what it needs and what to change."""
    cmd = [sys.executable, "-m", "daemon", "serve", "--port", "0", "--text-model", str(wide_model_dir),
           "--image-model", "none", "--runtime-file", str(tmp_path / "d.json"), "--gpu-memory-mb", "8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 2, done.stderr
    assert "the model itself does not fit in gpu_memory_mb=8" in done.stderr
    assert "weights 16 MiB" in done.stderr and "raise gpu_memory_mb" in done.stderr
    assert not (tmp_path / "d.json").exists()


async def test_welcome_and_healthz_report_the_budget(tmp_path: Path, wide_model_dir: Path) -> None:
    """A real daemon with a budget: both reports agree, stay within it, and `used` grows with KV in use."""
    runtime = tmp_path / "d.json"
    cmd = serve_command(wide_model_dir, tmp_path / "none", runtime, token="mem",
                        extra=["--gpu-memory-mb", "48", "--max-context", "512"])
    cmd = [c for c in cmd if c not in ("--lora-slots", "4")]  # lora_slots left to the budget
    (tmp_path / "none").mkdir()
    proc = start_daemon(cmd, runtime, tmp_path / "log.txt")
    try:
        info = json.loads(runtime.read_text())
        async with bridge.connect(info["url"], "mem") as client:
            mem = client.welcome.memory
            assert mem is not None and mem.device == "cpu" and mem.budget_mb == 48
            assert mem.reserved_mb <= 48
            assert mem.reserved_mb >= mem.weights_mb + mem.kv_cache_mb + mem.lora_pool_mb
            assert mem.weights_mb == 16 and mem.image_mb == 0
            assert mem.measured_mb > mem.weights_mb  # the process's RSS, torch included
            limits = client.welcome.limits
            assert limits.lora_slots is not None and limits.max_adapters_per_request <= limits.lora_slots < 16
            assert limits.kv_cache_tokens is not None and limits.kv_cache_tokens >= 512
            before = health(info["url"])["memory"]
            assert before["reserved_mb"] == mem.reserved_mb and before["lora_slots"] == limits.lora_slots
            result = await client.complete("hello there " * 20, max_tokens=40, temperature=0.0)
            assert result.prompt_tokens > 32  # two full blocks at least
        after = health(info["url"])["memory"]
        assert after["used_mb"] >= before["used_mb"]  # the prompt's blocks stay as prefix cache
        assert after["used_mb"] <= after["reserved_mb"]
    finally:
        stop_daemon(proc)
