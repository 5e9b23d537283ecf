"""The asyncio Python client of the daemon.

    async with bridge.connect() as client:          # finds the daemon through the runtime file
        async for text in client.generate("Hello", adapters=["pirate"]):
            print(text, end="")

Leaving the `async for` early cancels the request on the daemon. Errors raise the typed exceptions
of `bridge.errors`, each carrying the protocol error code. `Conversation` is a chat that keeps a
persona and as many recent turns as the daemon's context holds (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidStatus

from .codec import FrameError, decode_server, encode
from .discovery import read_runtime_file
from .errors import AuthError, ConnectionClosed, DaemonNotFound, LoraloomError, error_for_code
from .messages import (
    PROTOCOL_VERSION,
    AdapterEvent,
    AdapterInfo,
    AdapterRef,
    Adapters,
    Budget,
    Cancel,
    ChatMessage,
    Chunk,
    Error,
    Frame,
    FrameSync,
    Generate,
    GenerateImage,
    Hello,
    ImageProgress,
    ImageResult,
    ListAdapters,
    Ping,
    Pong,
    Result,
    ServerMessage,
    SetBudget,
    Subscribe,
    TokenRates,
    Tool,
    Welcome,
)

__all__ = ["AdapterEvents", "AdapterSpec", "Client", "Conversation", "ImageStream", "TextStream", "connect",
           "parse_adapter"]

AdapterSpec = str | tuple[str, float] | AdapterRef
E = TypeVar("E", Chunk, ImageProgress)
F = TypeVar("F", Result, ImageResult)


def parse_adapter(spec: AdapterSpec) -> AdapterRef:
    """`"name"`, `"name:0.5"`, `("name", 0.5)` or an AdapterRef -> AdapterRef.

    Adapter names never hold a colon, so what follows one must be the scale (ValueError if not)."""
    if isinstance(spec, AdapterRef):
        return spec
    if isinstance(spec, tuple):
        return AdapterRef(name=spec[0], scale=spec[1])
    name, sep, scale = spec.rpartition(":")
    if not sep:
        return AdapterRef(name=spec)
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"adapter '{spec}': the scale '{scale}' is not a number (write NAME or NAME:SCALE)") from None
    return AdapterRef(name=name, scale=value)


class _Request:
    """The client side of one in-flight request: a queue of its events."""

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.queue: asyncio.Queue[ServerMessage | LoraloomError] = asyncio.Queue()
        self.done = False


class _Stream(Generic[E, F]):
    """One request's events: iterate for the progress events (E); `result` (F) once it ended."""

    _progress: type[E]
    _final: type[F]

    def __init__(self, client: Client, message: Generate | GenerateImage) -> None:
        self._client = client
        self._message = message
        self._request: _Request | None = None
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


