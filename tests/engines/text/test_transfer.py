"""Host lists to the device without a wait (`transfer.py`), and on CUDA: a step's one wait for the
device is for its sampled tokens on the host (`Launched.tokens`, while the next step runs).

A wait in the middle of a step (an index built from a list, a `torch.tensor(..., device=...)`)
makes the host idle until the forward ends, and the device idle while the host then does what it
could have done meanwhile: the deferred text of the last token, the masks, the sampler's
launches. PyTorch's sync debug mode turns each such wait into an error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import write_text_adapter

from daemon.adapters.loader import read_adapter_files
from daemon.engines.text import runner as runner_module
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest
from daemon.engines.text.sampler import choose
from daemon.engines.text.transfer import bools, floats, longs


def test_host_lists_arrive_as_torch_tensor_would_build_them() -> None:
    cpu = torch.device("cpu")
    big = [0, -1, 2**62, 7]
    assert torch.equal(longs(big, cpu), torch.tensor(big, dtype=torch.int64))
    assert torch.equal(floats([0.5, -2.0, 1e-3], cpu), torch.tensor([0.5, -2.0, 1e-3], dtype=torch.float32))
    assert torch.equal(bools([True, False, True], cpu), torch.tensor([True, False, True]))
    for make, dtype in ((longs, torch.int64), (floats, torch.float32), (bools, torch.bool)):
        empty = make([], cpu)
        assert empty.shape == (0,) and empty.dtype == dtype
    assert longs(range(3), cpu).tolist() == [0, 1, 2]  # any sequence of ints


if torch.cuda.is_available():  # collected only where it can run (like the CUDA cases of test_correctness)

    def test_a_cuda_step_waits_only_for_its_sampled_tokens(tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """Decode rows on an adapter beside a prompt joining in chunks (some that end mid-prompt,
        whose logits the graph's output drops), rows greedy, sampled with top-p and with a
        repetition penalty: the forward and the sampler's kernels queue without one wait; then
        the same tokens as without the check."""
        engine = TextEngine.from_folder(tiny_model_dir, EngineConfig(
            device="cuda", dtype="bfloat16", max_seqs=8, max_context=256, lora_slots=4, max_lora_rank=8,
            prefill_chunk=16, max_step_tokens=40, prefix_cache=False))  # both rounds prefill alike
        files = read_adapter_files(write_text_adapter(tmp_path / "a", tiny_model_dir, rank=8), "text")
        prepared = engine.prepare_adapter(files)
        adapter = files.to_version("a", 1, prepared.payload, prepared.rank, prepared.targets)
        samplings = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                     SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=24, ignore_eos=True),
                     SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=24, ignore_eos=True)]
        checked = {"forwards": 0, "samples": 0}

        def scenario(round_: int) -> dict:
            done: dict = {}

            def submit(key: str, ids: list[int], sampling: SamplingParams) -> None:
                engine.submit(TextRequest(key=(round_, key), prompt_ids=ids, sampling=sampling,
                                          adapters=[(adapter, 1.0)]),
                              lambda e: done.__setitem__(e.key[1], e.token_ids) if hasattr(e, "finish_reason")
                              else None)

            for i, sampling in enumerate(samplings):
                submit(f"npc{i}", engine.encode_prompt(f"Ahoy matey number {i}"), sampling)
            for _ in range(4):
                engine.step()
            submit("player", [5 + (7 * i) % 90 for i in range(70)], samplings[0])  # 5 chunks, 4 end mid-prompt
            engine.run_until_idle()
            return done

        expected = scenario(0)  # records the graphs the checked round meets (a capture waits)
        chunk_replays = engine.graphs.chunk_replays
        forward = engine.runner._forward

        def no_wait(fn, counter):  # type: ignore[no-untyped-def]
            def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
                torch.cuda.set_sync_debug_mode("error")
                try:
                    out = fn(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                checked[counter] += 1
                return out
            return wrapped

        monkeypatch.setattr(engine.runner, "_forward", no_wait(forward, "forwards"))
        monkeypatch.setattr(runner_module, "choose", no_wait(choose, "samples"))
        overlapped = engine.overlapped_steps
        got = scenario(1)
        assert engine.graphs.chunk_replays > chunk_replays  # the chunk steps ran through graphs
        assert engine.overlapped_steps > overlapped + 20  # and their decode rows' inputs came from the device
        assert checked["forwards"] >= 24 and checked["samples"] >= 24
        assert got == expected
