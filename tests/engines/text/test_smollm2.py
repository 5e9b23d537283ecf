"""On the embedded SmolLM2-135M: greedy continuations equal PEFT's, for several adapters in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import write_text_adapter

from daemon.engines.text.engine import TextEngine
from daemon.engines.text.offline import generate_many
from daemon.engines.text.request import EngineConfig

from .test_correctness import load_version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ADAPTERS = {
    "n1": dict(rank=8, targets=("q_proj", "v_proj"), seed=31, std=0.08),
    "n2": dict(rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               seed=32, std=0.05),
    "n3": dict(rank=4, targets=("o_proj", "down_proj"), seed=33, std=0.1),
}


def test_greedy_32_tokens_equal_peft_for_three_adapters_in_one_batch(smollm2_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = {n: write_text_adapter(tmp_path / n, smollm2_dir, **spec) for n, spec in ADAPTERS.items()}
    engine = TextEngine.from_folder(smollm2_dir, EngineConfig(device="cpu", dtype="float32", max_seqs=4,
                                                              max_context=256, lora_slots=4, max_lora_rank=16))
    versions = {n: load_version(engine, d) for n, d in dirs.items()}
    question = [{"role": "user", "content": "Tell me about the old castle on the hill."}]
    ids = engine.encode_prompt(messages=question)
    requests = [dict(prompt_ids=ids, adapters=[(versions[n], 1.0)], temperature=0.0, max_tokens=32,
                     ignore_eos=True) for n in ADAPTERS]
    requests.append(dict(prompt_ids=ids, temperature=0.0, max_tokens=32, ignore_eos=True))
    ours = [list(e.token_ids) for e in generate_many(engine, requests)]

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    names = list(ADAPTERS)
    peft = PeftModel.from_pretrained(base, str(dirs[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(dirs[n]), adapter_name=n)
    peft.eval()
    x = torch.tensor([ids])
    expected = []
    with torch.no_grad():
        for n in names:
            peft.set_adapter(n)
            out = peft.generate(input_ids=x, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            expected.append(out[0, len(ids):].tolist())
        with peft.disable_adapter():
            out = peft.generate(input_ids=x, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            expected.append(out[0, len(ids):].tolist())
    assert ours == expected
    assert len({tuple(t) for t in ours}) == len(ours), "each adapter should change the continuation"
