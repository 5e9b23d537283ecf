"""Engine behaviour: sampling, seeds, stop strings, cancellation, limits, adapter validation, slots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import write_text_adapter

from daemon.adapters.loader import read_adapter_files
from daemon.engines.base import EngineError, EngineErrorCode
from daemon.engines.text.detok import IncrementalDecoder
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig, TextChunkEvent, TextDoneEvent, TextRequest
from daemon.engines.text.sampler import SamplingParams, sample


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TextEngine:
    return TextEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_seqs=4, max_context=64, lora_slots=2,
                                                   max_lora_rank=8, prefill_chunk=8))


@pytest.fixture(params=[False, True], ids=["one-at-a-time", "overlapped"])
def stepping(request: pytest.FixtureRequest, engine: TextEngine):  # type: ignore[no-untyped-def]
    """The engine's steps one at a time (the CPU's default), or each launched before the last
    one's tokens land (`overlap_steps`, a GPU's)."""
    engine.overlap_steps = request.param
    yield request.param
    engine.overlap_steps = False


def version(engine: TextEngine, folder: Path, number: int = 1):
    files = read_adapter_files(folder, "text")
    prepared = engine.prepare_adapter(files)
    return files.to_version(folder.name, number, prepared.payload, prepared.rank, prepared.targets)


def run(engine: TextEngine, *requests: TextRequest) -> dict:
    events: dict = {}
    for r in requests:
        engine.submit(r, lambda e, events=events: events.setdefault(e.key, []).append(e))
    while engine.has_work():
        engine.step()
    return events


def req(engine: TextEngine, key, prompt="Ahoy matey", **kw) -> TextRequest:
    adapters = kw.pop("adapters", [])
    stream = kw.pop("stream", True)
    priority = kw.pop("priority", "normal")
    return TextRequest(key=key, prompt_ids=engine.encode_prompt(prompt), sampling=SamplingParams(**kw),
                       adapters=adapters, stream=stream, priority=priority)


def test_seeded_request_is_reproducible_alone_and_in_a_batch(engine: TextEngine) -> None:
    """Same seed, same tokens: alone twice, and next to other requests (counter-based noise)."""
    a = run(engine, req(engine, "a", temperature=1.0, seed=42, max_tokens=12))["a"][-1]
    b = run(engine, req(engine, "b", temperature=1.0, seed=42, max_tokens=12))["b"][-1]
    mixed = run(engine, req(engine, "x", "Gold coins", temperature=1.0, seed=1, max_tokens=12),
                req(engine, "c", temperature=1.0, seed=42, max_tokens=12))["c"][-1]
    other = run(engine, req(engine, "d", temperature=1.0, seed=43, max_tokens=12))["d"][-1]
    assert a.token_ids == b.token_ids == mixed.token_ids
    assert other.token_ids != a.token_ids


def test_chunks_concatenate_to_the_final_text(engine: TextEngine) -> None:
    """Streamed chunks add up to the result's text; token counts rise; finish reason is length."""
    events = run(engine, req(engine, "s", temperature=0.8, seed=3, max_tokens=20))["s"]
    chunks = [e for e in events if isinstance(e, TextChunkEvent)]
    done = events[-1]
    assert isinstance(done, TextDoneEvent) and done.finish_reason == "length" and done.completion_tokens == 20
    assert "".join(c.text for c in chunks) == done.text
    assert [c.tokens for c in chunks] == sorted(c.tokens for c in chunks)


def test_stream_false_sends_only_the_result(engine: TextEngine) -> None:
    events = run(engine, req(engine, "q", temperature=0.0, max_tokens=5, stream=False))["q"]
    assert len(events) == 1 and isinstance(events[0], TextDoneEvent)


