"""The asyncio Python client of the daemon.

    async with bridge.connect() as client:          # finds the daemon through the runtime file
        async for text in client.generate("Hello", adapters=["pirate"]):
            print(text, end="")

Leaving the `async for` early cancels the request on the daemon. Errors raise the typed exceptions
of `bridge.errors`, each carrying the protocol error code. `Conversation` (bridge/conversation.py)
is a chat that keeps a persona and as many recent turns as the daemon's context holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as WsConnectionClosed

from .codec import FrameError, decode_server, encode
from .connection import ConnectionState, Opening, Reconnect, Target, open_connection, reopen
from .conversation import Conversation
from .errors import ConnectionClosed, LoraloomError, error_for_code
from .messages import (
    AdapterEvent,
    AdapterInfo,
    AdapterRef,
    Adapters,
    Budget,
    Cancel,
    ChatMessage,
    Error,
    Frame,
    FrameSync,
    Generate,
    GenerateImage,
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
from .streams import AdapterEvents, ImageStream, PendingRequest, TextStream

__all__ = ["AdapterEvents", "AdapterSpec", "Client", "Conversation", "ImageStream", "TextStream", "connect",
           "parse_adapter"]

AdapterSpec = str | tuple[str, float] | AdapterRef


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




class Client:
    """A connection to the daemon. Create it with `connect()`; with `reconnect=`, the same client
    opens a new connection when the daemon goes away and comes back (bridge/connection.py)."""

    def __init__(self, ws: ClientConnection, welcome: Welcome, *, target: Target | None = None,
                 reconnect: Reconnect | None = None, on_connection: ConnectionState | None = None) -> None:
        self._ws = ws
        self.welcome = welcome
        self._target, self._policy, self._on_connection = target, reconnect, on_connection
        self._requests: dict[str, PendingRequest] = {}
        self._subscribers: list[asyncio.Queue[AdapterEvent | LoraloomError]] = []
        self._subscribed = False
        self._budget: SetBudget | None = None  # sent again after a reconnect
        self._ids = itertools.count(1)
        self._closed: LoraloomError | None = None
        self._closing = False
        self._live = asyncio.Event()  # set while a connection is up (cleared while reconnecting)
        self._live.set()
        self.reconnects = 0
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def connected(self) -> bool:
        """True while a connection is up (False while reconnecting and once closed)."""
        return self._closed is None and self._live.is_set()

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
        message = SetBudget(
            id=self.new_id(), duty_cap=duty_cap, max_step_ms=max_step_ms,
            tokens_per_s=TokenRates.model_validate(tokens_per_s) if isinstance(tokens_per_s, dict) else tokens_per_s,
            frame_sync=FrameSync.model_validate(frame_sync) if isinstance(frame_sync, dict) else frame_sync)
        reply = await self._call(message)
        assert isinstance(reply, Budget)
        self._budget = message
        return reply

    async def frame(self, game_ms: float | None = None) -> None:
        """A frame of the game starts now (for a `frame_sync` budget; no answer), with the GPU time
        the game's own work took in its last frame where the game measures it (`game_ms`: then the
        daemon sizes the game's part of a frame from these reports). While reconnecting it is
        dropped (the budget pauses itself without frames, and is sent again on reconnect)."""
        if self._closed is not None:
            raise self._closed
        if self._live.is_set():
            with contextlib.suppress(WsConnectionClosed):
                await self._ws.send(encode(Frame(game_ms=game_ms)))

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
        """Close the connection (and stop reconnecting); idempotent."""
        self._closing = True
        if self._closed is None:
            self._closed = ConnectionClosed("the client closed its connection")
        self._live.set()  # nothing waits for a reconnect any more
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

    async def _start(
            self, message: Generate | GenerateImage | ListAdapters | Ping | Subscribe | SetBudget) -> PendingRequest:
        if self._closed is None and not self._live.is_set() and self._policy is not None:
            # Reconnecting: wait for the new connection (at most the policy's time; the reader then closes).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._live.wait(), self._policy.timeout)
        if self._closed is not None:
            raise self._closed
        request = PendingRequest(message.id, message)
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

    async def _next_event(self, request: PendingRequest) -> ServerMessage:
        item = await request.queue.get()
        if isinstance(item, LoraloomError):
            self._finish(request)
            raise item
        return item

    def _finish(self, request: PendingRequest) -> None:
        request.done = True
        self._requests.pop(request.id, None)

    async def _send_quietly(self, message: Cancel | Subscribe | SetBudget) -> None:
        with contextlib.suppress(WsConnectionClosed):
            await self._ws.send(encode(message))

    async def _read_loop(self) -> None:
        while True:
            reason = await self._read_until_closed()
            again = self._policy is not None and self._target is not None and not self._closing
            # A generation the daemon said nothing of yet (queued there, no output seen) is sent again on
            # the next connection, as the plugins do; anything else died with the connection.
            resend = [r for r in self._requests.values()
                      if again and not r.answered and isinstance(r.message, Generate | GenerateImage)]
            for request in list(self._requests.values()):
                if request not in resend:
                    request.queue.put_nowait(reason)
            if not again:
                break
            try:
                failure = await self._reconnect(resend)
            except Exception as exc:  # never leave the reader dead with requests waiting on it
                failure = ConnectionClosed(f"reconnecting to the daemon failed: {type(exc).__name__}: {exc}")
            if failure is not None:
                for request in resend:
                    request.queue.put_nowait(failure)
                reason = failure
                break
        if self._closed is None:
            self._closed = reason
        self._live.set()  # requests waiting for a reconnect wake up and meet `_closed`
        for queue in self._subscribers:
            queue.put_nowait(self._closed)
        if self._policy is not None and not self._closing:
            self._notify("closed")

    async def _read_until_closed(self) -> LoraloomError:
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
            return ConnectionClosed(f"connection to the daemon closed: {exc}")
        return ConnectionClosed("connection to the daemon closed")

    async def _reconnect(self, resend: list[PendingRequest]) -> ConnectionClosed | None:
        """Open a new connection and send `resend` again (None), or give up after the policy's time (why)."""
        assert self._policy is not None and self._target is not None
        self._live.clear()
        self._notify("disconnected")
        try:
            self._ws, self.welcome = await reopen(self._target, self._policy)
        except ConnectionClosed as exc:
            return exc
        # What this client had set up on the old connection: its subscription and its budget (their
        # replies carry ids no request waits for, so the reader drops them).
        if self._subscribed:
            await self._send_quietly(Subscribe(id=self.new_id()))
        if self._budget is not None:
            await self._send_quietly(self._budget.model_copy(update={"id": self.new_id()}))
        for request in resend:
            if not request.done:  # its caller may have given up meanwhile
                try:
                    await self._ws.send(encode(request.message))
                except WsConnectionClosed as exc:
                    request.queue.put_nowait(ConnectionClosed(f"connection to the daemon closed: {exc}"))
        self.reconnects += 1
        self._live.set()
        self._notify("reconnected")
        return None

    def _notify(self, state: str) -> None:
        if self._on_connection is not None:
            self._on_connection(state)

    def _dispatch(self, event: ServerMessage) -> None:
        if isinstance(event, AdapterEvent):
            for queue in self._subscribers:
                queue.put_nowait(event)
            return
        request_id = getattr(event, "id", None)
        request = self._requests.get(request_id) if request_id else None
        if request is None:
            return
        request.answered = True
        if isinstance(event, Error):
            request.queue.put_nowait(error_for_code(event.code, event.message))
        else:
            request.queue.put_nowait(event)




def connect(
    url: str | None = None,
    token: str | None = None,
    *,
    client_name: str = "python",
    runtime_file: Path | None = None,
    open_timeout: float = 10.0,
    reconnect: bool | float | Reconnect = False,
    on_connection: ConnectionState | None = None,
) -> Opening[Client]:
    """Connect to a daemon: explicit `url`/`token`, or those of the runtime file (read again at each
    reconnect, so a restarted daemon on a new port is found). `reconnect`: True (keep trying for 30
    s), a number of seconds, or a `Reconnect` policy; `on_connection` is called with "disconnected",
    "reconnected" and "closed" (when reconnecting gave up)."""
    policy = (reconnect if isinstance(reconnect, Reconnect) else Reconnect() if reconnect is True
              else Reconnect(timeout=float(reconnect)) if reconnect else None)
    target = Target(url, token, client_name, runtime_file, open_timeout)

    async def open_client() -> Client:
        ws, welcome = await open_connection(target)
        return Client(ws, welcome, target=target, reconnect=policy, on_connection=on_connection)
    return Opening(open_client)
