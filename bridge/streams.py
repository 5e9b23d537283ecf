"""The client side of a request in flight: its queue of events, and the streams a caller iterates
(`TextStream` for text, `ImageStream` for images, `AdapterEvents` for the adapter folder's news).

They hold their `Client` and use its private verbs (`_start`, `_next_event`, `_finish`); the client
owns the socket and routes each event to its request's queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import LoraloomError
from .messages import (
    AdapterEvent,
    Cancel,
    Chunk,
    Generate,
    GenerateImage,
    ImageProgress,
    ImageResult,
    Result,
    ServerMessage,
    Subscribe,
)

if TYPE_CHECKING:
    from .client import Client

__all__ = ["AdapterEvents", "ImageStream", "PendingRequest", "TextStream"]

E = TypeVar("E", Chunk, ImageProgress)
F = TypeVar("F", Result, ImageResult)


class PendingRequest:
    """The client side of one in-flight request: a queue of its events."""

    def __init__(self, request_id: str, message: Any = None) -> None:
        self.id = request_id
        self.message = message  # what was sent (a reconnect sends an unanswered generation again)
        self.queue: asyncio.Queue[ServerMessage | LoraloomError] = asyncio.Queue()
        self.done = False
        self.answered = False  # the daemon said something of it


class _Stream(Generic[E, F]):
    """One request's events: iterate for the progress events (E); `result` (F) once it ended."""

    _progress: type[E]
    _final: type[F]

    def __init__(self, client: Client, message: Generate | GenerateImage) -> None:
        self._client = client
        self._message = message
        self._request: PendingRequest | None = None
        self.result: F | None = None

    @property
    def id(self) -> str:
        return self._message.id

    async def _next(self) -> E:
        if self.result is not None:
            raise StopAsyncIteration
        if self._request is None:
            self._request = await self._client._start(self._message)
        event = await self._client._next_event(self._request)
        if isinstance(event, self._progress):
            return event
        if isinstance(event, self._final):
            self.result = event
            self._client._finish(self._request)
            raise StopAsyncIteration
        raise LoraloomError(f"unexpected event {event.type!r} for a {self._message.type!r} request")

    async def cancel(self) -> None:
        """Ask the daemon to stop; keep iterating to receive the `cancelled` result."""
        if self._request is not None and not self._request.done:
            await self._client._send_quietly(Cancel(id=self._request.id))

    async def aclose(self) -> None:
        """Cancel the request on the daemon if it is still running, and stop listening."""
        request = self._request
        if request is not None and not request.done and self.result is None:
            self._client._finish(request)
            await self._client._send_quietly(Cancel(id=request.id))

    async def _wait(self) -> F:
        while True:
            try:
                await self._next()
            except StopAsyncIteration:
                break
        assert self.result is not None
        return self.result


class TextStream(_Stream[Chunk, Result]):
    """The text of one generation as it arrives. Iterate for text pieces; `result` once done."""

    _progress = Chunk
    _final = Result

    def __init__(self, client: Client, message: Generate) -> None:
        super().__init__(client, message)
        self.chunks: list[Chunk] = []

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        chunk = await self._next()
        self.chunks.append(chunk)
        return chunk.text

    async def text(self) -> str:
        """Wait for the end and return the whole text."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result.text


class ImageStream(_Stream[ImageProgress, ImageResult]):
    """Progress events of one image request; `await` it (or iterate to the end) for the images."""

    _progress = ImageProgress
    _final = ImageResult

    def __aiter__(self) -> ImageStream:
        return self

    async def __anext__(self) -> ImageProgress:
        return await self._next()

    def __await__(self) -> Generator[Any, None, ImageResult]:
        return self._wait().__await__()


class AdapterEvents:
    """Adapter events of one connection, queued from creation on; `aclose()` stops queueing."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._queue: asyncio.Queue[AdapterEvent | LoraloomError] = asyncio.Queue()
        client._subscribers.append(self._queue)
        # Subscribe on the daemon right away (at the next await), not at the first iteration.
        self._subscription: asyncio.Future[Any] | None = None
        if not client._subscribed:
            client._subscribed = True
            self._subscription = asyncio.ensure_future(client._call(Subscribe(id=client.new_id())))

    def __aiter__(self) -> AdapterEvents:
        return self

    async def __anext__(self) -> AdapterEvent:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription
        item = await self._queue.get()
        if isinstance(item, LoraloomError):
            raise item
        return item

    async def aclose(self) -> None:
        if self._queue in self._client._subscribers:
            self._client._subscribers.remove(self._queue)
