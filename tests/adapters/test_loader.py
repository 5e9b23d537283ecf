"""What the adapter loader reads from a folder besides the tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from daemon.adapters.loader import read_adapter_files
from daemon.engines.image.lora_format import LORA_METADATA_KEY, fold_header_alpha


def _image_adapter(folder: Path, metadata: dict[str, str] | None) -> Path:
    folder.mkdir()
    tensors = {"unet.blocks.0.to_q.lora_A.weight": torch.ones(2, 4),
               "unet.blocks.0.to_q.lora_B.weight": torch.ones(4, 2)}
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return folder


def test_image_adapter_config_is_the_files_header(tmp_path: Path) -> None:
    """diffusers keeps lora_alpha in the safetensors header: it reaches the version's config, and
    the image engine's fold scales B by it (alpha 8 / r 2 = 4)."""
    meta = {"format": "pt", LORA_METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": 8})}
    files = read_adapter_files(_image_adapter(tmp_path / "styled", meta), "image")
    assert files.config == meta
    folded = fold_header_alpha(files.tensors, files.config)
    assert torch.equal(folded["unet.blocks.0.to_q.lora_B.weight"], torch.full((4, 2), 4.0))
    assert torch.equal(folded["unet.blocks.0.to_q.lora_A.weight"], torch.ones(2, 4))


def test_image_adapter_without_header_has_empty_config(tmp_path: Path) -> None:
    files = read_adapter_files(_image_adapter(tmp_path / "plain", None), "image")
    assert files.config == {}
    assert fold_header_alpha(files.tensors, files.config) is files.tensors
