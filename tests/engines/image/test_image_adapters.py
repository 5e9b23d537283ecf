"""`ImageEngine.validate_adapter`: what an image LoRA must look like for the loaded model."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from benchmarks.fixtures.image_lora import LORA_WEIGHT_FILE


@pytest.fixture()
def engine(make_engine):
    return make_engine(start=False, max_adapter_rank=16)


def test_valid_unet_lora_reports_rank_and_targets(engine, lora_dir):
    """A file written by diffusers' save_lora_weights passes with its rank and target names."""
    tensors = load_file(lora_dir / "ink" / LORA_WEIGHT_FILE)
    assert engine.validate_adapter(tensors) == (4, ("to_k", "to_out.0", "to_q", "to_v"))


def test_text_encoder_targets_are_reported(engine, lora_dir):
    """A LoRA that also patches the text encoder lists those modules too."""
    rank, targets = engine.validate_adapter(load_file(lora_dir / "poster" / LORA_WEIGHT_FILE))
    assert rank == 2
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "to_q"} <= set(targets)


def test_older_diffusers_spelling_is_accepted(engine, lora_dir):
    """The older `lora.down` / `lora.up` key names are read the way diffusers reads them."""
    tensors = load_file(lora_dir / "ink" / LORA_WEIGHT_FILE)
    old = {
        k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): v
        for k, v in tensors.items()
    }
    assert engine.validate_adapter(old) == (4, ("to_k", "to_out.0", "to_q", "to_v"))


def test_not_a_lora_is_refused(engine, random_tensor):
    """Full weights (no LoRA matrices) are refused as not a LoRA."""
    with pytest.raises(ValueError, match="not a LoRA"):
        engine.validate_adapter({"unet.conv_in.weight": random_tensor(32, 4, 3, 3)})


def test_empty_adapter_is_refused(engine):
    """An adapter without tensors is refused."""
    with pytest.raises(ValueError, match="no tensors"):
        engine.validate_adapter({})


def test_wrong_shapes_are_refused(engine, lora_dir, random_tensor):
    """A LoRA made for a wider model names the module and the shapes it needed."""
    tensors = dict(load_file(lora_dir / "ink" / LORA_WEIGHT_FILE))
    key = next(k for k in tensors if k.endswith("attn2.to_k.lora_A.weight"))
    tensors[key] = random_tensor(4, 768)  # SD 1.5's text width, not this model's 32
    with pytest.raises(ValueError, match=r"attn2\.to_k.*needs A \[r, 32\].*different model"):
        engine.validate_adapter(tensors)


def test_unknown_module_is_refused(engine, random_tensor):
    """A module path the model does not have is named in the reason."""
    tensors = {
        "unet.mid_block.attentions.7.proj_in.lora_A.weight": random_tensor(4, 64),
        "unet.mid_block.attentions.7.proj_in.lora_B.weight": random_tensor(64, 4),
    }
    with pytest.raises(ValueError, match=r"attentions\.7\.proj_in' does not exist"):
        engine.validate_adapter(tensors)


def test_unknown_component_is_refused(engine, random_tensor):
    """A LoRA for another family's component (e.g. a transformer) is refused with the parts we have."""
    tensors = {
        "transformer.blocks.0.attn.to_q.lora_A.weight": random_tensor(4, 64),
        "transformer.blocks.0.attn.to_q.lora_B.weight": random_tensor(64, 4),
    }
    with pytest.raises(ValueError, match=r"'transformer'.*it has text_encoder, unet"):
        engine.validate_adapter(tensors)


def test_half_pair_is_refused(engine, lora_dir):
    """A module with lora_A but no lora_B is refused."""
    tensors = dict(load_file(lora_dir / "ink" / LORA_WEIGHT_FILE))
    del tensors[next(k for k in tensors if k.endswith("lora_B.weight"))]
    with pytest.raises(ValueError, match="only one of the two LoRA matrices"):
        engine.validate_adapter(tensors)


def test_rank_limit(engine, lora_dir, image_pipe, tmp_path):
    """A rank above the engine's limit is refused with the limit in the reason."""
    from benchmarks.fixtures.image_lora import write_image_lora

    path = write_image_lora(tmp_path / "big", image_pipe, rank=32)
    with pytest.raises(ValueError, match="rank 32, above the limit of 16"):
        engine.validate_adapter(load_file(path))


def test_nan_is_refused(engine, lora_dir):
    """Non-finite values are refused before they can turn every image black."""
    tensors = dict(load_file(lora_dir / "ink" / LORA_WEIGHT_FILE))
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        engine.validate_adapter(tensors)


def test_text_adapter_folder_gets_a_hint(engine, random_tensor):
    """A PEFT text adapter dropped into the image folder is refused with a hint saying so."""
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": random_tensor(4, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": random_tensor(64, 4),
    }
    with pytest.raises(ValueError, match="looks like a text adapter"):
        engine.validate_adapter(tensors, files={"adapter_config.json": b"{}"})
