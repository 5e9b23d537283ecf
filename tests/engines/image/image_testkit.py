"""Helpers shared by the image engine tests: reading adapter folders, collecting events."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from daemon.adapters.version import AdapterVersion
from daemon.engines.base import EngineError
from daemon.engines.image import ImageDoneEvent, ImageEngine, ImageRequest


def make_version(folder: Path, name: str | None = None, number: int = 1) -> AdapterVersion:
    """Read an adapter folder the way the registry does."""
    path = folder / "pytorch_lora_weights.safetensors"
    data = path.read_bytes()
    return AdapterVersion(
        name=name or folder.name,
        kind="image",
        number=number,
        hash=hashlib.sha256(data).hexdigest()[:16],
        tensors=load_file(path),
    )


class Collector:
    """Receives one request's events from the worker thread and waits for its ending."""

    def __init__(self, on_event: Callable[[Any], None] | None = None) -> None:
        self.events: list[Any] = []
        self.finished = threading.Event()
        self._hook = on_event

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if self._hook is not None:
            self._hook(event)
        if isinstance(event, (ImageDoneEvent, EngineError)):
            self.finished.set()

    def wait(self, timeout: float = 120.0) -> Any:
        assert self.finished.wait(timeout), f"no result within {timeout}s; events so far: {self.events}"
        return self.events[-1]


def request(key: str, **fields: Any) -> ImageRequest:
    """A small, fast request: 64x64, 4 steps, a fixed seed unless given."""
    params: dict[str, Any] = dict(prompt="a knight in a forest", width=64, height=64, steps=4, seed=1234)
    params.update(fields)
    return ImageRequest(key=key, **params)


def generate(engine: ImageEngine, key: str, **fields: Any) -> Any:
    """Run one request to its end and return the final event."""
    collector = Collector()
    engine.submit(request(key, **fields), collector)
    return collector.wait()
