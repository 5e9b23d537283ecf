"""The LoRA scale a diffusers file keeps in its safetensors header (`lora_alpha`) is applied.

diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=...)` and `save_lora_adapter` write
the LoraConfig into the header; diffusers honours it when loading the file by path, and the engine
(which gets state dicts, never files) must draw what that gives.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from image_testkit import generate, make_version
from PIL import Image
from safetensors import safe_open

from benchmarks.fixtures.image_lora import LORA_WEIGHT_FILE, make_lora_state_dict
from daemon.engines.image.lora_format import LORA_METADATA_KEY, fold_header_alpha

PROMPT = dict(prompt="a knight in a forest", seed=21, width=64, height=64, steps=4)


def header(**config: Any) -> dict[str, str]:
    return {"format": "pt", LORA_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()})}


def test_fold_scales_lora_b_by_alpha_over_rank():
    """B (and its bias) is scaled by alpha / r, per module through alpha_pattern; A is untouched."""
    a, b, bias = torch.ones(4, 8), torch.ones(6, 4), torch.ones(6)
    tensors = {
        "unet.blocks.0.attn1.to_q.lora_A.weight": a,
        "unet.blocks.0.attn1.to_q.lora_B.weight": b,
        "unet.blocks.0.attn1.to_q.lora_B.bias": bias,
        "unet.blocks.0.attn2.to_k.lora_A.weight": a,
        "unet.blocks.0.attn2.to_k.lora_B.weight": b,
    }
    out = fold_header_alpha(tensors, header(r=4, lora_alpha=16, alpha_pattern={"attn2.to_k": 2}))
    assert out["unet.blocks.0.attn1.to_q.lora_B.weight"].eq(4.0).all()
    assert out["unet.blocks.0.attn1.to_q.lora_B.bias"].eq(4.0).all()
    assert out["unet.blocks.0.attn2.to_k.lora_B.weight"].eq(0.5).all()
    assert out["unet.blocks.0.attn1.to_q.lora_A.weight"] is a
    rs = fold_header_alpha(tensors, header(r=4, lora_alpha=16, use_rslora=True))
    assert rs["unet.blocks.0.attn1.to_q.lora_B.weight"].eq(8.0).all()  # 16 / sqrt(4)


def test_fold_leaves_files_without_the_header_alone():
    """Without diffusers' header (or with alpha == r) nothing changes; a broken header is refused."""
    tensors = {"unet.x.lora_A.weight": torch.ones(2, 3), "unet.x.lora_B.weight": torch.ones(3, 2)}
    assert fold_header_alpha(tensors, {}) is tensors
    assert fold_header_alpha(tensors, {"format": "pt"}) is tensors
    same = fold_header_alpha(tensors, header(r=2, lora_alpha=2))
    assert same["unet.x.lora_B.weight"] is tensors["unet.x.lora_B.weight"]
    with pytest.raises(ValueError, match="not valid JSON"):
        fold_header_alpha(tensors, {LORA_METADATA_KEY: "{"})


@pytest.fixture(scope="module")
def alpha_lora(tmp_path_factory: pytest.TempPathFactory, image_pipe: Any) -> Path:
    """A LoRA saved by diffusers with lora_alpha 4x its rank (2x on attn2.to_k) in the header."""
    folder = tmp_path_factory.mktemp("alpha-lora")
    layers = make_lora_state_dict(image_pipe.unet, rank=4, seed=5, std=0.1)
    meta = {
        "r": 4,
        "lora_alpha": 16,
        "alpha_pattern": {"attn2.to_k": 8},
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    }
    type(image_pipe).save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=meta, weight_name=LORA_WEIGHT_FILE
    )
    return folder


def pixels(image: Any) -> np.ndarray:
    if isinstance(image, bytes):
        import io

        image = Image.open(io.BytesIO(image))
    return np.asarray(image).astype(np.int16)


def test_header_alpha_draws_what_diffusers_draws_from_the_file(make_engine, image_model_dir, alpha_lora):
    """An adapter whose header says lora_alpha = 4r draws what diffusers draws when it loads the
    file itself, and not what the same matrices draw at scale 1."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(image_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(alpha_lora, weight_name=LORA_WEIGHT_FILE, adapter_name="ref")
    with torch.inference_mode():
        reference = pipe(
            prompt=[PROMPT["prompt"]],
            width=PROMPT["width"],
            height=PROMPT["height"],
            num_inference_steps=PROMPT["steps"],
            generator=[torch.Generator().manual_seed(PROMPT["seed"])],
        ).images[0]

    with safe_open(alpha_lora / LORA_WEIGHT_FILE, "pt") as f:
        file_header = f.metadata()
    plain = make_version(alpha_lora, name="plain")  # what the matrices draw at scale 1
    with_header = replace(make_version(alpha_lora, name="alpha"), config=dict(file_header))
    engine = make_engine(max_batch=1)  # the reference ran one image too: the same shapes
    ours = generate(engine, "a", adapters=[(with_header, 1.0)], **PROMPT).images[0]
    unscaled = generate(engine, "p", adapters=[(plain, 1.0)], **PROMPT).images[0]

    # Folding the scale into B rounds differently from scaling at run time: at most a level or so.
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 2
    assert np.abs(pixels(unscaled) - pixels(reference)).max() > 20