class Client:
    """One connection to the daemon. Create it with `connect()`."""

    def __init__(self, ws: ClientConnection, welcome: Welcome) -> None:
        self._ws = ws
        self.welcome = welcome
        self._requests: dict[str, _Request] = {}
        self._subscribers: list[asyncio.Queue[AdapterEvent | LoraloomError]] = []
        self._subscribed = False
        self._ids = itertools.count(1)
        self._closed: LoraloomError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # ------------------------------------------------------------ public API

    def new_id(self) -> str:
        return f"py-{next(self._ids)}"

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | dict[str, str]] | None = None,
        system: str | None = None,
        adapters: Iterable[AdapterSpec] = (),
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: bool = True,
        priority: Literal["player", "normal", "background"] = "normal",
        trim_history: bool = False,
        json_schema: dict[str, Any] | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        grammar: str | None = None,
        tools: Sequence[Tool | dict[str, Any]] | None = None,
        tool_choice: str = "auto",
        request_id: str | None = None,
    ) -> TextStream:
        """Start a generation. With `system`, `prompt` becomes a chat turn (chat template).

        At most one constraint: `json_schema` (the result's `.json` holds the parsed value), `regex`,
        `choices` or `grammar` (Lark); or `tools` (function definitions: name, description, JSON Schema
        parameters) with `tool_choice` auto, required, none or a tool's name, and the call in the
        result's `.tool_calls`."""
        chat: list[ChatMessage] | None = None
        if messages is not None:
            chat = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
        if system is not None:
            chat = [ChatMessage(role="system", content=system), *(chat or [])]
            if prompt is not None:
                chat.append(ChatMessage(role="user", content=prompt))
                prompt = None
        message = Generate(
            id=request_id or self.new_id(),
            adapters=[parse_adapter(a) for a in adapters],
            prompt=prompt,
            messages=chat,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=list(stop),
            stream=stream,
            priority=priority,
            trim_history=trim_history,
            json_schema=json_schema,
            regex=regex,
            choices=None if choices is None else list(choices),
            grammar=grammar,
            tools=None if tools is None else [t if isinstance(t, Tool) else Tool.model_validate(t) for t in tools],
            tool_choice=tool_choice,
        )
        return TextStream(self, message)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """Generate without streaming and return the final `Result`."""
        stream = self.generate(prompt, stream=False, **kwargs)
        async for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def generate_image(
        self,
        prompt: str,
        *,
        adapters: Iterable[AdapterSpec] = (),
        negative_prompt: str | None = None,
        width: int = 512,
        height: int = 512,
        steps: int = 20,
        guidance: float = 7.5,
        seed: int | None = None,
        count: int = 1,
        request_id: str | None = None,
    ) -> ImageStream:
        """Start an image request: iterate for progress, or `await` it for the result."""
        message = GenerateImage(
            id=request_id or self.new_id(),
            prompt=prompt,
            negative_prompt=negative_prompt,
            adapters=[parse_adapter(a) for a in adapters],
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            count=count,
        )
        return ImageStream(self, message)

    async def adapters(self) -> list[AdapterInfo]:
        """The daemon's current adapters."""
        reply = await self._call(ListAdapters(id=self.new_id()))
        assert isinstance(reply, Adapters)
        return reply.adapters

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        reply = await self._call(Ping(id=self.new_id()))
        assert isinstance(reply, Pong)
        return time.perf_counter() - start

    async def set_budget(self, *, duty_cap: float | None = None,
                         tokens_per_s: TokenRates | dict[str, float] | None = None,
                         frame_sync: FrameSync | dict[str, float] | None = None,
                         max_step_ms: float | None = None) -> Budget:
        """Limit the GPU time the daemon takes while this client is connected (nothing given: no
        budget). With `frame_sync`, call `frame()` at the start of every frame."""
        reply = await self._call(SetBudget(
            id=self.new_id(), duty_cap=duty_cap, max_step_ms=max_step_ms,
            tokens_per_s=TokenRates.model_validate(tokens_per_s) if isinstance(tokens_per_s, dict) else tokens_per_s,
            frame_sync=FrameSync.model_validate(frame_sync) if isinstance(frame_sync, dict) else frame_sync))
        assert isinstance(reply, Budget)
        return reply

    async def frame(self) -> None:
        """A frame of the game starts now (for a `frame_sync` budget; no answer)."""
        if self._closed is not None:
            raise self._closed
        await self._ws.send(encode(Frame()))

    def events(self) -> AdapterEvents:
        """Adapter events from this call on (subscribes on first use): `async for e in client.events()`."""
        return AdapterEvents(self)

    async def subscribe(self) -> list[AdapterInfo]:
        """Subscribe to adapter events explicitly; returns the current list."""
        self._subscribed = True
        reply = await self._call(Subscribe(id=self.new_id()))
        assert isinstance(reply, Adapters)
        return reply.adapters

    async def close(self) -> None:
        """Close the connection; idempotent."""
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ plumbing

    async def _start(self, message: Generate | GenerateImage | ListAdapters | Ping | Subscribe | SetBudget) -> _Request:
        if self._closed is not None:
            raise self._closed
        request = _Request(message.id)
        self._requests[message.id] = request
        try:
            await self._ws.send(encode(message))
        except WsConnectionClosed as exc:
            self._finish(request)
            raise ConnectionClosed(f"connection to the daemon closed: {exc}") from None
        return request

    async def _call(self, message: ListAdapters | Ping | Subscribe | SetBudget) -> ServerMessage:
        request = await self._start(message)
        try:
            return await self._next_event(request)
        finally:
            self._finish(request)

    async def _next_event(self, request: _Request) -> ServerMessage:
        item = await request.queue.get()
        if isinstance(item, LoraloomError):
            self._finish(request)
            raise item
        return item

    def _finish(self, request: _Request) -> None:
        request.done = True
        self._requests.pop(request.id, None)

    async def _send_quietly(self, message: Cancel) -> None:
        with contextlib.suppress(WsConnectionClosed):
            await self._ws.send(encode(message))

    async def _read_loop(self) -> None:
        reason: LoraloomError = ConnectionClosed("connection to the daemon closed")
        try:
            async for frame in self._ws:
                if isinstance(frame, str):
                    continue
                try:
                    event = decode_server(frame)
                except FrameError:
                    continue  # a newer daemon's message we do not know: ignore it
                self._dispatch(event)
        except WsConnectionClosed as exc:
            reason = ConnectionClosed(f"connection to the daemon closed: {exc}")
        finally:
            self._closed = reason
            for request in list(self._requests.values()):
                request.queue.put_nowait(reason)
            for queue in self._subscribers:
                queue.put_nowait(reason)

    def _dispatch(self, event: ServerMessage) -> None:
        if isinstance(event, AdapterEvent):
            for queue in self._subscribers:
                queue.put_nowait(event)
            return
        request_id = getattr(event, "id", None)
        request = self._requests.get(request_id) if request_id else None
        if request is None:
            return
        if isinstance(event, Error):
            request.queue.put_nowait(error_for_code(event.code, event.message))
        else:
            request.queue.put_nowait(event)