def test_stop_string_ends_and_trims(engine: TextEngine) -> None:
    """A stop string taken from a greedy continuation ends that continuation right before it."""
    full = run(engine, req(engine, "f", temperature=0.0, max_tokens=24))["f"][-1].text
    assert len(full) > 6
    stop = full[4:7]
    events = run(engine, req(engine, "t", temperature=0.0, max_tokens=24, stop=(stop,)))["t"]
    done = events[-1]
    assert done.finish_reason == "stop"
    assert done.text == full[: full.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TextChunkEvent)) == done.text


def _play_batch(engine: TextEngine, *, defer: bool, overlap: bool) -> dict:
    """Events (by key) of a batch that meets every way a sequence ends: stop strings mid-stream,
    lengths, EOS allowed, the context's end, sampled and greedy, streamed and not, one cancelled
    mid-way, one paused for a player's line and resumed."""
    prompts = ["Ahoy matey", "Gold coins", "The parrot"]
    fulls = [run(engine, req(engine, ("f", i), p, temperature=0.0, max_tokens=24))[("f", i)][-1].text
             for i, p in enumerate(prompts)]
    batch = [req(engine, ("stop", i), p, temperature=0.0, max_tokens=24, stop=(full[5:8], "zz"))
             for i, (p, full) in enumerate(zip(prompts, fulls, strict=True))]
    batch += [req(engine, "sampled", temperature=0.9, seed=5, max_tokens=17, ignore_eos=False),
              req(engine, "quiet", temperature=0.7, seed=2, max_tokens=9, stream=False),
              req(engine, "cut", temperature=0.8, seed=8, max_tokens=40),
              req(engine, "penalty", "Gold coins", temperature=0.0, repetition_penalty=1.5, max_tokens=20),
              req(engine, "context", "a long tale " * 3, temperature=0.0, max_tokens=60, ignore_eos=True)]
    engine.defer_text, engine.overlap_steps = defer, overlap
    events: dict = {}
    try:
        for r in batch:
            engine.submit(r, lambda e, events=events: events.setdefault(e.key, []).append(e))
        steps = 0
        preempted = engine.scheduler.preempted
        while engine.has_work():
            engine.step()
            steps += 1
            if steps == 4:  # every row taken: the player's line pauses the latest running one
                engine.submit(req(engine, "player", "Where is the key?", temperature=0.0, max_tokens=6,
                                  priority="player"), lambda e, events=events: events.setdefault(e.key, []).append(e))
            if steps == 6:
                engine.cancel("cut")
    finally:
        engine.defer_text = engine.overlap_steps = False
    assert engine.scheduler.preempted > preempted
    assert not engine.scheduler.running and engine.pool.in_use == 0
    return {k: [(type(e).__name__, e.text, getattr(e, "tokens", None), getattr(e, "finish_reason", None),
                 getattr(e, "token_ids", None)) for e in v] for k, v in events.items()}


def test_text_made_while_the_next_step_runs_changes_nothing(engine: TextEngine) -> None:
    """`defer_text` (a GPU's default): a token's text, stop strings and chunk come while the next
    step runs: the same events as text made at once; a stop string found a step late drops the
    extra token and frees every block."""
    late_before = engine.late_stops
    at_once = _play_batch(engine, defer=False, overlap=False)
    assert engine.late_stops == late_before
    behind = _play_batch(engine, defer=True, overlap=False)
    assert behind == at_once
    assert all(at_once[("stop", i)][-1][3] == "stop" for i in range(3))
    assert at_once["cut"][-1][3] == "cancelled"
    assert at_once["context"][-1][3] == "length" and len(at_once["context"][-1][4]) < 60  # the context's end
    assert engine.late_stops >= late_before + 3  # each stop string was found while its next token was computed


