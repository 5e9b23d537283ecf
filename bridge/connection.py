"""Opening a WebSocket to the daemon and the protocol handshake; and, for a client that asks for it,
opening it again after it drops.

A game's tool or test harness outlives daemon restarts: a designer restarts the daemon on a new
model, or it is killed and started again by a launcher, and gets a new port and token in its
runtime file. `Target` remembers how the first connection was found (explicit url and token, or the
runtime file), so a reconnect reads the runtime file again and finds the new daemon. `Reconnect` is
the policy: how long to keep trying, with delays doubling from `first_delay` to `max_delay`.

What a reconnect cannot keep: requests the daemon had answered in part when the connection dropped
(their streams died with it on the daemon's side) fail with `ConnectionClosed`, as without
reconnecting. What it keeps: the client object, its adapter-event subscribers (re-subscribed), its
GPU budget (sent again), generations the daemon had said nothing of yet (sent again, as the
plugins do), and requests started while it reconnects, which wait for the new connection (up to
`timeout`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidHandshake, InvalidStatus

from .codec import decode_server, encode
from .discovery import read_runtime_file
from .errors import AuthError, ConnectionClosed, DaemonNotFound, LoraloomError, error_for_code
from .messages import PROTOCOL_VERSION, Error, Hello, Welcome

__all__ = ["ConnectionState", "Opening", "Reconnect", "Target", "open_connection", "reopen"]

ConnectionState = Callable[[str], None]  # called with "disconnected", "reconnected" or "closed"


class _Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


class Opening(Generic[C]):
    """What `connect()` returns: `await connect(...)` for a client, or `async with connect(...) as
    client` to have it closed on the way out."""

    def __init__(self, open_client: Callable[[], Awaitable[C]]) -> None:
        self._open = open_client
        self._client: C | None = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._open().__await__()

    async def __aenter__(self) -> C:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()


@dataclass(frozen=True)
class Target:
    """How to reach the daemon: explicit url and token, or the runtime file's (read at each open)."""

    url: str | None
    token: str | None
    client_name: str
    runtime_file: Path | None
    open_timeout: float

    def resolve(self) -> tuple[str, str]:
        if self.url is not None and self.token is not None:
            return self.url, self.token
        info = read_runtime_file(self.runtime_file)
        return self.url or info.url, self.token if self.token is not None else info.token


@dataclass(frozen=True)
class Reconnect:
    """Reconnecting after the connection drops: keep trying for `timeout` seconds."""

    timeout: float = 30.0
    first_delay: float = 0.1
    max_delay: float = 2.0


async def open_connection(target: Target) -> tuple[ClientConnection, Welcome]:
    """A connected, welcomed WebSocket; DaemonNotFound, AuthError or the daemon's refusal otherwise."""
    url, token = target.resolve()
    try:
        ws = await ws_connect(url, open_timeout=target.open_timeout, max_size=None, compression=None,
                              user_agent_header=f"loraloom-python/{target.client_name}")
    except InvalidStatus as exc:
        raise AuthError(f"the daemon refused the connection: HTTP {exc.response.status_code}") from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:  # not there, or not answering as a daemon does
        raise DaemonNotFound(f"cannot reach the daemon at {url}: {exc}") from None
    try:
        await ws.send(encode(Hello(protocol=PROTOCOL_VERSION, token=token, client=target.client_name)))
        first = decode_server(await asyncio.wait_for(ws.recv(), target.open_timeout))  # type: ignore[arg-type]
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
    return ws, first


async def reopen(target: Target, policy: Reconnect) -> tuple[ClientConnection, Welcome]:
    """`open_connection` again until it succeeds or `policy.timeout` passes (ConnectionClosed then,
    saying what the last attempt met). A daemon that is not there yet, not listening yet, or whose
    runtime file is still the old one's are all reasons to try again."""
    deadline = time.monotonic() + policy.timeout
    delay = policy.first_delay
    last: Exception | None = None
    while True:
        try:
            return await open_connection(target)
        except (DaemonNotFound, AuthError, ConnectionClosed, OSError, TimeoutError) as exc:
            last = exc  # AuthError too: the runtime file may still hold the old daemon's token
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionClosed(f"could not reconnect to the daemon within {policy.timeout:g} s: {last}")
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, policy.max_delay)
