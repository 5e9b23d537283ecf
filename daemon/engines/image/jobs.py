"""The image engine's bookkeeping of one request (`Job`) and of each image it asked for (`Image`)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..base import EventSink
from .calls import png
from .checks import Checked
from .request import ImageDoneEvent, ImageProgressEvent, ImageRequest, ImageTimings

__all__ = ["Image", "Job"]


def _ms(since: float, now: float) -> float:
    return round((now - since) * 1000.0, 3)


@dataclass(eq=False)
class Job:
    request: ImageRequest
    on_event: EventSink
    arrived: float
    checked: Checked = field(default_factory=lambda: Checked(seed=None))
    started: float | None = None
    first_step: float | None = None
    done: bool = False
    results: dict[int, Any] = field(default_factory=dict)  # image index -> PIL image, as calls finish
    calls_done: int = 0  # pipeline calls that held images of this request
    calls_total: int = 1  # calls_done + the current call + the calls its queued images wait for

    @property
    def key(self) -> Hashable:
        return self.request.key

    def progress(self, i: int, per_call: int, now: float) -> ImageProgressEvent:
        """The event for step i of the current call: a request that takes several calls counts the
        steps of all of them (those done, this one and those its queued images wait for)."""
        if self.first_step is None:
            self.first_step = now
        step = self.calls_done * per_call + i + 1
        return ImageProgressEvent(self.key, step, max(step, self.calls_total * per_call))

    def pngs(self) -> list[bytes]:
        return [png(self.results[i]) for i in range(self.request.count)]

    def done_event(self, images: list[bytes], reason: Literal["stop", "cancelled"], now: float) -> ImageDoneEvent:
        started = self.started if self.started is not None else now
        return ImageDoneEvent(
            key=self.key, images=images, seed=self.checked.seed if self.checked.seed is not None else 0,
            width=self.request.width, height=self.request.height, finish_reason=reason,
            adapter_versions={v.name: v.number for v, _ in self.request.adapters},
            timings=ImageTimings(queued_ms=_ms(self.arrived, started),
                                 first_step_ms=None if self.first_step is None else _ms(self.arrived, self.first_step),
                                 total_ms=_ms(self.arrived, now)))


@dataclass(eq=False)
class Image:
    """One image of a request: image `index` has seed `job.checked.seed + index`."""

    job: Job
    index: int
    seed: int