_ROLES = ("system", "user", "assistant")
# Client.generate arguments a conversation sets itself.
_CONVERSATION_OWN = frozenset({"prompt", "messages", "system", "trim_history", "stream", "request_id"})


def _chat_message(message: ChatMessage | dict[str, str]) -> dict[str, str]:
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
    if role not in _ROLES or not isinstance(content, str):
        raise ValueError(f"not a chat message: {message!r} (expected {{'role': {'|'.join(_ROLES)}, 'content': str}})")
    return {"role": str(role), "content": content}


class Conversation:
    """A persona (system prompt) and the recent turns of one chat, for a game script.

        meg = Conversation(client, system_prompt="You are Meg, a pirate.", adapters=["pirate"], max_tokens=64)
        reply = await meg.ask("Where is the rum?")
        save["meg"] = meg.to_json()                  # {"system_prompt": ..., "history": [...]}
        meg.load_json(save["meg"])

    `ask` sends the persona, the whole history and the new line with `trim_history=True`. When they
    do not fit the daemon's context with room for the reply, the daemon leaves out the oldest whole
    turns, counted in its own tokens, cutting down to 3/4 of the budget so the following turns keep
    the same prefix (and its cached keys and values); the conversation then forgets the same
    messages (`result.dropped_messages`, counted after the leading system messages). The persona
    and system messages at the start of the history are never dropped. Asks on one conversation run
    one at a time in the order they were made, each sent with the exchanges before it. A failed or
    cancelled ask leaves the history as it was; so does an answer that arrives after `history` was
    replaced (a save game loaded meanwhile). Keyword arguments are `Client.generate`'s (adapters,
    max_tokens, temperature, priority, ...), used for every ask.
    """

    def __init__(self, client: Client, *, system_prompt: str = "",
                 history: Iterable[ChatMessage | dict[str, str]] = (), **settings: Any) -> None:
        if clash := sorted(_CONVERSATION_OWN & settings.keys()):
            raise TypeError(f"a Conversation sets {clash} itself")
        self.client = client
        self.system_prompt = system_prompt
        self.settings = settings
        self.last_result: Result | None = None
        self._history: list[dict[str, str]] = []
        self._generation = 0
        self._turn = asyncio.Lock()
        self.history = list(history)

    @property
    def history(self) -> list[dict[str, str]]:
        """The turns so far, oldest first, as `{"role": ..., "content": ...}` (a copy)."""
        return [dict(m) for m in self._history]

    @history.setter
    def history(self, messages: Iterable[ChatMessage | dict[str, str]]) -> None:
        self._history = [_chat_message(m) for m in messages]
        self._generation += 1

    def messages(self, text: str) -> list[dict[str, str]]:
        """What `ask(text)` sends: the persona, the history and the new line."""
        persona = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*persona, *self.history, {"role": "user", "content": text}]

    async def ask(self, text: str, *, on_chunk: Callable[[str], None] | None = None) -> str:
        """Say `text` and return the reply; `on_chunk` gets its text as it streams."""
        async with self._turn:
            generation = self._generation
            stream = self.client.generate(messages=self.messages(text), trim_history=True,
                                          stream=on_chunk is not None, **self.settings)
            try:
                async for chunk in stream:
                    if on_chunk is not None:
                        on_chunk(chunk)
            finally:
                await stream.aclose()
            result = stream.result
            assert result is not None
            self.last_result = result
            if generation == self._generation:
                lead = next((i for i, m in enumerate(self._history) if m["role"] != "system"), len(self._history))
                del self._history[lead:lead + result.dropped_messages]
                self._history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
            return result.text

    def clear(self) -> None:
        """Forget the turns (the persona stays)."""
        self.history = []

    def to_json(self) -> str:
        """The persona and the history as plain JSON, for a save game (the plugins read the same form)."""
        return json.dumps({"system_prompt": self.system_prompt, "history": self._history}, ensure_ascii=False)

    def load_json(self, text: str) -> None:
        """Restore what `to_json` wrote; ValueError (and nothing changed) when `text` is not such a save."""
        data = json.loads(text)
        if (not isinstance(data, dict) or not isinstance(data.get("history"), list)
                or not isinstance(data.get("system_prompt", ""), str)):
            raise ValueError('not a saved conversation: expected {"system_prompt": str, "history": [...]}')
        history = [_chat_message(m) for m in data["history"]]
        self.system_prompt = data.get("system_prompt", "")
        self.history = history