def test_steps_launched_before_the_last_ones_tokens_land_change_nothing(engine: TextEngine) -> None:
    """`overlap_steps` (a GPU's default): each step is planned and launched before the tokens of
    the one before reach the host, its decode rows reading their input tokens on the device. The
    same events as one step at a time, with the text made at once or behind; a sequence ended by
    its token (EOS, a stop string, cancelled, paused for the player) has run one more row, whose
    token is dropped; one at its last token by length or context is not planned again."""
    one_at_a_time = _play_batch(engine, defer=False, overlap=False)
    overlapped = engine.overlapped_steps
    assert _play_batch(engine, defer=False, overlap=True) == one_at_a_time
    assert _play_batch(engine, defer=True, overlap=True) == one_at_a_time
    assert engine.overlapped_steps > overlapped + 40


def test_cancel_running_and_queued(engine: TextEngine, stepping: bool) -> None:
    """Cancelling frees the row at the next step; a queued request cancels without running."""
    events: dict = {}
    sink = lambda e: events.setdefault(e.key, []).append(e)  # noqa: E731
    reqs = [req(engine, i, temperature=0.5, seed=i, max_tokens=40) for i in range(6)]  # 4 rows: 2 queue
    for r in reqs:
        engine.submit(r, sink)
    for _ in range(4):
        engine.step()
    engine.cancel(0)
    engine.cancel(5)
    while engine.has_work():
        engine.step()
    assert events[0][-1].finish_reason == "cancelled" and events[0][-1].completion_tokens < 40
    assert events[5][-1].finish_reason == "cancelled" and events[5][-1].completion_tokens == 0
    assert all(events[i][-1].finish_reason == "length" for i in (1, 2, 3, 4))
    assert not engine.scheduler.running and engine.pool.in_use == 0


def test_prompt_too_long_and_empty(engine: TextEngine) -> None:
    long = run(engine, TextRequest(key="l", prompt_ids=[5] * 64, sampling=SamplingParams()))
    assert isinstance(long["l"][0], EngineError) and long["l"][0].code == EngineErrorCode.PROMPT_TOO_LONG
    empty = run(engine, TextRequest(key="e", prompt_ids=[], sampling=SamplingParams()))
    assert empty["e"][0].code == EngineErrorCode.INVALID


def test_context_limit_finishes_with_length(engine: TextEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=100)
    done = run(engine, TextRequest(key="c", prompt_ids=[5] * 60, sampling=params))["c"][-1]
    assert done.finish_reason == "length" and done.prompt_tokens + done.completion_tokens == 64


