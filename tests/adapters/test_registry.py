"""The registry as the host-memory cache level: LRU capacity, pinning, reload of evicted versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import write_text_adapter

from bridge.errors import AdapterError
from daemon.adapters.loader import AdapterFiles
from daemon.adapters.registry import AdapterRegistry
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TextEngine:
    return TextEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_seqs=2, max_context=64,
                                                               lora_slots=2, max_lora_rank=8))


def make_registry(engine: TextEngine, folder: Path, *, capacity: int, pinned: tuple[str, ...] = ()):
    validations: list[str] = []

    def validate(files: AdapterFiles):
        validations.append(files.hash)
        prepared = engine.prepare_adapter(files)
        return prepared.payload, prepared.rank, prepared.targets

    registry = AdapterRegistry(folders={"text": [folder]}, validators={"text": validate}, capacity=capacity,
                               pinned=pinned)
    registry.scan()
    return registry, validations


def test_capacity_evicts_least_recently_used_and_reloads_on_demand(engine, tiny_model_dir, tmp_path) -> None:
    for i, name in enumerate("abc"):
        write_text_adapter(tmp_path / name, tiny_model_dir, seed=i)
    registry, validations = make_registry(engine, tmp_path, capacity=2)
    assert registry.warm_count() == 2 and registry.stats["evictions"] == 1  # scanning a, b, c: a left
    held = registry.get("b", "text")  # a request holds b from here on
    registry.get("c", "text")
    a = registry.get("a", "text")  # cold: read again, same number; b (least recently used) leaves
    assert a.number == 1 and a.prepared is not None and registry.stats["reloads"] == 1
    assert registry.warm_count() == 2
    assert held.prepared is not None, "a version in use keeps its weights whatever the cache does"
    b = registry.get("b", "text")
    assert b.number == 1 and b.key == held.key and b.prepared is not None
    assert len(validations) == 5  # 3 at scan + 2 reloads
    assert all(i.status == "ready" for i in registry.list())


def test_pinned_adapters_stay_in_memory(engine, tiny_model_dir, tmp_path) -> None:
    for i, name in enumerate("pxy"):
        write_text_adapter(tmp_path / name, tiny_model_dir, seed=i)
    registry, _ = make_registry(engine, tmp_path, capacity=1, pinned=("p",))
    for name in "xyxy":
        registry.get(name, "text")
    assert registry._entries[("text", "p")].warm
    assert registry.stats["reloads"] >= 3


def test_cold_version_whose_file_changed_becomes_a_new_version(engine, tiny_model_dir, tmp_path) -> None:
    write_text_adapter(tmp_path / "a", tiny_model_dir, seed=1)
    write_text_adapter(tmp_path / "b", tiny_model_dir, seed=2)
    registry, _ = make_registry(engine, tmp_path, capacity=1)  # a is cold now
    write_text_adapter(tmp_path / "a", tiny_model_dir, seed=3)  # changed while nobody watched
    v = registry.get("a", "text")
    assert v.number == 2 and v.prepared is not None
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"broken")  # b goes cold, then breaks
    with pytest.raises(AdapterError) as info:
        registry.get("b", "text")
    assert info.value.code.value == "adapter_unavailable" and "truncated or corrupt" in info.value.message
