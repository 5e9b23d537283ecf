"""The loraloom daemon: settings, the WebSocket server, the CLI, the engines and the adapter library."""

from __future__ import annotations

__version__ = "0.1.0"
