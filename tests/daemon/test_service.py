"""`Service` with fake engines: what it checks itself, what goes through the intake thread, how
engine events and engine errors become wire messages, and cancelling before the engine has it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import pytest

from bridge import messages as m
from daemon.engines.base import EngineError, EngineErrorCode, EngineInfo, PreparedAdapter
from daemon.engines.text.request import TextChunkEvent, TextDoneEvent, TextRequest
from daemon.engines.text.tokens import PromptTooLong
from daemon.service import Service
from daemon.session import RequestKey
from daemon.settings import Settings


class FakeTextEngine:
    """The engine contract, recording what it is asked; `hold` keeps the intake inside encode_prompt."""

    def __init__(self) -> None:
        self.submitted: list[tuple[TextRequest, Callable[[Any], None]]] = []
        self.cancelled: list[Hashable] = []
        self.hold = threading.Event()
        self.hold.set()
        self.in_encode = threading.Event()

    def describe(self) -> EngineInfo:
        return EngineInfo(kind="text", name="fake", device="cpu", dtype="float32", limits={"context_length": 64})

    class prompts:  # the PromptEncoder attributes the service reads
        renders_tools = False
        tool_call_tags = ("", "")

    def encode_prompt(self, prompt: str | None, messages: Any, *, limit: int | None = None,
                      tools: Any = None) -> list[int]:
        self.in_encode.set()
        assert self.hold.wait(10)
        text = prompt if prompt is not None else " ".join(x["content"] for x in messages)
        ids = [ord(c) % 50 for c in text]
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(len(ids), limit)
        return ids

    def submit(self, request: TextRequest, on_event: Callable[[Any], None]) -> None:
        self.submitted.append((request, on_event))

    def cancel(self, key: Hashable) -> None:
        self.cancelled.append(key)

    def prepare_adapter(self, files: Any) -> PreparedAdapter:
        return PreparedAdapter(rank=1, targets=("q_proj",))

    def prepare_constraint(self, constraint: Any) -> Any:
        raise ValueError("no constraints here")

    def publish(self, version: Any) -> None: ...

    def retire(self, version: Any) -> None: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Posts:
    """The server's side of `post`: thunks run as the loop would run them."""

    def __init__(self) -> None:
        self.thunks: list[Callable[[], Any]] = []
        self.lock = threading.Lock()

    def __call__(self, make: Callable[[], Any]) -> None:
        with self.lock:
            self.thunks.append(make)

    def messages(self, at_least: int = 1, timeout: float = 10) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.thunks) < at_least and time.monotonic() < deadline:
            time.sleep(0.005)
        with self.lock:
            return [make() for make in self.thunks]


@pytest.fixture()
def service() -> Service:
    settings = Settings(text_model="none", image_model="none", watch=False, max_new_tokens=300, max_context=64)
    svc = Service(settings, text_engine=FakeTextEngine())
    yield svc
    svc.stop()


def engine(svc: Service) -> FakeTextEngine:
    assert isinstance(svc.text, FakeTextEngine)
    return svc.text


def wait_for(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_refusals_it_needs_no_engine_for(service: Service) -> None:
    """max_tokens above the limit and images without an image engine are answered at once."""
    posts = Posts()
    service.submit(RequestKey(1, "a"), m.Generate(id="a", prompt="x", max_tokens=301), posts)
    service.submit(RequestKey(1, "b"), m.GenerateImage(id="b", prompt="x"), posts)
    first, second = posts.messages(2)
    assert (first.id, first.code) == ("a", "invalid_parameter") and "300" in first.message
    assert (second.id, second.code) == ("b", "model_unavailable") and "--image-model none" in second.message
    assert engine(service).submitted == []


def test_a_request_goes_through_the_intake_and_its_events_become_messages(service: Service) -> None:
    posts = Posts()
    key = RequestKey(3, "g")
    service.submit(key, m.Generate(id="g", messages=[m.ChatMessage(role="user", content="Ahoy")], seed=5), posts)
    wait_for(lambda: len(engine(service).submitted) == 1)
    request, on_event = engine(service).submitted[0]
    assert request.key == key and request.prompt_ids == [ord(c) % 50 for c in "Ahoy"] and request.sampling.seed == 5
    on_event(TextChunkEvent(key, "Ar", 1))
    on_event(TextChunkEvent(key, "r!", 2))
    on_event(TextDoneEvent(key, "Arr!", "stop", 4, 2, {}, 1.0, 5.0, 9.0))
    chunk0, chunk1, result = posts.messages(3)
    assert (chunk0.index, chunk1.index, chunk1.tokens) == (0, 1, 2)
    assert result.type == "result" and result.text == "Arr!" and result.timings.tokens_per_s == 250.0


def test_engine_errors_map_to_wire_codes(service: Service) -> None:
    posts = Posts()
    key = RequestKey(1, "f")
    service.submit(key, m.Generate(id="f", prompt="x"), posts)
    wait_for(lambda: len(engine(service).submitted) == 1)
    engine(service).submitted[0][1](EngineError(key, EngineErrorCode.FAILED, "boom"))
    (error,) = posts.messages()
    assert (error.id, error.code, error.message) == ("f", "internal", "boom")


def test_prompt_too_long_and_unknown_adapters_come_from_the_intake(service: Service) -> None:
    posts = Posts()
    service.submit(RequestKey(1, "long"), m.Generate(id="long", prompt="x" * 100), posts)
    service.submit(RequestKey(1, "ghost"), m.Generate(id="ghost", prompt="x", adapters=[m.AdapterRef(name="g")]),
                   posts)
    codes = {msg.id: msg.code for msg in posts.messages(2)}
    assert codes == {"long": "prompt_too_long", "ghost": "unknown_adapter"}
    assert engine(service).submitted == []


def test_a_cancel_during_intake_never_reaches_the_engine(service: Service) -> None:
    """Cancelled while its prompt is being tokenised: a cancelled result, and the engine never sees it."""
    fake = engine(service)
    fake.hold.clear()
    posts = Posts()
    key = RequestKey(2, "c")
    service.submit(key, m.Generate(id="c", prompt="x"), posts)
    assert fake.in_encode.wait(10)
    service.cancel(key, "text")
    fake.hold.set()
    (result,) = posts.messages()
    assert result.type == "result" and result.finish_reason == "cancelled"
    assert fake.submitted == [] and fake.cancelled == []
    service.cancel(key, "text")  # no longer pending: it goes to the engine (which ignores unknown keys)
    assert fake.cancelled == [key]


def test_after_stop_every_request_is_refused(service: Service) -> None:
    service.stop()
    posts = Posts()
    service.submit(RequestKey(1, "late"), m.Generate(id="late", prompt="x"), posts)
    (error,) = posts.messages()
    assert error.code == "shutting_down"
