"""Helpers shared by the test suites: real daemon processes and adapter folders.

Import from here (`from support import ...`), never from conftest: several conftest.py files exist
and Python would import whichever it met first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny import write_text_adapter

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_SPECS = {
    "alpha": dict(rank=4, targets=("q_proj", "v_proj"), seed=11),
    "beta": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 seed=12),
    "gamma": dict(rank=2, targets=("o_proj", "down_proj"), seed=13),
}


def make_adapter_dir(path: Path, model_dir: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, spec in ADAPTER_SPECS.items():
        write_text_adapter(path / name, model_dir, **spec)  # type: ignore[arg-type]
    return path


@dataclass
class LiveDaemon:
    """A real daemon process and how to reach it."""

    url: str
    token: str
    runtime_file: Path
    text_adapter_dir: Path
    image_adapter_dir: Path | None
    model_dir: Path
    process: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    extra: list[str] = field(default_factory=list)

    def serve_command(self, runtime_file: Path, port: int = 0, extra: list[str] | None = None) -> list[str]:
        """argv that starts another daemon on the same model and adapters."""
        return serve_command(self.model_dir, self.text_adapter_dir, runtime_file, token=self.token, port=port,
                             extra=extra)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def serve_command(model_dir: Path, adapter_dir: Path, runtime_file: Path, *, token: str, port: int = 0,
                  extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "daemon", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--text-model", str(model_dir), "--text-adapters", str(adapter_dir), "--image-model", "none",
            "--runtime-file", str(runtime_file), "--token", token, "--max-context", "256", "--max-seqs", "8",
            "--lora-slots", "4", "--max-lora-rank", "16", *(extra or [])]


def start_daemon(cmd: list[str], runtime_file: Path, log_path: Path, timeout: float = 90.0) -> subprocess.Popen[str]:
    """Start a daemon process and wait until its runtime file appears and it says it listens."""
    runtime_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log_path.read_text()}")
        if runtime_file.exists() and "listening on" in log_path.read_text(errors="replace"):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"daemon did not start in {timeout}s:\n{log_path.read_text()}")


def stop_daemon(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def copy_adapter(src: Path, dst: Path) -> None:
    tmp = dst.with_name("." + dst.name + ".tmp")
    shutil.copytree(src, tmp)
    tmp.rename(dst)