def test_bad_adapters_are_refused_with_reasons(engine: TextEngine, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Wrong shapes, too high a rank, unknown targets, DoRA, non-LoRA: clear errors, engine keeps serving."""
    good = write_text_adapter(tmp_path / "good", tiny_model_dir, rank=4)
    files = read_adapter_files(good, "text")
    cases = {}
    t = dict(files.tensors)
    k = next(iter(t))
    t[k] = torch.zeros(4, 7)
    cases["shape"] = (files.config, t, "do not fit this base model")
    rank16 = {kk: (torch.zeros(16, v.shape[1]) if "lora_A" in kk else torch.zeros(v.shape[0], 16))
              for kk, v in files.tensors.items()}
    cases["rank"] = ({**files.config, "r": 16}, rank16, "above this daemon's maximum of 8")
    t = dict(files.tensors)
    t["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(4, 64)
    cases["target"] = (files.config, t, "unknown target module 'rotary'")
    t = dict(files.tensors)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 64)
    cases["embedding"] = (files.config, t, "unsupported tensor")
    cases["dora"] = ({**files.config, "use_dora": True}, files.tensors, "DoRA")
    cases["ia3"] = ({**files.config, "peft_type": "IA3"}, files.tensors, "not a LoRA adapter")
    for config, tensors, reason in cases.values():
        with pytest.raises(ValueError, match=re.escape(reason)):
            engine.prepare_lora(config, tensors)
    v = version(engine, good)
    done = run(engine, req(engine, "ok", temperature=0.0, max_tokens=4, adapters=[(v, 1.0)]))["ok"][-1]
    assert done.finish_reason == "length"


def test_truncated_safetensors_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = write_text_adapter(tmp_path / "trunc", tiny_model_dir)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_adapter_files(folder, "text")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter_files(folder, "text")


def test_slots_lru_eviction_pinning_and_waiting(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two slots, three adapters: the least recently used idle one is evicted; a pinned one never is;
    a request whose adapter cannot get a slot waits while others run, then completes."""
    eng = TextEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_seqs=4, max_context=64, lora_slots=2,
                                                  max_lora_rank=8, pinned_adapters=("p",)))
    vs = {n: version(eng, write_text_adapter(tmp_path / n, tiny_model_dir, seed=i)) for i, n in enumerate("pab")}
    run(eng, req(eng, 1, max_tokens=2, adapters=[(vs["p"], 1.0)]))
    run(eng, req(eng, 2, max_tokens=2, adapters=[(vs["a"], 1.0)]))
    run(eng, req(eng, 3, max_tokens=2, adapters=[(vs["b"], 1.0)]))  # evicts a, not the pinned p
    resident = set(eng.slots.resident())
    assert resident == {"p@1", "b@1"} and eng.slots.stats.evictions == 1
    # b busy for long, p pinned: a must wait for b to finish, then take its slot.
    events = run(eng, req(eng, "long", max_tokens=30, temperature=0.0, adapters=[(vs["b"], 1.0)]),
                 req(eng, "wait", max_tokens=2, adapters=[(vs["a"], 1.0)]),
                 req(eng, "base", max_tokens=2))
    assert events["wait"][-1].finish_reason == "length"
    assert events["wait"][-1].queued_ms >= events["base"][-1].queued_ms
    assert set(eng.slots.resident()) == {"p@1", "a@1"}
    stats = eng.stats()  # two rank-4 adapters take 8 pool rows, not 2 x max_lora_rank
    assert stats["lora_rows_in_use"] == 8 and stats["lora_pool_rows"] == 16


def test_retired_version_frees_its_slot_when_unused(engine: TextEngine, tiny_model_dir: Path, tmp_path: Path) -> None:
    v1 = version(engine, write_text_adapter(tmp_path / "r", tiny_model_dir, seed=5), 1)
    run(engine, req(engine, "r", max_tokens=2, adapters=[(v1, 1.0)]))
    assert "r@1" in engine.slots.resident()
    engine.retire(v1)
    engine.step()
    assert "r@1" not in engine.slots.resident()


@pytest.mark.parametrize("byte_level", [True, False])
def test_incremental_decoder_never_emits_broken_utf8(tiny_model_dir: Path, byte_level: bool) -> None:
    """Both paths (byte table, decoded window) give the tokenizer's text piece by piece, never
    half a character, with the multi-byte characters split across tokens."""
    from transformers import AutoTokenizer

    from daemon.engines.text.detok import byte_table

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = byte_table(tok) if byte_level else None
    assert (table is not None) == byte_level
    text = "Gold ⚔ coins 🐉 and ümlauts"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the emoji and accents really span several tokens
    dec = IncrementalDecoder(tok, table)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens completed no character yet


@pytest.mark.parametrize("byte_level", [True, False])
def test_a_nul_the_model_emits_comes_out_as_a_replacement_character(tiny_model_dir: Path, byte_level: bool) -> None:
    """Game engines end strings at U+0000 (Godot's UTF-8 decoding stops there), so the streamed
    pieces and the final text must never carry one."""
    from transformers import AutoTokenizer

    from daemon.engines.text.detok import byte_table

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = byte_table(tok) if byte_level else None
    ids = tok.encode("Ahoy\x00there", add_special_tokens=False)
    assert "\x00" in tok.decode(ids)  # the tokenizer itself keeps the NUL
    dec = IncrementalDecoder(tok, table)
    text = "".join(dec.push(i) for i in ids)
    assert text == "Ahoy\ufffdthere"


