"""Engine events -> wire messages, one `*Replies` object per request (it counts the chunks).

Called on the server's event loop for each event an engine posted. An event that cannot be turned
into a message becomes an `internal` error for its request, so the client is answered instead of
waiting forever. Engines speak `EngineErrorCode`; `WIRE_CODES` maps those to the protocol's codes.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from bridge import messages as m
from bridge.errors import ErrorCode

from .engines.base import EngineError, EngineErrorCode
from .structured import OutputPlan

__all__ = ["WIRE_CODES", "ImageReplies", "TextReplies", "cancelled_before_start", "error_message"]

log = logging.getLogger("loraloom")

WIRE_CODES = {
    EngineErrorCode.INVALID: ErrorCode.INVALID_PARAMETER,
    EngineErrorCode.PROMPT_TOO_LONG: ErrorCode.PROMPT_TOO_LONG,
    EngineErrorCode.ADAPTER: ErrorCode.ADAPTER_UNAVAILABLE,
    EngineErrorCode.DUPLICATE: ErrorCode.DUPLICATE_ID,
    EngineErrorCode.STOPPED: ErrorCode.SHUTTING_DOWN,
    EngineErrorCode.UNAVAILABLE: ErrorCode.MODEL_UNAVAILABLE,
    EngineErrorCode.FAILED: ErrorCode.INTERNAL,
}


def error_message(request_id: str, code: ErrorCode | str, message: str) -> m.Error:
    return m.Error(id=request_id, code=str(code), message=message)


def cancelled_before_start(request_id: str, msg: m.Generate | m.GenerateImage) -> BaseModel:
    """The result of a request cancelled before it reached an engine."""
    timings = m.Timings(queued_ms=0.0, total_ms=0.0)
    if isinstance(msg, m.Generate):
        return m.Result(id=request_id, text="", finish_reason="cancelled", prompt_tokens=0, completion_tokens=0,
                        timings=timings)
    return m.ImageResult(id=request_id, images=[], seed=msg.seed or 0, width=msg.width, height=msg.height,
                         finish_reason="cancelled", timings=timings)


class _Replies:
    def __init__(self, request_id: str) -> None:
        self.id = request_id

    def __call__(self, event: Any) -> BaseModel | None:
        try:
            if isinstance(event, EngineError):
                return error_message(self.id, WIRE_CODES.get(event.code, ErrorCode.INTERNAL), event.message)
            return self.convert(event)
        except Exception as exc:
            log.exception("request %s: turning %s into a message failed", self.id, type(event).__name__)
            return error_message(self.id, ErrorCode.INTERNAL, f"internal error: {exc}")

    def convert(self, event: Any) -> BaseModel | None:
        raise NotImplementedError


class TextReplies(_Replies):
    def __init__(self, request_id: str, *, dropped_messages: int = 0, output: OutputPlan | None = None) -> None:
        super().__init__(request_id)
        self.chunks = 0
        self.dropped_messages = dropped_messages
        self.output = output

    def convert(self, event: Any) -> BaseModel | None:
        from .engines.text.request import TextChunkEvent

        if isinstance(event, TextChunkEvent):
            self.chunks += 1
            return m.Chunk(id=self.id, text=event.text, index=self.chunks - 1, tokens=event.tokens)
        first, total = event.first_token_ms, event.total_ms
        rate = None
        if event.completion_tokens > 1 and first is not None and total > first:
            rate = round((event.completion_tokens - 1) / ((total - first) / 1000), 2)
        value: Any = None
        calls: list[m.ToolCall] = []
        if self.output is not None and event.constraint is not None:
            value, calls = self.output.parse(event.text, event.constraint == "satisfied")
        return m.Result(
            constraint=event.constraint, json=value, tool_calls=calls,
            id=self.id, text=event.text, finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens, adapter_versions=event.adapter_versions,
            dropped_messages=self.dropped_messages, cached_tokens=event.cached_tokens,
            timings=m.Timings(queued_ms=round(event.queued_ms, 3),
                              first_token_ms=None if first is None else round(first, 3),
                              total_ms=round(total, 3), tokens_per_s=rate))


class ImageReplies(_Replies):
    def convert(self, event: Any) -> BaseModel | None:
        from .engines.image.request import ImageProgressEvent

        if isinstance(event, ImageProgressEvent):
            return m.ImageProgress(id=self.id, step=event.step, total=event.total)
        t = event.timings
        return m.ImageResult(
            id=self.id, images=list(event.images), seed=event.seed, width=event.width, height=event.height,
            finish_reason=event.finish_reason, adapter_versions=dict(event.adapter_versions),
            timings=m.Timings(queued_ms=round(t.queued_ms, 3),
                              first_token_ms=None if t.first_step_ms is None else round(t.first_step_ms, 3),
                              total_ms=round(t.total_ms, 3)))
