"""Tiny random models and adapters built on the spot, for tests and benchmarks (no downloads).

- `build_tiny_model(dir, arch)`: a random Llama, Mistral or Qwen2 causal LM (float32 safetensors + tokenizer).
- `write_text_adapter(dir, base_dir, ...)`: a PEFT LoRA adapter with non-zero B for that base model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
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


# -- AWQ and GPTQ checkpoints packed offline, by the formats' own rules (tests of quant_formats) --------------

QUANT_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: the code at bits 4i of a word is output column ORDER[i]


def quantize_4bit_groups(w: torch.Tensor, *, sym: bool, group: int = 128,
                         zero_floor: int = 0) -> tuple[torch.Tensor, ...]:
    """W [out, in] -> codes [out, in], zeros [out, in/group], scales [out, in/group] (fp16) the way
    GPTQ's and AWQ's quantizers compute them: sym puts the zero at 8 and the scale at 2*max|w|/15;
    asym maps [min, max] of a group onto 0..15 with zero = round(-min/scale), at least `zero_floor`
    (1 for GPTQ's v1 format, which cannot store a zero point of 0)."""
    out, inp = w.shape
    g = w.double().view(out, inp // group, group)
    if sym:
        scale = (g.abs().amax(-1) * 2 / 15).clamp(min=1e-6)
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        zero = (-lo / scale).round().clamp(zero_floor, 15)
    scale = scale.half()
    q = (g / scale.double().unsqueeze(-1)).round().add(zero.unsqueeze(-1)).clamp(0, 15)
    return q.long().view(out, inp), zero.long(), scale


def dequantize_4bit_groups(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
    """The float32 weight [out, in] the codes stand for: (q - zero) * scale, group by group."""
    out, inp = q.shape
    deq = (q.view(out, -1, group) - zero.unsqueeze(-1)).double() * scale.double().unsqueeze(-1)
    return deq.view(out, inp).float()


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """int64 [..., 8] codes, nibble k at bits 4k -> int32 [...] (two's complement, as the formats store them)."""
    word = sum(((nibbles[..., k] & 0xF) << (4 * k) for k in range(8)), torch.zeros_like(nibbles[..., 0]))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def pack_awq(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ's WQLinear_GEMM tensors: qweight [in, out/8], qzeros [in/128, out/8] (int32, eight
    output columns per word in AWQ_PACK_ORDER), scales [in/128, out] fp16."""
    order = list(AWQ_PACK_ORDER)

    def pack(m: torch.Tensor) -> torch.Tensor:  # [rows, cols] -> [rows, cols/8]
        rows, cols = m.shape
        return _words(m.view(rows, cols // 8, 8)[..., order])

    return {"qweight": pack(q.t()), "qzeros": pack(zero.t()), "scales": scale.t().contiguous()}


def pack_gptq(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, *, v1: bool = True) -> dict[str, torch.Tensor]:
    """AutoGPTQ's tensors: qweight [in/8, out] (eight input rows per word, row 8r+j at bits 4j),
    qzeros [in/128, out/8] (eight output columns per word; v1 stores zero - 1), scales
    [in/128, out] fp16, g_idx [in] = i // 128 (desc_act false)."""
    out, inp = q.shape
    qt = q.t().contiguous()  # [in, out]
    qweight = _words(qt.view(inp // 8, 8, out).permute(0, 2, 1))
    z = zero.t().contiguous() - (1 if v1 else 0)  # [in/128, out]
    qzeros = _words(z.view(z.shape[0], out // 8, 8))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(inp) // 128).to(torch.int32)}


def write_quantized_model(src: Path, dst: Path, reference: Path, *, method: str, sym: bool = True,
                          v1: bool = True, keep_dense: tuple[str, ...] = (),
                          lm_head: bool = False) -> tuple[Path, Path]:
    """From a dense folder `src`: an AWQ or GPTQ checkpoint in `dst` (its projections packed, the
    rest as is) and `reference`, the same model with the projections' dequantized float32 weights.
    Projections named in `keep_dense` (e.g. "model.layers.0.mlp.down_proj.") stay dense in both;
    `lm_head` packs the vocab head too (GPTQModel's lm_head option)."""
    import shutil

    from safetensors.torch import load_file

    tensors = load_file(str(src / "model.safetensors"))
    packed, dense = dict(tensors), dict(tensors)
    for key in [k for k in tensors if (k.endswith(".weight") and any(p in k for p in QUANT_PROJECTIONS)
                and k.removesuffix("weight") not in keep_dense) or (lm_head and k == "lm_head.weight")]:
        prefix = key.removesuffix("weight")
        q, zero, scale = quantize_4bit_groups(tensors[key], sym=method == "gptq" and sym,
                                              zero_floor=1 if method == "gptq" and v1 else 0)
        del packed[key]
        parts = pack_awq(q, zero, scale) if method == "awq" else pack_gptq(q, zero, scale, v1=v1)
        packed.update({prefix + k: v for k, v in parts.items()})
        dense[key] = dequantize_4bit_groups(q, zero, scale)
    quant = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"} \
        if method == "awq" else {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                 "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    for folder, weights in ((dst, packed), (reference, dense)):
        shutil.copytree(src, folder, dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst, reference


def copy_model(src: Path, dst: Path, quantization_config: dict | None = None,
               edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of a model folder, with `quantization_config` entries changed where given (an empty
    dict removes it) and `edit` applied to its tensors."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    if quantization_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        if quantization_config:
            cfg["quantization_config"].update(quantization_config)
        else:
            del cfg["quantization_config"]
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def write_rtn_reference(src: Path, dst: Path, kind: str) -> Path:
    """`src` with each projection (and the embeddings, and an untied head) replaced by its
    round-to-nearest `kind` weights (the engine's `quant.quantize_rtn`, one projection at a time as
    the loader does), dequantized to float32."""
    from safetensors.torch import load_file

    from daemon.engines.text.quant import quantize_rtn

    copy_model(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for key in [k for k in tensors if (k.endswith(".weight") and any(p in k for p in QUANT_PROJECTIONS))
                or k in ("lm_head.weight", "model.embed_tokens.weight")]:  # the table and an untied head too
        tensors[key] = quantize_rtn(tensors[key], kind, torch.float32).dequantize(torch.float32)  # type: ignore[arg-type]
    save_file(tensors, str(dst / "model.safetensors"))
    return dst
