"""loraloom's wire protocol and Python client (the single source of truth for the protocol)."""

from __future__ import annotations

from .client import Client, Conversation, ImageStream, TextStream, connect, parse_adapter
from .codec import FrameError, decode_client, decode_server, encode
from .connection import Reconnect
from .discovery import RuntimeInfo, default_runtime_file, read_runtime_file
from .errors import (
    AdapterError,
    AuthError,
    ConnectionClosed,
    DaemonNotFound,
    ErrorCode,
    LoraloomError,
    RequestError,
    ShuttingDown,
)
from .messages import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AdapterError",
    "AuthError",
    "Client",
    "ConnectionClosed",
    "Conversation",
    "DaemonNotFound",
    "ErrorCode",
    "FrameError",
    "ImageStream",
    "LoraloomError",
    "Reconnect",
    "RequestError",
    "RuntimeInfo",
    "ShuttingDown",
    "TextStream",
    "__version__",
    "connect",
    "decode_client",
    "decode_server",
    "default_runtime_file",
    "encode",
    "parse_adapter",
    "read_runtime_file",
]
