"""The SGLang and trtllm-serve dialects (neither installs here) on request and response shapes recorded from
their documentation and source, replayed by a loopback HTTP server; the parts every dialect shares."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import make_remote_adapters
from test_conformance import Events, version

from daemon.engines.base import EngineError, EngineErrorCode
from daemon.engines.remote import RemoteConfig, RemoteEngine
from daemon.engines.remote.dialect import RemoteFailure, failure_from_status
from daemon.engines.remote.http import HttpStatusError
from daemon.engines.text.config import ModelSpec
from daemon.engines.text.request import SamplingParams, TextDoneEvent, TextRequest
from daemon.engines.text.tokens import load_tokenizer

# SGLang: /v1/models, /load_lora_adapter's LoadLoRAAdapterReqOutput, CompletionStreamResponse chunks.
SGLANG_MODELS = {"object": "list", "data": [{"id": "base", "object": "model", "owned_by": "sglang",
                                             "root": "base", "max_model_len": 512}]}
SGLANG_LOADED = {"success": True, "error_message": None, "loaded_adapters": {"x": "/path"}}
SGLANG_CHUNKS = [
    {"id": "c1", "object": "text_completion", "created": 1, "model": "base", "choices": [
        {"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None, "matched_stop": None}], "usage": None},
    {"id": "c1", "object": "text_completion", "created": 1, "model": "base", "choices": [
        {"index": 0, "text": "lo", "logprobs": None, "finish_reason": "length", "matched_stop": None}],
     "usage": None},
    {"id": "c1", "object": "text_completion", "created": 1, "model": "base", "choices": [],
     "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2,
               "prompt_tokens_details": {"cached_tokens": 2}}},
]
# trtllm-serve: CompletionStreamResponse chunks (token_ids, stop_reason; usage on the last one).
TRTLLM_MODELS = {"object": "list", "data": [{"id": "base", "object": "model", "owned_by": "tensorrt_llm"}]}
TRTLLM_CHUNKS = [
    {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "base", "choices": [
        {"index": 0, "text": "Hel", "token_ids": None, "logprobs": None, "finish_reason": None, "stop_reason": None}],
     "usage": None},
    {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "base", "choices": [
        {"index": 0, "text": "lo", "token_ids": None, "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
     "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}},
]


class Replay:
    """A loopback server answering with recorded shapes; it keeps every request it got."""

    def __init__(self, models: Any, chunks: list[Any]) -> None:
        self.seen: list[tuple[str, Any]] = []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None: ...

            def _json(self, value: Any, status: int = 200) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                replay.seen.append((self.path, None))
                self._json(models)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                replay.seen.append((self.path, body))
                if self.path != "/v1/completions":
                    return self._json(SGLANG_LOADED)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[Any]:
        return [b for p, b in self.seen if p == path]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, remote_model_dir: Path) -> Path:
    return make_remote_adapters(tmp_path_factory.mktemp("dialects") / "adapters", remote_model_dir)


def engine_on(replay: Replay, dialect: str, model_dir: Path, shared: Path) -> RemoteEngine:
    e = RemoteEngine(ModelSpec.from_folder(model_dir), load_tokenizer(model_dir),
                     RemoteConfig(url=replay.url, dialect=dialect, adapter_dir=shared, adapter_path="/mnt/loras",
                                  max_context=512))
    e.start()
    return e


def run(e: RemoteEngine, adapters: Any = (), **sampling: Any) -> Any:
    events = Events()
    e.submit(TextRequest(key=object(), prompt_ids=[5, 6, 7], adapters=list(adapters),
                         sampling=SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **sampling})), events)
    return events.last


@pytest.fixture()
def replays() -> Iterator[list[Replay]]:
    made: list[Replay] = []
    yield made
    for r in made:
        r.server.shutdown()


def test_sglang(replays: list[Replay], remote_model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    """SGLang: `base:adapter`, top_k off is -1, adapters loaded and unloaded by name, a repetition
    penalty above 2 refused before it is sent, cached tokens read from usage."""
    replay = Replay(SGLANG_MODELS, SGLANG_CHUNKS)
    replays.append(replay)
    e = engine_on(replay, "sglang", remote_model_dir, tmp_path / "shared")
    alpha = version(e, adapter_dir / "alpha")
    done = run(e, [(alpha, 1.0)], repetition_penalty=1.2)
    assert isinstance(done, TextDoneEvent) and done.text == "Hello" and done.finish_reason == "length"
    assert done.completion_tokens == 2 and done.cached_tokens == 2 and e.describe().name == "base"
    name = f"alpha@1.{alpha.hash}"
    assert replay.bodies("/load_lora_adapter") == [{"lora_name": name, "lora_path": f"/mnt/loras/{name}"}]
    assert (tmp_path / "shared" / name / "adapter_model.safetensors").exists()
    (body,) = replay.bodies("/v1/completions")
    assert body["model"] == f"base:{name}" and body["prompt"] == [5, 6, 7] and body["top_k"] == -1
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["repetition_penalty"] == 1.2 and body["return_token_ids"] is True
    refused = run(e, repetition_penalty=2.5)
    assert isinstance(refused, EngineError) and refused.code == EngineErrorCode.INVALID
    assert "repetition_penalty 2.5" in refused.message and len(replay.bodies("/v1/completions")) == 1
    e.retire(alpha)
    e.stop()
    assert replay.bodies("/unload_lora_adapter") == [{"lora_name": name}]
    assert not (tmp_path / "shared" / name).exists()


def test_trtllm(replays: list[Replay], remote_model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    """trtllm-serve: the adapter travels in `lora_request` (name, a stable int id, the path), nothing is
    loaded or unloaded through the API, and no field outside its request model is sent."""
    replay = Replay(TRTLLM_MODELS, TRTLLM_CHUNKS)
    replays.append(replay)
    e = engine_on(replay, "trtllm", remote_model_dir, tmp_path / "shared")
    beta = version(e, adapter_dir / "beta")
    done = run(e, [(beta, 1.0)], top_k=40)
    assert isinstance(done, TextDoneEvent) and done.text == "Hello" and done.finish_reason == "stop"
    (body,) = replay.bodies("/v1/completions")
    name = f"beta@1.{beta.hash}"
    assert body["model"] == "base" and body["top_k"] == 40 and "return_token_ids" not in body
    request = body["lora_request"]
    assert request["lora_name"] == name and request["lora_path"] == f"/mnt/loras/{name}"
    assert isinstance(request["lora_int_id"], int) and 0 < request["lora_int_id"] < 2**62
    run(e, [(beta, 1.0)])
    assert replay.bodies("/v1/completions")[1]["lora_request"]["lora_int_id"] == request["lora_int_id"]
    assert [p for p, _ in replay.seen if p.startswith("/v1/") and "lora" in p] == []
    e.stop()


def test_a_remote_elsewhere_needs_a_shared_folder(remote_model_dir: Path, adapter_dir: Path) -> None:
    """Without remote_adapter_dir, a remote on another machine gets no adapters: versions are rejected
    with the reason (no connection is made to find that out)."""
    e = RemoteEngine(ModelSpec.from_folder(remote_model_dir), load_tokenizer(remote_model_dir),
                     RemoteConfig(url="http://gpu-box.invalid:8000"))
    with pytest.raises(ValueError, match="set remote_adapter_dir"):
        version(e, adapter_dir / "alpha")


def test_http_errors_map_to_engine_codes() -> None:
    cases = [(HttpStatusError(400, "This model's maximum context length is 512 tokens"),
              EngineErrorCode.PROMPT_TOO_LONG),
             (HttpStatusError(400, "top_p must be in (0, 1]"), EngineErrorCode.INVALID),
             (HttpStatusError(422, "field required"), EngineErrorCode.INVALID),
             (HttpStatusError(401, "Unauthorized"), EngineErrorCode.FAILED),
             (HttpStatusError(503, "busy"), EngineErrorCode.UNAVAILABLE),
             (HttpStatusError(500, "boom"), EngineErrorCode.FAILED)]
    for exc, code in cases:
        failure = failure_from_status(exc, "x")
        assert isinstance(failure, RemoteFailure) and failure.code == code and exc.message in failure.message
    assert "remote_api_key" in failure_from_status(HttpStatusError(401, "Unauthorized"), "x").message