def test_sampler_top_k_1_is_greedy_and_repetition_penalty_changes_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    p = SamplingParams(temperature=1.5, top_k=1, seed=9)
    assert sample(logits, [p], [0], [[]]) == [1]
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [penalised], [0], [[1]]) == [2]
    nucleus = SamplingParams(temperature=1.0, top_p=0.01, seed=3)
    assert {sample(logits, [nucleus], [c], [[]])[0] for c in range(20)} == {1}


def test_repetition_penalty_applies_per_row_in_a_batch(engine: TextEngine) -> None:
    """A penalised row next to an unpenalised one gets the tokens it gets alone, and the penalty
    really changes them (it reaches the engine's sampler through the row's own history)."""
    def tokens(events: dict, key: str) -> list[int]:
        return list(events[key][-1].token_ids)

    plain = tokens(run(engine, req(engine, "p", temperature=0.0, max_tokens=16, ignore_eos=True)), "p")
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself: something to penalise
    alone = tokens(run(engine, req(engine, "a", temperature=0.0, repetition_penalty=3.0, max_tokens=16,
                                   ignore_eos=True)), "a")
    both = run(engine, req(engine, "a", temperature=0.0, repetition_penalty=3.0, max_tokens=16, ignore_eos=True),
               req(engine, "b", "Gold coins", temperature=0.0, max_tokens=16, ignore_eos=True))
    assert tokens(both, "a") == alone
    assert alone != plain
    assert tokens(both, "b") == tokens(run(engine, req(engine, "b", "Gold coins", temperature=0.0, max_tokens=16,
                                                       ignore_eos=True)), "b")


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    from daemon.engines.text.config import ModelSpec, UnsupportedModel

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel, match=r"unsupported model architecture 'gpt2'.*Qwen2"):
        ModelSpec.from_folder(tmp_path)


