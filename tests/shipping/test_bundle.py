"""The self-contained runtime (`loraloom bundle`): built with PyInstaller, then run with an empty
environment (`env -i`) from a folder outside the repository, serving a game pack to the Python client.

The build takes ~5 minutes on 2 cores, so CI builds it once before the tests (.ci/bundle.sh) and
passes it in LORALOOM_TEST_BUNDLE; without that variable the first test here builds its own copy.
Never skipped: a bundle that cannot be built or started fails these tests.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import health
from support import ROOT, LiveDaemon, make_adapter_dir

import bridge

pytestmark = pytest.mark.timeout(1800)  # the build, when this suite makes its own


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("LORALOOM_TEST_BUNDLE")
    if given:
        folder = Path(given)
        assert (folder / "loraloom").is_file(), f"LORALOOM_TEST_BUNDLE={given} holds no loraloom executable"
        return folder
    out = tmp_path_factory.mktemp("bundle") / "runtime"
    done = subprocess.run([sys.executable, "-m", "daemon", "bundle", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("bundle-pack")
    adapters = make_adapter_dir(base / "adapters", tiny_model_dir)
    done = subprocess.run([sys.executable, "-m", "daemon", "pack", "--model", str(tiny_model_dir), "--adapters",
                           str(adapters), "--out", str(base / "pack"), "--max-context", "256", "--max-seqs", "8",
                           "--max-lora-rank", "16", "--lora-slots", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return base / "pack"


def empty_env_run(bundle: Path, args: list[str], cwd: Path, log: Path) -> subprocess.Popen[str]:
    """The runtime with no environment at all, started in `cwd` (not the repository)."""
    return subprocess.Popen(["env", "-i", str(bundle / "loraloom"), *args], cwd=cwd, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def test_what_a_build_leaves_out_depends_on_torch_and_the_image_option(tmp_path: Path) -> None:
    """A CPU build leaves out triton and diffusers; a CUDA build with --with-image keeps both."""
    from daemon.bundle import pyinstaller_args

    def excluded(args: list[str]) -> set[str]:
        return {args[i + 1] for i, a in enumerate(args) if a == "--exclude-module"}

    cpu = pyinstaller_args(tmp_path, tmp_path / "e.py", with_image=False, cuda=False)
    cuda = pyinstaller_args(tmp_path, tmp_path / "e.py", with_image=True, cuda=True)
    assert {"triton", "diffusers", "peft", "gguf"} <= excluded(cpu)
    assert not {"triton", "diffusers"} & excluded(cuda) and {"peft", "gguf"} <= excluded(cuda)
    assert "--onedir" in cpu and ("--copy-metadata", "transformers") in itertools.pairwise(cpu)


def test_the_build_records_what_went_in(bundle_dir: Path, tmp_path: Path) -> None:
    info = json.loads((bundle_dir / "BUILD.json").read_text())
    assert info["runtime"] == "0.1.0" and info["executable"] == "loraloom" and info["torch"].startswith("2.")
    assert (bundle_dir / "_internal").is_dir()
    done = subprocess.run(["env", "-i", str(bundle_dir / "loraloom"), "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "loraloom 0.1.0", done.stdout + done.stderr
    done = subprocess.run(["env", "-i", str(bundle_dir / "loraloom"), "serve", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--gpu-memory-mb" in done.stdout and "--pack" in done.stdout


@pytest.fixture(scope="module")
def bundled_daemon(bundle_dir: Path, tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[subprocess.Popen[str], dict[str, object], Path]]:
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no repository, no virtualenv, no PATH, no HOME
    runtime = elsewhere / "daemon.json"
    log = elsewhere / "log.txt"
    started = time.monotonic()
    proc = empty_env_run(bundle_dir, ["serve", "--pack", str(tiny_pack), "--port", "0", "--runtime-file",
                                      str(runtime), "--token", "bundled", "--cache-dir", str(elsewhere / "cache")],
                         elsewhere, log)
    while not (runtime.exists() and "listening on" in log.read_text(errors="replace")):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() - started < 300, log.read_text()
        time.sleep(0.1)
    yield proc, json.loads(runtime.read_text()), log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_it_loads_nothing_from_python_installs(bundled_daemon: tuple[subprocess.Popen[str], dict[str, object], Path],
                                               bundle_dir: Path) -> None:
    """Every Python module and library it maps comes from the bundle (or the system's C libraries)."""
    _, info, _ = bundled_daemon
    pid = int(info["pid"])  # type: ignore[call-overload]
    # Only what PyInstaller's bootloader set before it started the interpreter: its own variables, and
    # the bundle's folder as the library path.
    env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v)
    assert {k for k in env if not k.startswith("_PYI_")} <= {"LD_LIBRARY_PATH"}, env
    assert env.get("LD_LIBRARY_PATH", str(bundle_dir / "_internal")) == str(bundle_dir.resolve() / "_internal")
    mapped = {line.split(None, 5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/")}
    assert any(m.startswith(str(bundle_dir.resolve())) for m in mapped)
    foreign = sorted(m for m in mapped if "python" in m.lower() or "site-packages" in m or m.startswith(sys.prefix))
    foreign = [m for m in foreign if not m.startswith(str(bundle_dir.resolve()))]
    assert not foreign, foreign


async def test_the_python_client_talks_to_it(bundled_daemon: tuple[subprocess.Popen[str], dict[str, object], Path],
                                            tiny_pack: Path, live_daemon: LiveDaemon) -> None:
    """The bundled daemon answers as the developer's install does (same model, same adapter, greedy)."""
    _, info, _ = bundled_daemon
    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    async with bridge.connect(str(info["url"]), "bundled") as client:
        assert {a.name: a.hash for a in client.welcome.adapters} == {a["name"]: a["hash"] for a in manifest["adapters"]}
        got = await client.complete("The smith said", adapters=["beta"], max_tokens=12, temperature=0.0, seed=3)
    async with bridge.connect(live_daemon.url, live_daemon.token) as dev:
        want = await dev.complete("The smith said", adapters=["beta"], max_tokens=12, temperature=0.0, seed=3)
    assert got.completion_tokens == want.completion_tokens > 0
    assert got.text == want.text
    report = health(str(info["url"]))
    assert report["memory"]["device"] == "cpu" and report["memory"]["measured_mb"] > 0


def test_sigterm_stops_it_and_removes_its_runtime_file(
        bundled_daemon: tuple[subprocess.Popen[str], dict[str, object], Path]) -> None:
    proc, _, log = bundled_daemon
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    assert "stopped" in log.read_text()
    runtime = Path(log.parent / "daemon.json")
    assert not runtime.exists()
