"""The WebSocket server: moves frames between sockets and `Session`s and performs their actions.

Also answers `GET /healthz` on the same port, refuses browser Origins that are not allowed
(HTTP 403) and malformed handshakes (HTTP 400), and 404s any other plain HTTP request.

Threads: everything here runs on the event loop. Engines and the intake post their work through
`_Inbox` (one lock-protected list, one wake-up of the loop per batch); the loop turns it into
messages, lets the connection's session see them, and encodes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge import messages as m
from bridge.codec import encode

from .service import Service
from .session import Action, Budget, Close, FrameStart, Send, Session, Start, Stop

__all__ = ["DaemonServer"]

log = logging.getLogger("loraloom.server")

_SHUTDOWN_CLOSE = 1001  # going away


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


def _text(status: HTTPStatus, message: str) -> Response:
    return _response(status, (message + "\n").encode(), "text/plain; charset=utf-8")


class _Inbox:
    """Work for the loop from other threads: (connection, make_message) pairs, drained in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, drain: Callable[[list[tuple[int, Any]]], None]) -> None:
        self._loop = loop
        self._drain = drain
        self._items: list[tuple[int, Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, conn: int, item: Any) -> None:  # any thread
        with self._lock:
            self._items.append((conn, item))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        self._drain(items)


@dataclass(eq=False)
class _Connection:
    ws: ServerConnection
    session: Session
    outbox: asyncio.Queue[bytes | Close] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None


class DaemonServer:
    def __init__(self, service: Service, *, token: str) -> None:
        self.service = service
        self.token = token
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._inbox: _Inbox | None = None
        self.host = ""
        self.port = 0

    async def start(self) -> None:
        s = self.service.settings
        self._inbox = _Inbox(asyncio.get_running_loop(), self._drain)
        self.service.on_adapter_event = lambda event: self._inbox.put(0, event) if self._inbox else None
        self._server = await serve(
            self._handle, s.host, s.port, process_request=self._process_request,
            max_size=4 * s.max_frame_bytes, compression=None, ping_interval=20, ping_timeout=60,
            server_header=None)
        sock = next(iter(self._server.sockets))
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def counts(self) -> dict[str, int]:
        sessions = [c.session for c in self._connections.values()]
        return {"connections": len(sessions), "subscriptions": sum(s.subscribed for s in sessions),
                "requests_in_flight": sum(len(s.inflight) for s in sessions)}

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end in-flight requests with `shutting_down`, send those answers, then close
        every connection (clients see close code 1001) and return."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        await asyncio.to_thread(self.service.stop)
        await asyncio.sleep(0)  # the answers the engines posted are drained into the outboxes
        connections = list(self._connections.values())
        for c in connections:
            c.outbox.put_nowait(Close(_SHUTDOWN_CLOSE, "the daemon is shutting down"))
        writers = [c.writer for c in connections if c.writer is not None]
        if writers:
            _, late = await asyncio.wait(writers, timeout=timeout)
            for c in connections:
                if c.writer in late:
                    c.ws.transport.abort()  # a client that does not read: do not wait for it
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    # ---------------------------------------------------------------- HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = json.dumps(self.service.health(**self.counts())).encode()
            return _response(HTTPStatus.OK, body, "application/json")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _text(HTTPStatus.NOT_FOUND, "not found: loraloom speaks WebSocket on / and HTTP on /healthz")
        try:
            origin = request.headers.get("Origin")
        except MultipleValuesError:
            log.warning("refused a WebSocket handshake with several Origin headers")
            return _text(HTTPStatus.BAD_REQUEST, "a handshake may carry one Origin header at most")
        allowed = self.service.settings.allowed_origins
        if origin is not None and origin not in allowed and "*" not in allowed:
            log.warning("refused a WebSocket handshake from browser origin %s", origin)
            return _text(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed (see the allowed_origins setting)")
        return None

    # ---------------------------------------------------------------- connections

    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = next(self._ids)
        peer = ws.remote_address[0] if ws.remote_address else "?"
        c = _Connection(ws, Session(self.service, conn_id, token=self.token, peer=str(peer)))
        c.writer = asyncio.create_task(self._write(c))
        self._connections[conn_id] = c
        try:
            async for frame in ws:
                self._perform(conn_id, c, c.session.receive(frame))
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection %d failed", conn_id)
        finally:
            self._perform(conn_id, c, c.session.closed())
            self._connections.pop(conn_id, None)
            if c.writer is not None and not c.writer.done():
                c.writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await c.writer
            log.debug("connection %d closed", conn_id)

    def _perform(self, conn_id: int, c: _Connection, actions: list[Action]) -> None:
        inbox = self._inbox
        assert inbox is not None
        for action in actions:
            if isinstance(action, Send):
                c.outbox.put_nowait(encode(action.message))
            elif isinstance(action, Close):
                c.outbox.put_nowait(action)
            elif isinstance(action, Start):
                self.service.submit(action.key, action.message, lambda make: inbox.put(conn_id, make))
            elif isinstance(action, Stop):
                self.service.cancel(action.key, action.kind)
            elif isinstance(action, FrameStart):
                self.service.budget.frame(action.game_ms)
            elif isinstance(action, Budget):
                reply = self.service.set_budget(action.conn, action.message)
                if reply is not None:
                    self._perform(conn_id, c, c.session.deliver(reply))

    def _drain(self, items: list[tuple[int, Any]]) -> None:
        """On the loop: what engines and the intake posted."""
        for conn_id, item in items:
            if isinstance(item, m.AdapterEvent):  # for every subscriber
                for cid, c in list(self._connections.items()):
                    self._perform(cid, c, c.session.deliver(item))
                continue
            target = self._connections.get(conn_id)
            if target is None:
                continue  # the connection went away meanwhile
            try:
                message: BaseModel | None = item()
            except Exception:  # a bug in a reply: log it, and keep serving the others in this batch
                log.exception("connection %d: building a reply failed", conn_id)
                continue
            if message is not None:
                self._perform(conn_id, target, target.session.deliver(message))

    async def _write(self, c: _Connection) -> None:
        try:
            while True:
                item = await c.outbox.get()
                if isinstance(item, Close):
                    await c.ws.close(item.code, item.reason)
                    return
                await c.ws.send(item)
        except ConnectionClosed:
            pass