def test_sliding_windows_per_layer_from_the_config() -> None:
    """Qwen2 windows the layers from max_window_layers on, only with use_sliding_window; a v5
    layer_types list names them directly; attention kinds we do not implement are refused."""
    from daemon.engines.text.config import ModelSpec, UnsupportedModel

    base = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "num_attention_heads": 2, "intermediate_size": 16, "num_hidden_layers": 4, "sliding_window": 32,
            "max_window_layers": 2}
    assert [ModelSpec.from_dict(base).window(i) for i in range(4)] == [None] * 4  # named but unused
    on = {**base, "use_sliding_window": True}
    assert [ModelSpec.from_dict(on).window(i) for i in range(4)] == [None, None, 32, 32]
    typed = {**on, "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}
    assert [ModelSpec.from_dict(typed).window(i) for i in range(4)] == [32, None, 32, None]
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        ModelSpec.from_dict({**typed, "layer_types": ["chunked_attention"] * 4})
    mistral = {**base, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    assert [ModelSpec.from_dict(mistral).window(i) for i in range(4)] == [32] * 4


def test_safetensors_roundtrip_helper_is_sane(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The fixture adapters really have non-zero B (PEFT's default init would make them no-ops)."""
    folder = write_text_adapter(tmp_path / "nz", tiny_model_dir)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)
    save_file(tensors, str(tmp_path / "copy.safetensors"))


def test_a_failure_one_request_brings_ends_only_that_request(engine: TextEngine, stepping: bool) -> None:
    """A step that fails whenever one request is in it: that request ends with FAILED, every other
    request of the batch finishes with the tokens it gets without it."""
    def reqs() -> list[TextRequest]:
        return [req(engine, k, p, temperature=0.8, seed=i, max_tokens=10, ignore_eos=True)
                for i, (k, p) in enumerate([("a", "Ahoy matey"), ("b", "Gold coins"), ("c", "Hello there")])]

    clean = run(engine, *[r for r in reqs() if r.key != "b"])

    def poisoned(keys: list, logits: torch.Tensor) -> None:
        if "b" in keys:
            raise RuntimeError("this row's sampling blew up")

    engine.runner.on_logits = poisoned
    try:
        failed_before = engine.failed_steps
        events = run(engine, *reqs())
    finally:
        engine.runner.on_logits = None
    assert isinstance(events["b"][-1], EngineError) and events["b"][-1].code == EngineErrorCode.FAILED
    assert "blew up" in events["b"][-1].message
    for key in ("a", "c"):
        assert events[key][-1].token_ids == clean[key][-1].token_ids
    assert engine.failed_steps > failed_before
    assert not engine.scheduler.running and engine.pool.in_use == 0


def test_a_failure_of_the_whole_batch_alone_is_survived_in_halves(engine: TextEngine, stepping: bool) -> None:
    """A step that fails only with several rows in it (say, out of memory): retried in halves, every
    request completes."""
    def too_big(keys: list, logits: torch.Tensor) -> None:
        if len(keys) > 2:
            raise RuntimeError("out of memory (simulated)")

    engine.runner.on_logits = too_big
    try:
        events = run(engine, *[req(engine, i, temperature=0.0, max_tokens=6, ignore_eos=True) for i in range(4)])
    finally:
        engine.runner.on_logits = None
    assert all(isinstance(events[i][-1], TextDoneEvent) and events[i][-1].completion_tokens == 6 for i in range(4))


def test_a_step_the_device_fails_after_its_launch_ends_its_requests_alone(engine: TextEngine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapped, a step's failure can surface only when its tokens are taken (a device error):
    then nothing of that step is known, and its sequences end with FAILED; the step launched
    after it, and every request after, run on."""
    from daemon.engines.text import runner as runner_module

    taken = runner_module.Launched.tokens
    calls = {"n": 0}

    def flaky(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("an illegal memory access (simulated)")
        return taken(self)

    monkeypatch.setattr(runner_module.Launched, "tokens", flaky)
    engine.overlap_steps = True
    try:
        failed_before = engine.failed_steps
        events = run(engine, *[req(engine, i, temperature=0.0, max_tokens=8, ignore_eos=True) for i in range(3)])
        after = run(engine, req(engine, "after", temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        engine.overlap_steps = False
    assert engine.failed_steps == failed_before + 1
    assert all(isinstance(events[i][-1], EngineError) and "illegal memory access" in events[i][-1].message
               for i in range(3))
    assert isinstance(after["after"][-1], TextDoneEvent) and after["after"][-1].completion_tokens == 8
    assert not engine.scheduler.running and engine.pool.in_use == 0


def test_a_failed_step_after_a_late_stop_string_retries_only_the_others(engine: TextEngine, stepping: bool) -> None:
    """With the text made while the next step runs, a stop string found then ends its sequence
    inside a step; when that step fails and is retried in halves, the ended sequence is not retried
    (its blocks are gone) and ends as it would have, with `stop`; the others complete."""
    full = run(engine, req(engine, "f", temperature=0.0, max_tokens=24))["f"][-1].text
    stop = full[5:8]

    def too_big(keys: list, logits: torch.Tensor) -> None:
        if len(keys) > 1:
            raise RuntimeError("out of memory (simulated)")

    engine.runner.on_logits = too_big
    engine.defer_text = True
    try:
        # "s" last: the halves' last retry gives its token, so its text waits for the next step's first try
        events = run(engine, *[req(engine, i, "Gold coins", temperature=0.0, max_tokens=20, ignore_eos=True)
                               for i in range(2)], req(engine, "s", temperature=0.0, max_tokens=24, stop=(stop,)))
    finally:
        engine.runner.on_logits = None
        engine.defer_text = False
    assert len(done_tokens := events["s"][-1].token_ids) < 20, done_tokens  # it ended while the others ran
    done = events["s"][-1]
    assert isinstance(done, TextDoneEvent) and done.finish_reason == "stop" and done.text == full[:full.index(stop)]
    assert all(isinstance(events[i][-1], TextDoneEvent) and events[i][-1].completion_tokens == 20 for i in range(2))
    assert not engine.scheduler.running and engine.pool.in_use == 0
