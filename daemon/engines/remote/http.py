"""HTTP to the remote engine: JSON calls and server-sent-event streams, on the calling thread.

The standard library's `http.client`, one connection per call (the remote is usually on the same
network; a call's setup is a fraction of a millisecond on loopback). Every wait is bounded by
`timeout` (connect, and the gap between two bytes). A stream can be aborted from another thread:
`close()` shuts the socket down, the reader's next read fails at once, and the remote sees its
client gone (vLLM aborts the request then).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HttpStatusError", "RemoteHttp", "RemoteUnreachable", "SseStream"]

_MAX_ERROR_BODY = 1 << 16


class RemoteUnreachable(ConnectionError):
    """The remote could not be reached, or the connection broke."""


@dataclass
class HttpStatusError(Exception):
    """The remote answered with a status other than 2xx; `message` is what it said."""

    status: int
    message: str

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}"


def error_text(body: bytes) -> str:
    """The message of an error body: OpenAI-style {"error": {"message"}}, {"message"}, {"detail"}, text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000] or "(no message)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "error_message", "detail"):
                if err.get(key):
                    return str(err[key])[:2000]
        elif err:
            return str(err)[:2000]
    return text[:2000]


class RemoteHttp:
    """The remote's base URL (scheme, host, port, path prefix) and its API key."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"remote_url {url!r} is not an http(s) URL")
        self.url = url
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @property
    def on_loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout or self.timeout)

    def _send(self, method: str, path: str, body: Any, timeout: float | None
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connect(timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, self.prefix + path, body=data, headers=self.headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RemoteUnreachable(f"cannot reach the remote engine at {self.url}: {exc}") from None
        if not 200 <= response.status < 300:
            try:
                message = error_text(response.read(_MAX_ERROR_BODY))
            except (OSError, http.client.HTTPException):
                message = response.reason
            conn.close()
            raise HttpStatusError(response.status, message)
        return conn, response

    def call(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """One request; its JSON answer (or its text, for servers that answer in words)."""
        conn, response = self._send(method, path, body, timeout)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteUnreachable(f"the remote engine at {self.url} broke the connection: {exc}") from None
        finally:
            conn.close()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def stream(self, path: str, body: Any, *, timeout: float | None = None) -> SseStream:
        """POST and read the answer as server-sent events (`SseStream.events`)."""
        conn, response = self._send("POST", path, body, timeout)
        return SseStream(conn, response, self.url)


class SseStream:
    """The data of each event of a `text/event-stream` answer, until `[DONE]` or the end."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str) -> None:
        self._conn, self._response, self._url = conn, response, url
        self._lock = threading.Lock()
        self.closed = False

    def events(self) -> Iterator[Any]:
        try:
            yield from self._events()
        finally:
            self._conn.close()  # on the reader's thread: closing under a reader breaks http.client

    def _events(self) -> Iterator[Any]:
        data: list[str] = []
        while True:
            try:
                line = self._response.readline(1 << 20)
            except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
                if self.closed:
                    return
                raise RemoteUnreachable(f"the stream from {self._url} broke: {exc}") from None
            if not line:
                if self.closed:
                    return
                if data:
                    yield json.loads("\n".join(data))
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text.startswith("data:"):
                data.append(text[5:].lstrip(" "))
            elif not text and data:  # a blank line ends an event
                payload = "\n".join(data)
                data = []
                if payload.strip() == "[DONE]":
                    return
                yield json.loads(payload)

    def close(self) -> None:
        """Abort the stream (any thread): the socket is shut down, so the reader's next read ends at
        once and the remote sees its client gone. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            sock = self._conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
