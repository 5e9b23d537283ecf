"""Fixtures for the image engine: the placeholder pipeline and tiny diffusers-format LoRAs.

Everything is built on the spot from fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.fixtures.image_lora import write_image_lora
from daemon.adapters.version import AdapterVersion
from daemon.engines.image import ImageConfig, ImageEngine
from daemon.engines.image.default_pipeline import ensure_default_image_model

# pytest runs with --import-mode=importlib: make the helpers next to this file importable.
sys.path.insert(0, str(Path(__file__).parent))

from image_testkit import make_version


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="session")
def image_model_dir(image_cache: Path) -> Path:
    return ensure_default_image_model(image_cache)


@pytest.fixture(scope="session")
def image_pipe(image_model_dir: Path) -> Any:
    """A read-only pipeline for writing LoRA files (engines load their own)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(image_model_dir, local_files_only=True)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, image_pipe: Any) -> Path:
    """Adapter folders as a designer would have them: one diffusers LoRA file each."""
    root = tmp_path_factory.mktemp("image-adapters")
    write_image_lora(root / "ink", image_pipe, rank=4, seed=1)
    write_image_lora(root / "ink_v2", image_pipe, rank=4, seed=7)
    write_image_lora(root / "ink_r8", image_pipe, rank=8, seed=8)
    write_image_lora(root / "pastel", image_pipe, rank=4, seed=2)
    write_image_lora(root / "poster", image_pipe, rank=2, seed=3, text_encoder=True)
    return root


@pytest.fixture()
def version(lora_dir: Path) -> Callable[..., AdapterVersion]:
    def make(folder: str, name: str | None = None, number: int = 1) -> AdapterVersion:
        return make_version(lora_dir / folder, name=name, number=number)

    return make


@pytest.fixture()
def make_engine(image_cache: Path, image_model_dir: Path) -> Iterator[Callable[..., ImageEngine]]:
    engines: list[ImageEngine] = []

    def make(start: bool = True, **settings: Any) -> ImageEngine:
        engine = ImageEngine.from_folder("default", ImageConfig(device="cpu", **settings), cache_dir=image_cache)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture()
def random_tensor() -> Callable[..., torch.Tensor]:
    gen = torch.Generator().manual_seed(99)

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return make