class _Connect:
    """`await connect(...)` or `async with connect(...) as client`."""

    def __init__(self, url: str | None, token: str | None, client_name: str,
                 runtime_file: Path | None, open_timeout: float) -> None:
        self._args = (url, token, client_name, runtime_file, open_timeout)
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()

    async def _open(self) -> Client:
        url, token, client_name, runtime_file, open_timeout = self._args
        if url is None or token is None:
            info = read_runtime_file(runtime_file)
            url = url or info.url
            token = token if token is not None else info.token
        try:
            ws = await ws_connect(url, open_timeout=open_timeout, max_size=None,
                                  compression=None, user_agent_header=f"loraloom-python/{client_name}")
        except InvalidStatus as exc:
            raise AuthError(f"the daemon refused the connection: HTTP {exc.response.status_code}") from None
        except (OSError, TimeoutError) as exc:
            raise DaemonNotFound(f"cannot reach the daemon at {url}: {exc}") from None
        try:
            await ws.send(encode(Hello(protocol=PROTOCOL_VERSION, token=token, client=client_name)))
            first = decode_server(await asyncio.wait_for(ws.recv(), open_timeout))  # type: ignore[arg-type]
        except WsConnectionClosed as exc:
            raise ConnectionClosed(f"the daemon closed the connection during the handshake: {exc}") from None
        except BaseException:
            await ws.close()
            raise
        if isinstance(first, Error):
            await ws.close()
            raise error_for_code(first.code, first.message)
        if not isinstance(first, Welcome):
            await ws.close()
            raise LoraloomError(f"expected 'welcome', got {first.type!r}")
        return Client(ws, first)


def connect(
    url: str | None = None,
    token: str | None = None,
    *,
    client_name: str = "python",
    runtime_file: Path | None = None,
    open_timeout: float = 10.0,
) -> _Connect:
    """Connect to a daemon: explicit `url`/`token`, or those of the runtime file."""
    return _Connect(url, token, client_name, runtime_file, open_timeout)
