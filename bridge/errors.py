"""The one exception tree of loraloom, and the stable error codes carried on the wire.

Every `error` event names one of `ErrorCode`; clients raise the matching `LoraloomError` subclass.
Codes are part of the protocol: never rename one, only add.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
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
    """Stable machine-readable error codes (the `code` of an `error` event)."""

    BAD_FRAME = "bad_frame"  # not one msgpack map, or a text frame
    BAD_MESSAGE = "bad_message"  # a map that is not a valid message (type, fields, values)
    FRAME_TOO_LARGE = "frame_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAUTHORIZED = "unauthorized"
    HANDSHAKE_REQUIRED = "handshake_required"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_REQUEST = "unknown_request"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNKNOWN_ADAPTER = "unknown_adapter"
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # known but failed or wrong kind
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_PARAMETER = "invalid_parameter"
    MODEL_UNAVAILABLE = "model_unavailable"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


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


class DaemonNotFound(LoraloomError):
    """No running daemon could be found (no runtime file, or nobody listening)."""


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
