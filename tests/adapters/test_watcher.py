"""The watcher never hands the registry a half-written adapter: a writer that pauses longer than
the debounce with the file open, on real files under real watchdog."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from daemon.adapters import watcher as watcher_module
from daemon.adapters.loader import AdapterFiles
from daemon.adapters.registry import AdapterRegistry
from daemon.adapters.watcher import AdapterWatcher, open_for_writing

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(open_for_writing(Path(__file__)) is None, reason="needs Linux file leases")]

CONFIG = json.dumps({"peft_type": "LORA", "r": 4}).encode()


def weights(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, 64, generator=g)})


def content_hash(weight_bytes: bytes) -> str:
    return hashlib.sha256(CONFIG + weight_bytes).hexdigest()[:16]


def watch(folder: Path) -> tuple[AdapterRegistry, AdapterWatcher]:
    def accept(files: AdapterFiles) -> tuple[None, int, tuple[str, ...]]:
        return None, 4, ("q_proj",)

    registry = AdapterRegistry(folders={"text": [folder]}, validators={"text": accept})
    registry.scan()
    w = AdapterWatcher(registry, debounce_s=0.1)
    w.start()
    return registry, w


def write_paused(path: Path, data: bytes, pause: float) -> None:
    """Rewrite in place without truncating (the old bytes show through until overwritten), pausing halfway."""
    with path.open("r+b") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(pause)
        f.write(data[len(data) // 2:])


def live_hash(registry: AdapterRegistry) -> str | None:
    (info,) = registry.list()
    return info.hash


def test_lease_probe_tells_an_open_writer() -> None:
    assert open_for_writing(Path(__file__)) is False


@pytest.mark.parametrize("check_writers", [True, False], ids=["writers-checked", "quiet-time-only"])
def test_a_writer_pausing_past_the_debounce_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         check_writers: bool) -> None:
    """A same-size rewrite paused 800 ms (8 debounces) in the middle: with the writer check, only the
    complete new file goes live; with quiet time alone (other OSes), the torn file would."""
    if not check_writers:
        monkeypatch.setattr(watcher_module, "open_for_writing", lambda path: None)
    folder = tmp_path / "adapters"
    (folder / "npc").mkdir(parents=True)
    old, new = weights(1), weights(2)
    assert len(old) == len(new)
    (folder / "npc" / "adapter_config.json").write_bytes(CONFIG)
    (folder / "npc" / "adapter_model.safetensors").write_bytes(old)
    registry, w = watch(folder)
    try:
        assert live_hash(registry) == content_hash(old)
        seen = set()
        write_paused(folder / "npc" / "adapter_model.safetensors", new, pause=0.8)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and live_hash(registry) != content_hash(new):
            seen.add(live_hash(registry))
            time.sleep(0.01)
        seen.add(live_hash(registry))
        torn = seen - {content_hash(old), content_hash(new)}
        if check_writers:
            assert torn == set() and live_hash(registry) == content_hash(new)
        else:
            assert torn, "quiet time alone let the half-written file through (the case the check exists for)"
    finally:
        w.stop()
