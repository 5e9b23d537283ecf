"""Images through a real daemon: the placeholder pipeline, image LoRAs in a watched folder, the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, LiveDaemon, serve_command, start_daemon, stop_daemon

import bridge

pytestmark = pytest.mark.timeout(300)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def image_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, live_daemon: LiveDaemon):
    from diffusers import StableDiffusionPipeline

    from benchmarks.fixtures.image_lora import write_image_lora
    from daemon.engines.image.default_pipeline import ensure_default_image_model

    base = tmp_path_factory.mktemp("imaged")
    cache = base / "cache"
    pipe = StableDiffusionPipeline.from_pretrained(ensure_default_image_model(cache), local_files_only=True)
    images = base / "image_adapters"
    write_image_lora(images / "ink", pipe, rank=4, seed=1)
    write_image_lora(images / "pastel", pipe, rank=4, seed=2)
    write_image_lora(base / "ink_v2", pipe, rank=4, seed=7)
    runtime = base / "daemon.json"
    cmd = serve_command(tiny_model_dir, live_daemon.text_adapter_dir, runtime, token="img")
    cmd[cmd.index("--image-model") + 1] = "default"
    cmd += ["--image-adapters", str(images), "--cache-dir", str(cache)]
    proc = start_daemon(cmd, runtime, base / "log.txt")
    yield json.loads(runtime.read_text())["url"], runtime, images, base
    stop_daemon(proc)


async def test_image_with_progress_adapters_and_seed(image_daemon) -> None:
    url, _, _, _ = image_daemon
    async with bridge.connect(url, "img") as client:
        model = client.welcome.image_model
        assert model is not None and model.placeholder
        stream = client.generate_image("a forest tile", adapters=["ink"], width=64, height=64, steps=3, seed=11)
        steps = [(p.step, p.total) async for p in stream]
        assert steps == [(1, 3), (2, 3), (3, 3)]
        first = stream.result
        assert first is not None and first.images[0].startswith(PNG) and first.seed == 11
        assert first.adapter_versions == {"ink": 1} and (first.width, first.height) == (64, 64)
        again = await client.generate_image("a forest tile", adapters=["ink"], width=64, height=64, steps=3, seed=11)
        base = await client.generate_image("a forest tile", width=64, height=64, steps=3, seed=11)
        zero = await client.generate_image("a forest tile", adapters=["ink:0"], width=64, height=64, steps=3, seed=11)
        mix = await client.generate_image("a forest tile", adapters=["ink:0.5", "pastel:0.5"], width=64, height=64,
                                          steps=3, seed=11)
    assert again.images == first.images
    assert base.images != first.images and zero.images == base.images
    assert mix.images not in (first.images, base.images)


async def test_image_errors_have_stable_codes(image_daemon) -> None:
    url, _, _, _ = image_daemon
    async with bridge.connect(url, "img") as client:
        cases = [(dict(width=60), "invalid_parameter"), (dict(steps=1000), "invalid_parameter"),
                 (dict(width=8192, height=8192), "invalid_parameter"), (dict(adapters=["ghost"]), "unknown_adapter"),
                 (dict(adapters=["alpha"]), "unknown_adapter")]
        for kwargs, code in cases:
            args = dict(width=64, height=64, steps=2) | kwargs
            with pytest.raises(bridge.RequestError) as info:
                await client.generate_image("x", **args)  # type: ignore[arg-type]
            assert info.value.code.value == code, kwargs


async def test_text_keeps_streaming_while_an_image_is_made_and_cancel(image_daemon) -> None:
    url, _, _, _ = image_daemon
    async with bridge.connect(url, "img") as client:
        image = asyncio.ensure_future(client.generate_image("big", width=256, height=256, steps=12, seed=1))
        text = await client.complete("Ahoy", max_tokens=16, temperature=0.0)
        assert text.completion_tokens > 0
        assert not image.done(), "the text request finished while the image was still being made"
        await image
        stream = client.generate_image("cancel me", width=256, height=256, steps=30, seed=2)
        async for p in stream:
            if p.step == 2:
                await stream.cancel()
        assert stream.result is not None and stream.result.finish_reason == "cancelled"


async def test_live_image_adapter_update_is_used_by_the_next_request(image_daemon) -> None:
    url, _, images, base = image_daemon
    async with bridge.connect(url, "img") as client:
        before = await client.generate_image("tile", adapters=["pastel"], width=64, height=64, steps=2, seed=5)
        events = client.events()
        shutil.copy(base / "ink_v2" / "pytorch_lora_weights.safetensors",
                    images / "pastel" / ".pytorch_lora_weights.safetensors.tmp")
        (images / "pastel" / ".pytorch_lora_weights.safetensors.tmp").rename(
            images / "pastel" / "pytorch_lora_weights.safetensors")
        event = await asyncio.wait_for(events.__anext__(), 20)
        assert (event.event, event.adapter.name, event.adapter.kind, event.adapter.version) == \
            ("updated", "pastel", "image", 2)
        after = await client.generate_image("tile", adapters=["pastel"], width=64, height=64, steps=2, seed=5)
        await events.aclose()
    assert after.adapter_versions == {"pastel": 2} and after.images != before.images


def test_cli_image_writes_a_png(image_daemon, tmp_path: Path) -> None:
    _, runtime, _, _ = image_daemon
    out = tmp_path / "tile.png"
    r = subprocess.run([sys.executable, "-m", "daemon", "image", "--runtime-file", str(runtime), "-a", "ink:0.7",
                        "--size", "64x64", "--steps", "2", "--seed", "3", "a tile", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=200)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(PNG) and "placeholder" in r.stderr and "step 2/2" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "daemon", "image", "--runtime-file", str(runtime), "--size", "60x64",
                          "x", "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=200)
    assert bad.returncode == 1 and "invalid_parameter" in bad.stderr
