"""One client connection's protocol state, without sockets or threads (sans-I/O).

    actions = session.receive(frame)      # a frame the client sent
    actions = session.deliver(message)    # a message for this client (a request's event, an adapter event)
    actions = session.closed()            # the connection is gone

Each call returns the actions it calls for: `Send` a message, `Close` the connection, `Start` or
`Stop` a request, set or release the GPU budget (`Budget`), mark a game frame (`FrameStart`). The
server performs them (moving bytes, calling the service); the session only decides, from what it
knows: the handshake, the requests in flight, the subscription. Nothing here blocks, reads a file
or tokenises, and it is only ever called from the server's event loop.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel

from bridge import messages as m
from bridge.codec import FrameError, decode_client
from bridge.errors import ErrorCode

__all__ = ["CLOSE_POLICY", "Action", "Budget", "Close", "FrameStart", "RequestKey", "Send", "Session", "SessionView",
           "Start", "Stop"]

log = logging.getLogger("loraloom.session")

CLOSE_POLICY = 1008
Kind = Literal["text", "image"]


@dataclass(frozen=True)
class RequestKey:
    """Engines see requests under (connection, client id): ids are only unique per connection."""

    conn: int
    id: str


@dataclass(frozen=True)
class Send:
    message: BaseModel


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True)
class Start:
    key: RequestKey
    message: m.Generate | m.GenerateImage


@dataclass(frozen=True)
class Stop:
    key: RequestKey
    kind: Kind


@dataclass(frozen=True)
class Budget:
    """Set the daemon's GPU budget for this connection (`message`), or release it (None)."""

    conn: int
    message: m.SetBudget | None


@dataclass(frozen=True)
class FrameStart:
    """A frame of the game started (a `frame` message), with the game's measured GPU time of its last
    frame where it reports one."""

    conn: int
    game_ms: float | None = None


Action = Send | Close | Start | Stop | Budget | FrameStart


class SessionView(Protocol):
    """What a session reads from the daemon (cheap, in memory)."""

    def welcome(self) -> m.Welcome: ...

    def adapter_list(self) -> list[m.AdapterInfo]: ...

    def limits(self) -> m.Limits: ...


_FINAL = (m.Result, m.ImageResult, m.Error)


class Session:
    def __init__(self, view: SessionView, conn_id: int, *, token: str, peer: str = "?") -> None:
        self.view = view
        self.conn_id = conn_id
        self._token = token
        self.peer = peer
        self.client_name = "?"
        self.authenticated = False
        self.subscribed = False
        self.inflight: dict[str, Kind] = {}  # request id -> its kind
        self.set_budget = False  # this connection set the GPU budget (released when it closes)
        self._closed = False

    def receive(self, frame: bytes | str) -> list[Action]:
        """Handle one frame from the client. Never raises."""
        if self._closed:
            return []
        try:
            return self._receive(frame)
        except Exception as exc:
            log.exception("session %d: handling a frame failed", self.conn_id)
            return [_error(ErrorCode.INTERNAL, f"internal error: {exc}")]

    def deliver(self, message: BaseModel) -> list[Action]:
        """A message for this client from the daemon."""
        if self._closed:
            return []
        if isinstance(message, m.AdapterEvent):
            return [Send(message)] if self.subscribed else []
        if isinstance(message, _FINAL) and message.id is not None:
            self.inflight.pop(message.id, None)
        return [Send(message)]

    def closed(self) -> list[Action]:
        """The connection is gone: stop its requests. Idempotent."""
        self._closed = True
        pending, self.inflight = self.inflight, {}
        release: list[Action] = [Budget(self.conn_id, None)] if self.set_budget else []
        self.set_budget = False
        return [*release, *(Stop(RequestKey(self.conn_id, rid), kind) for rid, kind in pending.items())]

    # ---------------------------------------------------------------- frames

    def _receive(self, frame: bytes | str) -> list[Action]:
        if isinstance(frame, str):
            return [_error(ErrorCode.BAD_FRAME, "text frames are not accepted: send one msgpack map per binary frame")]
        limit = self.view.limits().max_frame_bytes
        if len(frame) > limit:
            return [_error(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(frame)} bytes is above the limit of {limit}")]
        try:
            msg = decode_client(frame)
        except FrameError as exc:
            if not self.authenticated:
                return self._refuse(exc.code, exc.message)
            return [_error(exc.code, exc.message, exc.request_id)]
        if not self.authenticated:
            return self._handshake(msg)
        if isinstance(msg, m.Generate | m.GenerateImage):
            return self._start(msg)
        if isinstance(msg, m.Cancel):
            kind = self.inflight.get(msg.id)
            if kind is None:
                return [_error(ErrorCode.UNKNOWN_REQUEST, f"no request '{msg.id}' is in flight", msg.id)]
            return [Stop(RequestKey(self.conn_id, msg.id), kind)]
        if isinstance(msg, m.ListAdapters):
            return [Send(m.Adapters(id=msg.id, adapters=self.view.adapter_list()))]
        if isinstance(msg, m.Subscribe):
            self.subscribed = True
            return [Send(m.Adapters(id=msg.id, adapters=self.view.adapter_list()))]
        if isinstance(msg, m.Ping):
            return [Send(m.Pong(id=msg.id, server_time=time.time()))]
        if isinstance(msg, m.Frame):
            return [FrameStart(self.conn_id, msg.game_ms)]
        if isinstance(msg, m.SetBudget):
            self.set_budget = True
            return [Budget(self.conn_id, msg)]
        return [_error(ErrorCode.BAD_MESSAGE, "'hello' was already received on this connection")]

    def _refuse(self, code: ErrorCode | str, message: str) -> list[Action]:
        self._closed = True
        return [_error(code, message), Close(CLOSE_POLICY, str(code))]

    def _handshake(self, msg: m.ClientMessage) -> list[Action]:
        if not isinstance(msg, m.Hello):
            return self._refuse(ErrorCode.HANDSHAKE_REQUIRED, f"the first frame must be 'hello', not '{msg.type}'")
        if msg.protocol != m.PROTOCOL_VERSION:
            return self._refuse(ErrorCode.UNSUPPORTED_VERSION,
                                f"protocol {msg.protocol} is not supported; this daemon speaks {m.PROTOCOL_VERSION}")
        if not hmac.compare_digest(msg.token.encode(), self._token.encode()):
            log.warning("session %d from %s: wrong token", self.conn_id, self.peer)
            return self._refuse(ErrorCode.UNAUTHORIZED,
                                "wrong or missing token (read it from the daemon's runtime file)")
        self.authenticated = True
        self.client_name = msg.client
        log.info("session %d: %s connected from %s", self.conn_id, msg.client, self.peer)
        return [Send(self.view.welcome())]

    def _start(self, msg: m.Generate | m.GenerateImage) -> list[Action]:
        if msg.id in self.inflight:
            return [_error(ErrorCode.DUPLICATE_ID, f"request '{msg.id}' is already in flight", msg.id)]
        limit = self.view.limits().max_inflight_per_connection
        if len(self.inflight) >= limit:
            return [_error(ErrorCode.TOO_MANY_REQUESTS, f"{limit} requests are already in flight on this "
                           "connection; wait for one to finish", msg.id)]
        self.inflight[msg.id] = "text" if isinstance(msg, m.Generate) else "image"
        return [Start(RequestKey(self.conn_id, msg.id), msg)]


def _error(code: ErrorCode | str, message: str, request_id: str | None = None) -> Send:
    return Send(m.Error(id=request_id, code=str(code), message=message))
