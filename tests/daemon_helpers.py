"""Raw-frame helpers for talking to a daemon below the Python client."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from bridge import codec
from bridge import messages as m


async def raw_connect(url: str, token: str | None, **kwargs: Any) -> ClientConnection:
    """A WebSocket after a successful hello/welcome (or none if token is None)."""
    ws = await connect(url, max_size=None, **kwargs)
    if token is not None:
        await ws.send(codec.encode(m.Hello(protocol=m.PROTOCOL_VERSION, token=token, client="test")))
        welcome = codec.decode_server(await asyncio.wait_for(ws.recv(), 10))
        assert welcome.type == "welcome", welcome
    return ws


async def send(ws: ClientConnection, value: dict[str, Any] | bytes) -> None:
    await ws.send(value if isinstance(value, bytes) else msgpack.packb(value))


async def recv(ws: ClientConnection, timeout: float = 30) -> Any:
    return codec.decode_server(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws: ClientConnection, pred: Any, timeout: float = 30) -> list[Any]:
    """Receive events until one satisfies pred; return them all."""
    got = []
    while True:
        event = await recv(ws, timeout)
        got.append(event)
        if pred(event):
            return got


def health(url: str) -> dict[str, Any]:
    http = url.replace("ws://", "http://") + "/healthz"
    with urllib.request.urlopen(http, timeout=10) as r:
        return json.loads(r.read())
