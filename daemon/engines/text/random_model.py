"""Random models of real shapes, for benchmarks and tests: no weights are downloaded.

`random_llama(shape)` gives a `ModelSpec`, a tokenizer (a small byte-level BPE trained on the
spot) and random weights in memory, so a 1B-parameter Llama-shaped model costs no disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ModelSpec

__all__ = ["SHAPES", "build_tokenizer", "random_adapter_tensors", "random_llama"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Ahoy matey, the quartermaster counts the barrels of rum twice a day.",
    "The elven archivist keeps the old scrolls in a library under the roots.",
    "Hammer and anvil, the grumpy blacksmith forges a sword before dawn.",
    "Hello, who goes there? A traveller from the northern hills seeks shelter.",
    "Gold coins, silver rings, and a map with an X marked in red ink.",
    "Once upon a time the dragon slept on a hoard of glittering treasure.",
] * 4

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab, tied)
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, True),  # Llama 3.2 1B: 1.24B parameters
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True),
    "tiny": (64, 2, 4, 2, 128, 384, False),
}


def build_tokenizer(path: Path | None = None, vocab_size: int = 384) -> Any:
    """Train a small byte-level BPE tokenizer with chat special tokens; save it when `path` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(path)
    return fast


def random_llama(shape: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 max_positions: int = 4096) -> tuple[ModelSpec, dict[str, torch.Tensor], Any]:
    """(spec, weights named as in HF checkpoints, tokenizer) for a random Llama-shaped model."""
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    tokenizer = build_tokenizer()
    spec = ModelSpec.from_dict({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": tied, "eos_token_id": -1}, name=f"random-{shape}")
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden),
                                  "model.norm.weight": torch.ones(hidden, device=device, dtype=dtype)}
    if not tied:
        t["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, (d_in, d_out) in spec.target_dims().items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            t[f"{p}{group}.{name}.weight"] = rand(d_out, d_in)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, device=device, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, device=device, dtype=dtype)
    return spec, t, tokenizer


def random_adapter_tensors(spec: ModelSpec, *, rank: int, targets: tuple[str, ...], seed: int,
                           std: float = 0.05) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors with non-zero A and B (float32, on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    dims = spec.target_dims()
    out: dict[str, torch.Tensor] = {}
    for layer in range(spec.num_layers):
        for t in targets:
            d_in, d_out = dims[t]
            group = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{t}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std
            out[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    return out
