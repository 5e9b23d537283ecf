"""The placeholder image model: built once, marked as a placeholder everywhere."""

from __future__ import annotations

import json

from daemon.engines.image import default_pipeline
from daemon.engines.image.default_pipeline import (
    PLACEHOLDER_MARKER,
    ensure_default_image_model,
    is_placeholder_model,
)


def test_folder_is_a_marked_diffusers_pipeline(image_model_dir):
    """The folder has every SD component plus the placeholder marker and README."""
    names = {p.name for p in image_model_dir.iterdir()}
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= names
    index = json.loads((image_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert "draws noise" in index[PLACEHOLDER_MARKER]
    assert "PLACEHOLDER" in (image_model_dir / "README.md").read_text()
    assert is_placeholder_model(image_model_dir)


def test_second_call_does_not_rebuild(image_cache, image_model_dir, monkeypatch):
    """A second call returns the existing folder without building anything."""
    stamp = (image_model_dir / "unet").stat().st_mtime_ns

    def refuse(**_: object) -> None:
        raise AssertionError("rebuilt the placeholder")

    monkeypatch.setattr(default_pipeline, "build_tiny_pipeline", refuse)
    assert ensure_default_image_model(image_cache) == image_model_dir
    assert (image_model_dir / "unet").stat().st_mtime_ns == stamp


def test_build_is_reproducible(tmp_path, image_model_dir):
    """The same recipe gives the same weights and token ids, so every machine's placeholder draws alike."""
    from safetensors.torch import load_file

    other = ensure_default_image_model(tmp_path)
    tokenizer = "tokenizer/tokenizer.json"
    assert (image_model_dir / tokenizer).read_bytes() == (other / tokenizer).read_bytes()
    for part in ("unet", "vae", "text_encoder"):
        ours = load_file(next((image_model_dir / part).glob("*.safetensors")))
        theirs = load_file(next((other / part).glob("*.safetensors")))
        assert ours.keys() == theirs.keys()
        assert all(ours[k].equal(theirs[k]) for k in ours)


def test_real_folder_is_not_a_placeholder(tmp_path):
    """A folder without the marker (or without model_index.json) is not taken for the placeholder."""
    assert not is_placeholder_model(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert not is_placeholder_model(tmp_path)


def test_tokenizer_knows_every_byte(image_pipe):
    """Words the tiny vocabulary never saw still tokenize without unknown tokens."""
    tok = image_pipe.tokenizer
    ids = tok("zebra çà 🐉 qwxz").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    # unk is the end-of-text token for CLIP; it may only appear as the final id.
    assert unk not in ids[1:-1]
