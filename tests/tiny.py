"""Tiny random models and adapters built on the spot, for tests and benchmarks (no downloads).

- `build_tiny_model(dir, arch)`: a random Llama, Mistral or Qwen2 causal LM (float32 safetensors + tokenizer).
- `write_text_adapter(dir, base_dir, ...)`: a PEFT LoRA adapter with non-zero B for that base model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: `benchmarks.fixtures`

from benchmarks.fixtures.random_model import build_tokenizer, random_adapter_tensors
from daemon.engines.text.config import ModelSpec

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_model(
    path: Path,
    arch: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    max_positions: int = 512,
) -> Path:
    """A random causal LM folder (config.json, model.safetensors, tokenizer) of `arch` llama/mistral/qwen2/qwen2-swa."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tok = build_tokenizer(path)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    elif arch == "mistral":  # a sliding window shorter than the test prompts, so that it matters
        config = MistralConfig(**common, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=6)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
    elif arch == "qwen2-swa":  # the window on the second layer only (max_window_layers), shorter than the prompts
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=True,
                             sliding_window=5, max_window_layers=1)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a larger init than the default keeps logits far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


def write_text_adapter(
    path: Path,
    base_dir: Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    std: float = 0.3,
    use_rslora: bool = False,
    atomic: bool = True,
) -> Path:
    """Write a PEFT LoRA adapter folder for `base_dir` with random, non-zero A and B."""
    spec = ModelSpec.from_folder(base_dir)
    tensors = random_adapter_tensors(spec, rank=rank, targets=targets, seed=seed, std=std)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(base_dir),
    }
    final = path
    work = path.with_name(f".{path.name}.tmp") if atomic else path
    work.mkdir(parents=True, exist_ok=True)
    (work / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "adapter_model.safetensors"))
    if atomic:
        import shutil

        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    return final
