"""The text engine as a library, without its thread: run requests to the end on the calling thread.

    engine = TextEngine.from_folder("default")
    print(generate(engine, "Hello", adapters=[(version, 1.0)], max_tokens=32))
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from ...adapters.version import AdapterVersion
from ..base import EngineError
from .engine import TextEngine
from .request import SamplingParams, TextChunkEvent, TextDoneEvent, TextRequest

__all__ = ["generate", "generate_many"]


def generate(engine: TextEngine, prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
             adapters: Sequence[tuple[AdapterVersion, float]] = (), **sampling: Any) -> str:
    """One request's text."""
    return generate_many(engine, [dict(prompt=prompt, messages=messages, adapters=adapters, **sampling)])[0].text


def generate_many(engine: TextEngine, requests: Sequence[dict[str, Any]]) -> list[TextDoneEvent]:
    """Several requests batched together (each a dict of prompt or prompt_ids or messages, adapters and
    sampling settings); their results in order. ValueError if one fails. The engine must not be started."""
    results: dict[Hashable, Any] = {}
    for i, r in enumerate(requests):
        r = dict(r)
        prompt, messages = r.pop("prompt", None), r.pop("messages", None)
        ids = r.pop("prompt_ids", None) or engine.encode_prompt(prompt, messages)
        adapters = list(r.pop("adapters", ()))
        settings: dict[str, Any] = {k: (tuple(v) if k == "stop" else v) for k, v in r.items()}
        params = SamplingParams(**settings)
        engine.submit(TextRequest(key=i, prompt_ids=ids, sampling=params, adapters=adapters),
                      lambda e: None if isinstance(e, TextChunkEvent) else results.__setitem__(e.key, e))
    engine.run_until_idle()
    errors = [e for e in results.values() if isinstance(e, EngineError)]
    if errors:
        raise ValueError(f"{errors[0].code}: {errors[0].message}")
    return [results[i] for i in range(len(requests))]
