"""The runtime file: how engine plugins and the CLI find a running daemon and its token.

The daemon writes it at start (mode 0600, folder 0700) and removes it on exit, the way Jupyter
does. Its location, in order:

1. `$LORALOOM_RUNTIME_FILE` when set;
2. Windows: `%LOCALAPPDATA%\\loraloom\\daemon.json`;
3. macOS: `~/Library/Application Support/loraloom/daemon.json`;
4. elsewhere: `$XDG_RUNTIME_DIR/loraloom/daemon.json`, or `~/.local/state/loraloom/daemon.json`
   when XDG_RUNTIME_DIR is unset.

The C# and GDScript plugins implement the same rule.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DaemonNotFound

__all__ = ["RuntimeInfo", "default_runtime_file", "read_runtime_file", "remove_runtime_file",
           "write_runtime_file"]


@dataclass(frozen=True)
class RuntimeInfo:
    """What a running daemon publishes about itself."""

    url: str
    host: str
    port: int
    token: str
    pid: int
    version: str
    protocol: int


def default_runtime_file() -> Path:
    """Where the runtime file lives on this machine (see the module docstring)."""
    override = os.environ.get("LORALOOM_RUNTIME_FILE")
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "loraloom" / "daemon.json"


def write_runtime_file(info: RuntimeInfo, path: Path | None = None) -> Path:
    """Write `info` atomically, readable by the current user only. Returns the path."""
    path = path or default_runtime_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".daemon-", suffix=".json", dir=path.parent)
    try:
        os.chmod(tmp, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(info), f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_runtime_file(path: Path | None = None) -> RuntimeInfo:
    """Read the runtime file, or raise `DaemonNotFound` saying why."""
    path = path or default_runtime_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DaemonNotFound(
            f"no daemon is running (no runtime file at {path}); start one with `loraloom serve`"
        ) from None
    except (OSError, ValueError) as exc:
        raise DaemonNotFound(f"cannot read the runtime file {path}: {exc}") from None
    try:
        return RuntimeInfo(
            url=str(data["url"]),
            host=str(data["host"]),
            port=int(data["port"]),
            token=str(data["token"]),
            pid=int(data["pid"]),
            version=str(data["version"]),
            protocol=int(data["protocol"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DaemonNotFound(f"the runtime file {path} is malformed: {exc}") from None


def remove_runtime_file(path: Path | None = None, *, pid: int | None = None) -> None:
    """Remove the runtime file if it is ours (same pid), ignoring a missing file."""
    path = path or default_runtime_file()
    if pid is not None:
        try:
            if int(json.loads(path.read_text(encoding="utf-8")).get("pid", -1)) != pid:
                return
        except (OSError, ValueError):
            return
    path.unlink(missing_ok=True)
