"""`loraloom train`: fine-tune a LoRA on the current base model with PEFT (the designer's loop).

Data (JSONL or plain text, one example per line):
- `{"messages": [{"role": ..., "content": ...}, ...]}`: chat examples; the loss covers the last
  assistant turn only. The system turn is dropped from half the examples so the adapter carries
  the voice by itself, without its system prompt.
- `{"text": "..."}` or a plain line of text: a line in the character's voice, learnt whole.

The adapter is written into the adapter folder atomically (a temporary folder, then a rename), so
a running daemon that watches the folder picks the new version up live.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.messages import ADAPTER_NAME_PATTERN

__all__ = ["TrainConfig", "load_examples", "train_adapter"]

log = logging.getLogger("loraloom.train")


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 60
    lr: float = 2e-3
    batch_size: int = 8  # `loraloom train` uses 4 on a CPU, where a step of 8 takes seconds
    max_length: int = 96
    seed: int = 0
    device: str = "auto"
    drop_system: float = 0.5
    save_dtype: str = "float32"  # or bfloat16 / float16: half the size on disk, same quality for serving


def load_examples(path: Path) -> list[dict[str, Any]]:
    """Parse the training file into {"messages": [...]} or {"text": "..."} items."""
    examples: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None
            if "messages" in item:
                msgs = item["messages"]
                if not msgs or msgs[-1].get("role") != "assistant":
                    raise ValueError(f"{path}:{n}: the last message must be the assistant's")
                examples.append({"messages": msgs})
            elif "text" in item:
                examples.append({"text": str(item["text"])})
            else:
                raise ValueError(f"{path}:{n}: expected a 'messages' or 'text' field")
        else:
            examples.append({"text": line})
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _encode(tokenizer: Any, example: dict[str, Any], rng: random.Random, cfg: TrainConfig) -> tuple[list[int], int]:
    """Token ids and how many leading tokens are prompt (no loss)."""
    if "text" in example:
        ids = [*tokenizer.encode(example["text"]), tokenizer.eos_token_id]
        return ids[: cfg.max_length], 0
    msgs = list(example["messages"])
    if msgs[0]["role"] == "system" and rng.random() < cfg.drop_system:
        msgs = msgs[1:]
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    f_ids = tokenizer.encode(full, add_special_tokens=False)
    if len(f_ids) > cfg.max_length:  # keep the answer, cut the prompt from the left
        cut = len(f_ids) - cfg.max_length
        f_ids = f_ids[cut:]
        p_len = max(0, len(p_ids) - cut)
    else:
        p_len = len(p_ids)
    return f_ids, p_len


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def train_adapter(base_dir: Path, data: Path, out_dir: Path, name: str, cfg: TrainConfig,
                  *, progress: bool = True) -> Path:
    """Train a LoRA and write it to out_dir/name atomically. Returns the adapter folder."""
    import re

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' own loading bars and deprecation notes would break the training bar below.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise ValueError(f"'{name}' is not a valid adapter name (letters, digits, _ - . ; no slash)")
    examples = load_examples(data)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)  # type: ignore[arg-type]
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # a float works
                          target_modules=list(cfg.targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(range(cfg.steps), desc=f"training {name}", disable=not progress, unit="step")
    start = time.perf_counter()
    loss_value = float("nan")
    for step in bar:
        if step == 1 and progress:  # one step measured: say how long the whole run will take
            per_step = time.perf_counter() - start
            bar.write(f"training {name} on {device}: {cfg.steps} steps of {cfg.batch_size} examples, "
                      f"about {_duration(per_step * cfg.steps)} in all")
        batch = [_encode(tokenizer, rng.choice(examples), rng, cfg) for _ in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, p_len) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, p_len: len(ids)] = torch.tensor(ids[p_len:])
            mask[i, : len(ids)] = 1
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(out.loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    log.info("trained %s: %d steps in %.1fs, final loss %.3f", name, cfg.steps, time.perf_counter() - start,
             loss_value)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    try:
        model.save_pretrained(str(work))
        (work / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing about this adapter
        if cfg.save_dtype != "float32":
            from safetensors.torch import load_file, save_file

            weights = work / "adapter_model.safetensors"
            cast = getattr(torch, cfg.save_dtype)
            save_file({k: v.to(cast).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
        meta = json.loads((work / "adapter_config.json").read_text())
        meta["base_model_name_or_path"] = base_dir.name
        (work / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        final = out_dir / name
        old = None
        if final.exists():
            old = out_dir / f".{name}.old-{int(time.time() * 1000)}"
            final.rename(old)
        work.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final
