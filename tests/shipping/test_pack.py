"""The game pack: `loraloom pack` on a real tiny model and adapters, `loraloom serve --pack` through
a real daemon (the pack's settings, adapters and hashes, hot reload), and the packs it refuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import health
from support import ADAPTER_SPECS, ROOT, make_adapter_dir, start_daemon, stop_daemon
from tiny import write_text_adapter

import bridge
from daemon.adapters.loader import read_adapter_files
from daemon.pack import FORMAT, PackError, open_pack
from daemon.settings import Settings


def run_cli(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("pack")
    adapters = make_adapter_dir(base / "adapters", tiny_model_dir)
    done = run_cli("pack", "--model", tiny_model_dir, "--adapters", adapters, "--out", base / "pack",
                   "--max-context", "256", "--max-seqs", "4", "--max-lora-rank", "16", "--gpu-memory-mb", "64")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "expected memory:" in done.stdout
    return base / "pack"


def fresh_copy(pack_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pack"
    shutil.copytree(pack_dir, copy)
    return copy


def test_the_manifest_describes_what_the_pack_holds(pack_dir: Path, tiny_model_dir: Path) -> None:
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["runtime"] == "0.1.0"
    # The base hash, recomputed here from the source folder's files, independently of daemon/pack.py.
    files = sorted(p for p in tiny_model_dir.iterdir() if p.is_file())
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    expected = hashlib.sha256("".join(f"{n}\0{d}\n" for n, d in sorted(digests.items())).encode()).hexdigest()
    assert manifest["model"]["hash"] == expected
    assert sorted(p.name for p in (pack_dir / "model").iterdir()) == sorted(digests)
    by_name = {a["name"]: a for a in manifest["adapters"]}
    assert sorted(by_name) == sorted(ADAPTER_SPECS)
    for name, spec in ADAPTER_SPECS.items():
        entry = by_name[name]
        assert entry["kind"] == "text" and entry["rank"] == spec["rank"]
        assert sorted(entry["targets"]) == sorted(spec["targets"])  # type: ignore[arg-type]
        assert entry["hash"] == read_adapter_files(pack_dir / "adapters" / name, "text").hash
    assert manifest["settings"] == {"max_context": 256, "max_seqs": 4, "max_lora_rank": 16, "gpu_memory_mb": 64,
                                    "image_model": "none"}
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        mem = manifest["memory"][device]
        assert mem["dtype"] == dtype and 0 < mem["reserved_mb"] <= 64
        assert mem["reserved_mb"] >= mem["weights_mb"] + mem["kv_cache_mb"] + mem["lora_pool_mb"] - 3
    assert manifest["memory"]["cuda"]["weights_mb"] <= manifest["memory"]["cpu"]["weights_mb"]
    sizes = sum(p.stat().st_size for p in (pack_dir / "adapters").rglob("*") if p.is_file())
    assert manifest["memory"]["adapters_mb"] == -(-sizes // 2**20)


def test_an_adapter_for_another_base_is_not_packed(tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path) -> None:
    write_text_adapter(tmp_path / "adapters" / "wide", tiny_qwen_dir, rank=4)
    (tmp_path / "model").mkdir()
    for p in tiny_model_dir.iterdir():  # the same shapes would pass: make the base different in width
        shutil.copy(p, tmp_path / "model" / p.name)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["hidden_size"] = 96
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    done = run_cli("pack", "--model", tmp_path / "model", "--adapters", tmp_path / "adapters", "--out", tmp_path / "p")
    assert done.returncode == 2
    assert "adapter wide does not fit the base model" in done.stderr
    assert not (tmp_path / "p").exists()


def test_a_pack_whose_own_budget_cannot_hold_its_model_is_not_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    done = run_cli("pack", "--model", tiny_model_dir, "--out", tmp_path / "p", "--gpu-memory-mb", "1")
    assert done.returncode == 2
    assert "the pack's own settings do not fit: " in done.stderr and "gpu_memory_mb=1" in done.stderr
    assert not (tmp_path / "p").exists()


async def test_serving_a_pack(pack_dir: Path, tmp_path: Path) -> None:
    """The pack's model, adapters (with the manifest's hashes) and settings; its adapters hot-reload."""
    pack = fresh_copy(pack_dir, tmp_path)
    manifest = json.loads((pack / "manifest.json").read_text())
    runtime = tmp_path / "d.json"
    cmd = [sys.executable, "-m", "daemon", "serve", "--pack", str(pack), "--port", "0", "--runtime-file", str(runtime),
           "--token", "pk", "--max-seqs", "2", "--reload-debounce-ms", "50"]
    proc = start_daemon(cmd, runtime, tmp_path / "log.txt")
    try:
        info = json.loads(runtime.read_text())
        async with bridge.connect(info["url"], "pk") as client:
            w = client.welcome
            assert w.text_model is not None and w.text_model.context_length == 256  # the pack's max_context
            assert w.text_model.name == "tiny-llama"  # the manifest's name, not the pack's folder model/
            assert w.image_model is None  # the pack's image_model none
            assert w.memory is not None and w.memory.budget_mb == 64
            assert {a.name: a.hash for a in w.adapters} == {a["name"]: a["hash"] for a in manifest["adapters"]}
            assert w.limits.max_prompt_tokens == 255
            assert health(info["url"])["memory"]["reserved_mb"] == w.memory.reserved_mb
            result = await client.complete("Hello", adapters=["beta"], max_tokens=8, temperature=0.0)
            assert result.adapter_versions == {"beta": 1}
            # Hot reload inside the pack, as in any adapter folder.
            write_text_adapter(pack / "adapters" / "beta", pack / "model", rank=8, seed=99,
                               targets=ADAPTER_SPECS["beta"]["targets"])  # type: ignore[arg-type]
            for _ in range(100):
                listed = {a.name: a for a in await client.adapters()}
                if listed["beta"].version == 2:
                    break
                await asyncio.sleep(0.1)
            assert listed["beta"].version == 2 and listed["beta"].hash != manifest["adapters"][1]["hash"]
            result = await client.complete("Hello", adapters=["beta"], max_tokens=8, temperature=0.0)
            assert result.adapter_versions == {"beta": 2}
    finally:
        stop_daemon(proc)
    assert "game pack" in (tmp_path / "log.txt").read_text()


def refused(pack: Path, tmp_path: Path, *extra: str) -> str:
    done = run_cli("serve", "--pack", pack, "--port", "0", "--runtime-file", tmp_path / "r.json", *extra)
    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "r.json").exists()
    return done.stderr


def test_a_pack_for_another_base_is_refused(pack_dir: Path, tmp_path: Path, tiny_qwen_dir: Path) -> None:
    err = refused(pack_dir, tmp_path, "--text-model", str(tiny_qwen_dir))
    assert "this pack was built for another base: tiny-llama" in err
    assert "leave --text-model out, or rebuild the pack" in err


def test_a_tampered_adapter_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    pack = fresh_copy(pack_dir, tmp_path)
    write_text_adapter(pack / "adapters" / "gamma", pack / "model", rank=2, seed=5, targets=("o_proj", "down_proj"))
    err = refused(pack, tmp_path)
    assert "text adapter gamma's files differ from the pack's manifest" in err and "rebuild it" in err


def test_a_newer_format_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    pack = fresh_copy(pack_dir, tmp_path)
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest.update(format=FORMAT + 1, runtime="9.0.0")
    (pack / "manifest.json").write_text(json.dumps(manifest))
    err = refused(pack, tmp_path)
    assert f"has format {FORMAT + 1} (made by loraloom 9.0.0)" in err and "ship a newer runtime" in err


def test_a_changed_model_or_a_stray_adapter_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    pack = fresh_copy(pack_dir, tmp_path)
    weights = pack / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackError, match=r"not the base it was built for \(tiny-llama\): model.safetensors differ"):
        open_pack(Settings(pack=pack, cache_dir=tmp_path / "cache"))
    pack = fresh_copy(pack_dir, tmp_path / "again")
    shutil.copytree(pack / "adapters" / "alpha", pack / "adapters" / "stray")
    with pytest.raises(PackError, match=r"text adapter stray .* is not in the pack's manifest"):
        open_pack(Settings(pack=pack, cache_dir=tmp_path / "cache"))
    shutil.rmtree(pack / "adapters" / "stray")
    shutil.rmtree(pack / "adapters" / "alpha")
    with pytest.raises(PackError, match="text adapters alpha are missing"):
        open_pack(Settings(pack=pack, cache_dir=tmp_path / "cache"))


def test_options_win_over_the_pack_and_hashes_are_remembered(pack_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    served = open_pack(Settings(pack=pack_dir, cache_dir=cache, max_seqs=2))
    assert (served.max_seqs, served.max_context, served.gpu_memory_mb) == (2, 256, 64)
    assert served.text_model == str(pack_dir.resolve() / "model")
    assert served.text_adapters == [pack_dir.resolve() / "adapters"]
    assert "max_context" in served.model_fields_set  # a packed setting counts as given (the budget honours it)
    remembered = json.loads((cache / "pack-hashes.json").read_text())
    assert str((pack_dir / "model").resolve()) in remembered


@pytest.mark.slow
def test_the_embedded_model_packs_as_converted_safetensors(tmp_path: Path, smollm2_dir: Path) -> None:
    """`--model default` packs the converted SmolLM2 (bf16 safetensors, tokenizer), never its GGUF."""
    done = run_cli("pack", "--model", "default", "--adapters", ROOT / "samples" / "adapters", "--out", tmp_path / "p")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "SmolLM2-135M-Instruct" and manifest["model"]["family"] == "llama"
    files = set(manifest["model"]["files"])
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= files
    assert not any(f.endswith((".gguf", ".bin")) for f in files)
    assert {a["name"] for a in manifest["adapters"]} == {p.name for p in (ROOT / "samples" / "adapters").iterdir()
                                                          if p.is_dir()}
    assert manifest["memory"]["cuda"]["weights_mb"] == 257  # 134.5M parameters in bfloat16
    served = open_pack(Settings(pack=tmp_path / "p", cache_dir=tmp_path / "cache"))
    assert Path(served.text_model).name == "model"


def test_a_config_file_is_read_without_leaking_into_later_settings(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config` once (as `loraloom pack --config` does in-process) must not become every later
    Settings' file: a pack built afterwards would have packed that file's adapters."""
    from daemon.settings import load_settings

    monkeypatch.delenv("LORALOOM_CONFIG", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('text_adapters = ["/elsewhere/a"]\nmax_seqs = 3\n')
    assert load_settings(config, port=0).text_adapters == [Path("/elsewhere/a")]
    assert "LORALOOM_CONFIG" not in os.environ
    assert Settings().text_adapters == [] and Settings().max_seqs == 16
