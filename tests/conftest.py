"""Shared fixtures: tiny models built on the spot, and real daemons on port 0.

`live_daemon` (session-wide) is a real `python -m daemon serve` process on a tiny random Llama with
three text adapters (`alpha`, `beta`, `gamma`) in a watched folder. The Unity and Godot suites
drive it too, so keep its interface stable: url, token, runtime_file, text_adapter_dir,
image_adapter_dir, model_dir, serve_command(). Helpers live in `support.py`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: `benchmarks.fixtures`
sys.path.insert(0, str(Path(__file__).parent))

from support import LiveDaemon, make_adapter_dir, serve_command, start_daemon, stop_daemon
from tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", seed=5)


@pytest.fixture(scope="session")
def tiny_qwen_swa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with use_sliding_window: a 5-token window on its second layer only."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2-swa", "qwen2-swa", seed=9)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral with a 6-token sliding window: the correctness prompts are longer than that."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-mistral", "mistral", seed=7)


@pytest.fixture(scope="session")
def live_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveDaemon]:
    base = tmp_path_factory.mktemp("live")
    adapters = make_adapter_dir(base / "adapters", tiny_model_dir)
    runtime = base / "daemon.json"
    token = "test-token-" + os.urandom(6).hex()
    cmd = serve_command(tiny_model_dir, adapters, runtime, token=token)
    proc = start_daemon(cmd, runtime, base / "daemon.log")
    info = json.loads(runtime.read_text())
    daemon = LiveDaemon(url=info["url"], token=token, runtime_file=runtime, text_adapter_dir=adapters,
                        image_adapter_dir=None, model_dir=tiny_model_dir, process=proc, log_path=base / "daemon.log")
    yield daemon
    stop_daemon(proc)


@pytest.fixture()
def adapter_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A fresh adapter folder with the three test adapters, for tests that change files."""
    return make_adapter_dir(tmp_path / "adapters", tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2, converted once into the user cache (shared with `loraloom demo`)."""
    from daemon.engines.text.default_model import ensure_default_text_model

    return ensure_default_text_model()
