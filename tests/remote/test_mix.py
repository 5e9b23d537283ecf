"""A mix as one LoRA: the merged matrices equal the scaled sum, and the built-in engine serving the merged
PEFT folder gives the tokens it gives when it mixes the adapters itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_remote_adapters
from test_conformance import submit, version

from daemon.adapters.loader import read_adapter_files
from daemon.engines.remote.adapters import RemoteAdapters
from daemon.engines.remote.dialect import Dialect
from daemon.engines.remote.http import RemoteHttp
from daemon.engines.remote.mix import mix_tensors, write_peft_folder
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig


@pytest.fixture(scope="module")
def engine(remote_model_dir: Path) -> TextEngine:
    e = TextEngine.from_folder(remote_model_dir, EngineConfig(device="cpu", dtype="float32", max_context=256,
                                                              max_seqs=4, lora_slots=4, max_lora_rank=64))
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, remote_model_dir: Path) -> Path:
    return make_remote_adapters(tmp_path_factory.mktemp("mix") / "adapters", remote_model_dir)


def test_merged_matrices_are_the_scaled_sum(engine: TextEngine, adapter_dir: Path) -> None:
    """For every module, B_mix A_mix x = sum_i s_i B_i A_i x (modules one adapter lacks included)."""
    parts = [(version(engine, adapter_dir / n).prepared, s) for n, s in (("alpha", 0.5), ("gamma", -1.5), ("beta", 2))]
    config, tensors = mix_tensors(parts, engine.spec)
    assert config["r"] == config["lora_alpha"] == 4 + 2 + 8
    x = torch.randn(3, engine.spec.hidden_size)
    for layer in range(engine.spec.num_layers):
        for target in ("q_proj", "o_proj"):
            group = "self_attn"
            a = tensors[f"base_model.model.model.layers.{layer}.{group}.{target}.lora_A.weight"]
            b = tensors[f"base_model.model.model.layers.{layer}.{group}.{target}.lora_B.weight"]
            want = sum(s * (x @ lora.layers[layer][target][0].t() @ lora.layers[layer][target][1])
                       for lora, s in parts if target in lora.layers[layer])
            torch.testing.assert_close(x @ a.t() @ b.t(), want, rtol=1e-5, atol=1e-6)


def test_the_merged_folder_serves_as_the_mix(engine: TextEngine, adapter_dir: Path, tmp_path: Path) -> None:
    alpha, beta = version(engine, adapter_dir / "alpha"), version(engine, adapter_dir / "beta")
    config, tensors = mix_tensors([(alpha.prepared, 0.5), (beta.prepared, 0.7)], engine.spec)
    folder = write_peft_folder(tmp_path / "mix.x", config, tensors)
    merged = version(engine, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    natively = submit(engine, adapters=[(alpha, 0.5), (beta, 0.7)], max_tokens=12, ignore_eos=True).last
    served = submit(engine, adapters=[(merged, 1.0)], max_tokens=12, ignore_eos=True).last
    assert natively.token_ids == served.token_ids
    assert read_adapter_files(folder, "text").config["target_modules"] == list(beta.targets)


def test_mix_names_hold_the_exact_versions_and_scales(engine: TextEngine, adapter_dir: Path, tmp_path: Path) -> None:
    """The same mix in another order has the same name; another scale or version, another name."""
    adapters = RemoteAdapters(RemoteHttp("http://127.0.0.1:9"), Dialect(), engine.spec, folder=tmp_path,
                              remote_folder=None)
    a1, b1 = version(engine, adapter_dir / "alpha"), version(engine, adapter_dir / "beta")
    a2 = version(engine, adapter_dir / "alpha", number=2)
    name = adapters.name_for([(a1, 0.5), (b1, 1.0)])
    assert name is not None and name[0].startswith("mix.") and name[2]
    assert adapters.name_for([(b1, 1.0), (a1, 0.5)])[0] == name[0]  # type: ignore[index]
    others = {adapters.name_for(m)[0] for m in ([(a1, 0.6), (b1, 1.0)], [(a2, 0.5), (b1, 1.0)])}  # type: ignore[index]
    assert name[0] not in others and len(others) == 2
    assert adapters.name_for([(a1, 1.0)])[0] == f"alpha@1.{a1.hash}"  # type: ignore[index]
    assert adapters.name_for([(a1, 0.0)]) is None
