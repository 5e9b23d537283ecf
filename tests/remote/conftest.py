"""Fixtures of the remote-engine tests: a real vLLM server (session-wide), the tiny model it serves,
adapters for it, and daemons whose text engine is that server.

vLLM's CPU attention needs a head size of 32 or more, so these tests build their own tiny Llama
(hidden 64, 2 heads of 32). The vLLM venv comes from .ci/install-vllm.sh; without it every test
here fails with a message saying so (`vllm_support.vllm_python`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import ADAPTER_SPECS, serve_command, start_daemon, stop_daemon
from tiny import build_tiny_model, write_text_adapter
from vllm_support import VllmServer, start_vllm

API_KEY = "remote-test-key"


@pytest.fixture(scope="session")
def remote_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-hd32", "llama", heads=2, kv_heads=1)


def make_remote_adapters(folder: Path, model_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in ADAPTER_SPECS.items():
        write_text_adapter(folder / name, model_dir, **spec)  # type: ignore[arg-type]
    return folder


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, remote_model_dir: Path) -> Iterator[VllmServer]:
    base = tmp_path_factory.mktemp("vllm")
    server = start_vllm(remote_model_dir, base / "vllm.log", api_key=API_KEY, max_lora_rank=16)
    yield server
    server.stop()


class RemoteDaemon:
    def __init__(self, url: str, token: str, adapters: Path, shared: Path, log: Path, proc: object) -> None:
        self.url, self.token, self.adapters, self.shared, self.log_path, self.process = (
            url, token, adapters, shared, log, proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture()
def remote_daemon(tmp_path: Path, remote_model_dir: Path, vllm_server: VllmServer
                  ) -> Iterator[Callable[..., RemoteDaemon]]:
    """Start daemons on the vLLM server: remote_daemon(extra=[...], api_key=..., url=...)."""
    started: list[object] = []

    def start(*, extra: list[str] | None = None, api_key: str = API_KEY, url: str | None = None,
              adapters: Path | None = None) -> RemoteDaemon:
        n = len(started)
        folder = adapters or make_remote_adapters(tmp_path / f"adapters{n}", remote_model_dir)
        shared = tmp_path / f"shared{n}"
        runtime = tmp_path / f"daemon{n}.json"
        cmd = serve_command(remote_model_dir, folder, runtime, token="t", extra=[
            "--text-engine", "remote", "--remote-url", url or vllm_server.url, "--remote-adapter-dir", str(shared),
            "--reload-debounce-ms", "100", *(extra or [])])
        os.environ["LORALOOM_REMOTE_API_KEY"] = api_key
        try:
            proc = start_daemon(cmd, runtime, tmp_path / f"daemon{n}.log")
        finally:
            os.environ.pop("LORALOOM_REMOTE_API_KEY", None)
        started.append(proc)
        return RemoteDaemon(json.loads(runtime.read_text())["url"], "t", folder, shared, tmp_path / f"daemon{n}.log",
                            proc)

    yield start
    for proc in started:
        stop_daemon(proc)  # type: ignore[arg-type]
