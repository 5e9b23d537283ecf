"""The one exception tree of loraloom, and the stable error codes carried on the wire.

Every `error` event names one of `ErrorCode`; clients raise the matching `LoraloomError` subclass.
Codes are part of the protocol: never rename one, only add.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CLIENT_ONLY",
    "MEANINGS",
    "AdapterError",
    "AuthError",
    "ConnectionClosed",
    "DaemonNotFound",
    "ErrorCode",
    "LoraloomError",
    "RequestError",
    "ShuttingDown",
    "error_for_code",
]


class ErrorCode(StrEnum):
    """Stable machine-readable error codes (the `code` of an `error` event); `MEANINGS` says what each means."""

    BAD_FRAME = "bad_frame"
    BAD_MESSAGE = "bad_message"
    FRAME_TOO_LARGE = "frame_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAUTHORIZED = "unauthorized"
    HANDSHAKE_REQUIRED = "handshake_required"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_REQUEST = "unknown_request"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNKNOWN_ADAPTER = "unknown_adapter"
    ADAPTER_UNAVAILABLE = "adapter_unavailable"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_PARAMETER = "invalid_parameter"
    MODEL_UNAVAILABLE = "model_unavailable"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    # Raised by clients, never sent by the daemon.
    DAEMON_NOT_FOUND = "daemon_not_found"
    CONNECTION_CLOSED = "connection_closed"
    NOT_CONNECTED = "not_connected"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    BAD_IMAGE = "bad_image"


# The one table of what each code means: PROTOCOL.md and the C# and GDScript files are generated from it.
MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.BAD_FRAME: "not one msgpack map (or a text frame)",
    ErrorCode.BAD_MESSAGE: "a map that is not a valid message: type, fields or values out of their bounds",
    ErrorCode.FRAME_TOO_LARGE: "the frame exceeds `max_frame_bytes`",
    ErrorCode.UNSUPPORTED_VERSION: "`hello.protocol` is not spoken by this daemon",
    ErrorCode.UNAUTHORIZED: "missing or wrong token",
    ErrorCode.HANDSHAKE_REQUIRED: "the first frame was not `hello`",
    ErrorCode.DUPLICATE_ID: "a request with this id is already in flight on this connection",
    ErrorCode.UNKNOWN_REQUEST: "`cancel` named an id that is not in flight",
    ErrorCode.TOO_MANY_REQUESTS: "more than `max_inflight_per_connection` requests in flight",
    ErrorCode.UNKNOWN_ADAPTER: "no adapter of that name (or of that kind) exists",
    ErrorCode.ADAPTER_UNAVAILABLE: "the adapter exists but has no valid version to serve",
    ErrorCode.PROMPT_TOO_LONG: "the prompt does not fit the context or `max_prompt_tokens`",
    ErrorCode.INVALID_PARAMETER: "a valid message asks for something this daemon's settings or models cannot do",
    ErrorCode.MODEL_UNAVAILABLE: ("the model for this request is not loaded, or the remote engine serving it cannot be "
                                  "reached or is overloaded (try again later)"),
    ErrorCode.SHUTTING_DOWN: "the daemon is stopping; the request did not finish (reconnect to a new daemon)",
    ErrorCode.INTERNAL: "a failure inside the daemon; the message says what, the daemon's log has the details",
    ErrorCode.DAEMON_NOT_FOUND: "client side: no daemon runs (no runtime file, or nobody listens at its address)",
    ErrorCode.CONNECTION_CLOSED: "client side: the connection closed while the request was in flight",
    ErrorCode.NOT_CONNECTED: "client side: the request could not be sent because no connection is up",
    ErrorCode.TIMEOUT: "client side: no answer came within the time the caller allowed",
    ErrorCode.CANCELLED: "client side: the caller cancelled the request before it was answered",
    ErrorCode.BAD_IMAGE: "client side: an image in a result could not be decoded",
}

CLIENT_ONLY = frozenset({ErrorCode.DAEMON_NOT_FOUND, ErrorCode.CONNECTION_CLOSED, ErrorCode.NOT_CONNECTED,
                         ErrorCode.TIMEOUT, ErrorCode.CANCELLED, ErrorCode.BAD_IMAGE})


class LoraloomError(Exception):
    """Base of every error raised by loraloom's Python packages."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            try:
                self.code = ErrorCode(code)
            except ValueError:
                self.code = ErrorCode.INTERNAL

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class RequestError(LoraloomError):
    """The daemon refused or failed one request; the connection is still usable."""


class AdapterError(RequestError):
    """The request named an adapter that does not exist or cannot serve."""

    code = ErrorCode.UNKNOWN_ADAPTER


class AuthError(LoraloomError):
    """The handshake was refused (token, origin or protocol version)."""

    code = ErrorCode.UNAUTHORIZED


class ShuttingDown(RequestError):
    """The daemon is stopping; in-flight requests end with this."""

    code = ErrorCode.SHUTTING_DOWN


class ConnectionClosed(LoraloomError):
    """The connection to the daemon closed while a request was in flight."""

    code = ErrorCode.CONNECTION_CLOSED


class DaemonNotFound(LoraloomError):
    """No running daemon could be found (no runtime file, or nobody listening)."""

    code = ErrorCode.DAEMON_NOT_FOUND


_BY_CODE: dict[ErrorCode, type[LoraloomError]] = {
    ErrorCode.UNKNOWN_ADAPTER: AdapterError,
    ErrorCode.ADAPTER_UNAVAILABLE: AdapterError,
    ErrorCode.UNAUTHORIZED: AuthError,
    ErrorCode.UNSUPPORTED_VERSION: AuthError,
    ErrorCode.SHUTTING_DOWN: ShuttingDown,
}


def error_for_code(code: str, message: str) -> LoraloomError:
    """Build the exception a client raises for an `error` event."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        ec = ErrorCode.INTERNAL
    cls = _BY_CODE.get(ec, RequestError)
    return cls(message, code=ec)
