"""Frames <-> messages: msgpack encoding and pydantic validation, with protocol error codes.

`encode` turns any message into the bytes of one binary frame. `decode_client` / `decode_server`
turn a frame back into a message or raise `FrameError` carrying the error code and, when the frame
was readable enough to have one, the request id to answer to.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import ErrorCode, LoraloomError
from .messages import ClientMessage, ServerMessage

__all__ = ["FrameError", "decode_client", "decode_server", "encode", "unpack"]

_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_server_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)

M = TypeVar("M")


class FrameError(LoraloomError):
    """A frame that could not be turned into a message."""

    def __init__(self, message: str, *, code: ErrorCode, request_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id


def encode(message: BaseModel) -> bytes:
    """The frame for `message`: a msgpack map in field order, absent values left out."""
    data = message.model_dump(mode="python", exclude_none=True)
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def unpack(frame: bytes) -> dict[str, Any]:
    """Parse a frame into a map with string keys, or raise `FrameError(bad_frame)`."""
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        reason = str(exc) or type(exc).__name__
        raise FrameError(f"frame is not valid msgpack: {reason}", code=ErrorCode.BAD_FRAME) from None
    if not isinstance(data, dict):
        raise FrameError(
            f"frame must be one msgpack map, got {type(data).__name__}", code=ErrorCode.BAD_FRAME
        )
    return data


def _describe(exc: ValidationError, kind: str) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"][1:] if p != kind) or "frame"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more")
    return f"invalid '{kind}' message: " + "; ".join(parts)


def _decode(frame: bytes, adapter: TypeAdapter[M], known: set[str]) -> M:
    data = unpack(frame)
    raw_id = data.get("id")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 64 else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise FrameError("message has no 'type'", code=ErrorCode.BAD_MESSAGE, request_id=request_id)
    if kind not in known:
        raise FrameError(
            f"unknown message type '{kind[:40]}' (known: {', '.join(sorted(known))})",
            code=ErrorCode.BAD_MESSAGE,
            request_id=request_id,
        )
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise FrameError(
            _describe(exc, kind), code=ErrorCode.BAD_MESSAGE, request_id=request_id
        ) from None


def _type_names(adapter: TypeAdapter[Any]) -> set[str]:
    schema = adapter.json_schema()
    mapping = schema.get("discriminator", {}).get("mapping", {})
    return set(mapping)


_CLIENT_TYPES = _type_names(_client_adapter)
_SERVER_TYPES = _type_names(_server_adapter)


def decode_client(frame: bytes) -> ClientMessage:
    """Decode a frame sent by a client (daemon side)."""
    return _decode(frame, _client_adapter, _CLIENT_TYPES)


def decode_server(frame: bytes) -> ServerMessage:
    """Decode a frame sent by the daemon (client side)."""
    return _decode(frame, _server_adapter, _SERVER_TYPES)
