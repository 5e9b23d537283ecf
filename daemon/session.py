"""One client connection's protocol state, without sockets (sans-I/O).

`receive(frame)` takes what the client sent; everything the daemon answers goes out through the
`send` callback as protocol messages, and a wish to close the connection through `close`. Tests
drive a Session directly; the server only moves bytes.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bridge import messages as m
from bridge.codec import FrameError, decode_client
from bridge.errors import ErrorCode, LoraloomError

from .service import RequestKey, Service

__all__ = ["Session"]

log = logging.getLogger("loraloom.session")

CLOSE_POLICY = 1008


class Session:
    def __init__(self, service: Service, conn_id: int, *, token: str, send: Callable[[Any], None],
                 close: Callable[[int, str], None], peer: str = "?") -> None:
        self.service = service
        self.conn_id = conn_id
        self._token = token
        self._send = send
        self._close = close
        self.peer = peer
        self.client_name = "?"
        self.authenticated = False
        self._inflight: dict[str, str] = {}  # request id -> "text" | "image"
        self._lock = threading.Lock()
        self._closed = False

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _error(self, code: ErrorCode | str, message: str, request_id: str | None = None) -> None:
        self._send(m.Error(id=request_id, code=str(code), message=message))

    def receive(self, frame: bytes | str) -> None:
        """Handle one frame from the client. Never raises."""
        try:
            self._receive(frame)
        except Exception as exc:
            log.exception("session %d: handling a frame failed", self.conn_id)
            self._error(ErrorCode.INTERNAL, f"internal error: {exc}")

    def _receive(self, frame: bytes | str) -> None:
        if self._closed:
            return
        if isinstance(frame, str):
            self._error(ErrorCode.BAD_FRAME, "text frames are not accepted: send one msgpack map per binary frame")
            return
        limit = self.service.settings.max_frame_bytes
        if len(frame) > limit:
            self._error(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(frame)} bytes is above the limit of {limit}")
            return
        try:
            msg = decode_client(frame)
        except FrameError as exc:
            if not self.authenticated:
                self._refuse(exc.code, exc.message)
                return
            self._error(exc.code, exc.message, exc.request_id)
            return
        if not self.authenticated:
            self._handshake(msg)
            return
        if isinstance(msg, m.Generate | m.GenerateImage):
            self._start(msg)
        elif isinstance(msg, m.Cancel):
            with self._lock:
                kind = self._inflight.get(msg.id)
            if kind is None:
                self._error(ErrorCode.UNKNOWN_REQUEST, f"no request '{msg.id}' is in flight", msg.id)
            else:
                self.service.cancel(RequestKey(self.conn_id, msg.id), kind)
        elif isinstance(msg, m.ListAdapters):
            self._send(m.Adapters(id=msg.id, adapters=self.service.registry.list()))
        elif isinstance(msg, m.Subscribe):
            self.service.subscribe(self.conn_id, self._send)
            self._send(m.Adapters(id=msg.id, adapters=self.service.registry.list()))
        elif isinstance(msg, m.Ping):
            self._send(m.Pong(id=msg.id, server_time=time.time()))
        elif isinstance(msg, m.Hello):
            self._error(ErrorCode.BAD_MESSAGE, "'hello' was already received on this connection")

    def _refuse(self, code: ErrorCode | str, message: str) -> None:
        self._error(code, message)
        self._closed = True
        self._close(CLOSE_POLICY, str(code))

    def _handshake(self, msg: Any) -> None:
        if not isinstance(msg, m.Hello):
            self._refuse(ErrorCode.HANDSHAKE_REQUIRED, f"the first frame must be 'hello', not '{msg.type}'")
            return
        if msg.protocol != m.PROTOCOL_VERSION:
            self._refuse(ErrorCode.UNSUPPORTED_VERSION,
                         f"protocol {msg.protocol} is not supported; this daemon speaks {m.PROTOCOL_VERSION}")
            return
        if not hmac.compare_digest(msg.token.encode(), self._token.encode()):
            log.warning("session %d from %s: wrong token", self.conn_id, self.peer)
            self._refuse(ErrorCode.UNAUTHORIZED, "wrong or missing token (read it from the daemon's runtime file)")
            return
        self.authenticated = True
        self.client_name = msg.client
        log.info("session %d: %s connected from %s", self.conn_id, msg.client, self.peer)
        self._send(self.service.welcome())

    def _start(self, msg: m.Generate | m.GenerateImage) -> None:
        kind = "text" if isinstance(msg, m.Generate) else "image"
        with self._lock:
            if msg.id in self._inflight:
                self._error(ErrorCode.DUPLICATE_ID, f"request '{msg.id}' is already in flight", msg.id)
                return
            limit = self.service.settings.max_inflight_per_connection
            if len(self._inflight) >= limit:
                self._error(ErrorCode.TOO_MANY_REQUESTS, f"{limit} requests are already in flight on this "
                            "connection; wait for one to finish", msg.id)
                return
            self._inflight[msg.id] = kind
        key = RequestKey(self.conn_id, msg.id)

        def on_end() -> None:
            with self._lock:
                self._inflight.pop(msg.id, None)

        try:
            if isinstance(msg, m.Generate):
                self.service.submit_text(key, msg, self._send, on_end)
            else:
                self.service.submit_image(key, msg, self._send, on_end)
        except LoraloomError as exc:
            on_end()
            self._error(exc.code, exc.message, msg.id)

    def closed(self) -> None:
        """The connection is gone: cancel its requests and drop its subscription. Idempotent."""
        self._closed = True
        self.service.unsubscribe(self.conn_id)
        with self._lock:
            pending = list(self._inflight.items())
        for request_id, kind in pending:
            self.service.cancel(RequestKey(self.conn_id, request_id), kind)
