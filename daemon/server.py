"""The WebSocket server: moves frames between sockets and `Session`s, nothing more.

Also answers `GET /healthz` on the same port, refuses browser Origins that are not allowed
(HTTP 403), and 404s any other plain HTTP request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.codec import encode

from .service import Service
from .session import Session

__all__ = ["DaemonServer"]

log = logging.getLogger("loraloom.server")

_CLOSE = object()


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


class DaemonServer:
    def __init__(self, service: Service, *, token: str) -> None:
        self.service = service
        self.token = token
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._sessions: dict[int, Session] = {}
        self.host = ""
        self.port = 0

    async def start(self) -> None:
        s = self.service.settings
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

    async def stop(self) -> None:
        """Stop accepting, end in-flight requests with `shutting_down`, then close connections."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        await asyncio.to_thread(self.service.stop)
        await asyncio.sleep(0.05)  # let the writers flush the shutting_down errors
        self._server.close(close_connections=True)
        await self._server.wait_closed()
        self._server = None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = json.dumps(self.service.health()).encode()
            return _response(HTTPStatus.OK, body, "application/json")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _response(HTTPStatus.NOT_FOUND, b"not found: loraloom speaks WebSocket on / and HTTP on /healthz\n",
                             "text/plain; charset=utf-8")
        origin = request.headers.get("Origin")
        allowed = self.service.settings.allowed_origins
        if origin is not None and origin not in allowed and "*" not in allowed:
            log.warning("refused a WebSocket handshake from browser origin %s", origin)
            return _response(HTTPStatus.FORBIDDEN,
                             f"origin {origin} is not allowed (see the allowed_origins setting)\n".encode(),
                             "text/plain; charset=utf-8")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()
        conn_id = next(self._ids)

        def send(message: Any) -> None:  # any thread
            frame = encode(message)
            loop.call_soon_threadsafe(out.put_nowait, frame)

        def close(code: int, reason: str) -> None:
            loop.call_soon_threadsafe(out.put_nowait, (_CLOSE, code, reason))

        peer = ws.remote_address[0] if ws.remote_address else "?"
        session = Session(self.service, conn_id, token=self.token, send=send, close=close, peer=str(peer))
        self._sessions[conn_id] = session
        writer = asyncio.create_task(self._write(ws, out))
        try:
            async for frame in ws:
                session.receive(frame)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection %d failed", conn_id)
        finally:
            session.closed()
            self._sessions.pop(conn_id, None)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            log.debug("connection %d closed", conn_id)

    async def _write(self, ws: ServerConnection, out: asyncio.Queue[Any]) -> None:
        try:
            while True:
                item = await out.get()
                if isinstance(item, tuple) and item and item[0] is _CLOSE:
                    await ws.close(item[1], item[2])
                    return
                await ws.send(item)
        except ConnectionClosed:
            pass
