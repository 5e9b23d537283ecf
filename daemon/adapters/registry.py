"""The adapter registry: names -> the live, validated, immutable version of each adapter.

Owns the folder layout (each sub-folder of an adapter folder is one adapter named after it),
version numbering, the status of every adapter, and the events sent when something changes.
A new version goes live only after it validates against the loaded base model; a rejected one
leaves the previous version serving. Swaps are atomic: `get()` returns either the old or the
new version, and requests keep the version they started with.

It is also the host-memory cache level ("capacity"): at most `capacity` live versions keep their
weights in memory, least recently used first out, pinned adapters never. An evicted version
goes cold (same number, no weights); the next `get()` reads its files again, and if they no
longer hash the same, the adapter gets a new version instead. A request holding a version keeps
its weights alive whatever the registry does (the engines' slots are the compute-side level).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from bridge.errors import AdapterError, ErrorCode
from bridge.messages import ADAPTER_NAME_PATTERN, AdapterInfo

from .loader import AdapterFiles, FilesChanging, read_adapter_files
from .version import AdapterKind, AdapterVersion

__all__ = ["AdapterChange", "AdapterRegistry", "Validator", "is_ignored_name"]

log = logging.getLogger("loraloom.adapters")

# Validates parsed files for one engine: returns (prepared, rank, targets) or raises ValueError.
Validator = Callable[[AdapterFiles], tuple[Any, int, tuple[str, ...]]]

_NAME = re.compile(ADAPTER_NAME_PATTERN)
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", ".swx", "~", ".bak")


def is_ignored_name(name: str) -> bool:
    """Hidden files, editor temp files and partial downloads are never adapters or adapter files."""
    return name.startswith((".", "~", "#")) or name.endswith(_TEMP_SUFFIXES)


@dataclass(frozen=True)
class AdapterChange:
    """What happened to one adapter (becomes an `adapter_event` on the wire)."""

    event: str  # added | updated | removed | rejected
    info: AdapterInfo
    previous_version: int | None = None
    reason: str | None = None


class _Entry:
    def __init__(self, name: str, kind: AdapterKind, folder: Path) -> None:
        self.name = name
        self.kind = kind
        self.folder = folder
        self.live: AdapterVersion | None = None
        self.error: str | None = None
        self.numbers = 0
        self.last_used = 0.0
        self.loading = False  # its files are being read again (it had left host memory)

    @property
    def warm(self) -> bool:
        return self.live is not None and (self.live.prepared is not None or bool(self.live.tensors))

    def info(self) -> AdapterInfo:
        v = self.live
        status: Literal["ready", "loading", "failed"] = "failed" if v is None and self.error else "ready"
        if self.loading or (v is None and not self.error):
            status = "loading"
        return AdapterInfo(name=self.name, kind=self.kind, status=status, version=v.number if v else None,
                           hash=v.hash if v else None, rank=v.rank if v else None,
                           targets=list(v.targets) if v else [], error=self.error)


class AdapterRegistry:
    """Adapters of both kinds, from one or more folders each."""

    def __init__(self, *, folders: dict[AdapterKind, list[Path]], validators: dict[AdapterKind, Validator],
                 on_change: Callable[[AdapterChange], None] | None = None,
                 on_retire: Callable[[AdapterVersion], None] | None = None,
                 on_live: Callable[[AdapterVersion], None] | None = None,
                 capacity: int | None = None, pinned: Iterable[str] = ()) -> None:
        self.folders = {k: [Path(p).resolve() for p in v] for k, v in folders.items()}
        self.validators = validators
        self.on_change = on_change
        self.on_retire = on_retire
        self.on_live = on_live  # a new version went live (engines may get it ready ahead of requests)
        self._entries: dict[tuple[AdapterKind, str], _Entry] = {}
        self._lock = threading.RLock()
        self.capacity = capacity
        self.pinned = set(pinned)
        self.stats = {"evictions": 0, "reloads": 0}

    # ---------------------------------------------------------------- queries

    def get(self, name: str, kind: AdapterKind) -> AdapterVersion:
        """The live version of `name`, or AdapterError(unknown_adapter / adapter_unavailable)."""
        with self._lock:
            entry = self._entries.get((kind, name))
            if entry is None:
                known = sorted(n for (k, n) in self._entries if k == kind)
                other = [k for (k, n) in self._entries if n == name]
                hint = f" (it is {'an' if other and other[0] == 'image' else 'a'} {other[0]} adapter)" if other else ""
                raise AdapterError(
                    f"unknown {kind} adapter '{name}'{hint}; known: {', '.join(known) or 'none'}",
                    code=ErrorCode.UNKNOWN_ADAPTER)
            if entry.live is None:
                raise AdapterError(f"{kind} adapter '{name}' has no valid version: {entry.error or 'loading'}",
                                   code=ErrorCode.ADAPTER_UNAVAILABLE)
            entry.last_used = time.monotonic()
            if entry.warm:
                return entry.live
            cold = entry.live
            entry.loading = True
        try:
            self._rewarm(kind, entry, cold)
        finally:
            entry.loading = False
        with self._lock:
            current = self._entries.get((kind, name))
            if current is None or current.live is None or not current.warm:
                reason = current.error if current is not None and current.error else "its files are gone"
                raise AdapterError(f"{kind} adapter '{name}' could not be reloaded: {reason}",
                                   code=ErrorCode.ADAPTER_UNAVAILABLE)
            return current.live

    def _rewarm(self, kind: AdapterKind, entry: _Entry, cold: AdapterVersion) -> None:
        """Read an evicted version's files again; a changed file becomes a new version."""
        try:
            files = read_adapter_files(entry.folder, kind)
            if files.hash != cold.hash:
                raise ValueError("changed on disk")
            prepared, _, _ = self.validators[kind](files)
        except (ValueError, OSError):
            self.refresh(kind, entry.folder.parent, entry.name)  # the watcher would get there too
            return
        with self._lock:
            if entry.live is cold:
                entry.live = replace(cold, prepared=prepared, tensors={} if kind == "text" else files.tensors)
                self.stats["reloads"] += 1
        self._enforce_capacity(keep=entry)

    def _enforce_capacity(self, keep: _Entry | None = None) -> None:
        if self.capacity is None:
            return
        with self._lock:
            warm = [e for e in self._entries.values() if e.warm and e.name not in self.pinned and e is not keep]
            excess = len(warm) + (1 if keep is not None and keep.warm else 0) - self.capacity
            for e in sorted(warm, key=lambda e: e.last_used)[:max(0, excess)]:
                assert e.live is not None
                e.live = replace(e.live, prepared=None, tensors={})
                self.stats["evictions"] += 1
                log.debug("%s adapter '%s' left host memory (capacity %d)", e.kind, e.name, self.capacity)

    def warm_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.warm)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [e.info() for _, e in sorted(self._entries.items())]

    def owner(self, path: Path) -> tuple[AdapterKind, Path, str] | None:
        """(kind, folder, adapter name) for a path inside an adapter folder, or None."""
        path = Path(path)
        for kind, roots in self.folders.items():
            for root in roots:
                try:
                    rel = path.relative_to(root)
                except ValueError:
                    continue
                if not rel.parts:
                    return None
                return kind, root, rel.parts[0]
        return None

    # ---------------------------------------------------------------- changes

    def scan(self) -> None:
        """Load every adapter folder (at start)."""
        for kind, roots in self.folders.items():
            for root in roots:
                if not root.is_dir():
                    log.warning("%s adapter folder %s does not exist (yet)", kind, root)
                    continue
                for child in sorted(root.iterdir()):
                    if child.is_dir():
                        self.refresh(kind, root, child.name)

    def refresh(self, kind: AdapterKind, root: Path, name: str) -> AdapterChange | None:
        """Re-read one adapter folder and act on what it holds now. Returns the change, if any."""
        if is_ignored_name(name):
            return None
        if not _NAME.match(name):
            log.warning("ignoring %s: adapter folder names are identifiers (letters, digits, _ - .)", root / name)
            return None
        folder = root / name
        with self._lock:
            entry = self._entries.get((kind, name))
            if entry is not None and entry.folder != folder:
                if entry.folder.is_dir():
                    log.warning("adapter '%s' exists in %s and %s; using the first", name, entry.folder, folder)
                    return None
                entry.folder = folder
        if not folder.is_dir():
            return self._remove(kind, name)
        try:
            files = read_adapter_files(folder, kind)
        except FilesChanging as exc:  # still being written: the watcher's next event brings it back
            log.debug("%s adapter '%s': %s; waiting for the writer", kind, name, exc)
            return None
        except ValueError as exc:
            return self._reject(kind, name, folder, str(exc))
        except OSError as exc:
            if not folder.is_dir():
                return self._remove(kind, name)
            return self._reject(kind, name, folder, f"cannot read the files: {exc}")
        with self._lock:
            entry = self._entries.get((kind, name))
            if entry is not None and entry.live is not None and entry.live.hash == files.hash:
                if entry.error:  # a broken save was fixed back to the live content
                    entry.error = None
                return None
        try:
            prepared, rank, targets = self.validators[kind](files)
        except ValueError as exc:
            return self._reject(kind, name, folder, str(exc))
        except Exception as exc:  # a validator bug must not take the watcher down
            log.exception("validating %s failed", folder)
            return self._reject(kind, name, folder, f"internal error while validating: {exc}")
        with self._lock:
            entry = self._entries.setdefault((kind, name), _Entry(name, kind, folder))
            entry.numbers += 1
            old = entry.live
            if kind == "text":
                files.tensors = {}  # the engine keeps its own prepared copy; don't hold both
            entry.live = files.to_version(name, entry.numbers, prepared, rank, targets)
            entry.error = None
            entry.last_used = time.monotonic()
            change = AdapterChange("updated" if old else "added", entry.info(),
                                   previous_version=old.number if old else None)
        log.info("%s adapter '%s' %s: version %d (%s, rank %d)", kind, name, change.event, entry.live.number,
                 entry.live.hash, rank)
        if old is not None and self.on_retire:
            self.on_retire(old)
        if self.on_live:
            self.on_live(entry.live)
        self._enforce_capacity(keep=entry)
        self._notify(change)
        return change

    def _reject(self, kind: AdapterKind, name: str, folder: Path, reason: str) -> AdapterChange:
        with self._lock:
            entry = self._entries.setdefault((kind, name), _Entry(name, kind, folder))
            entry.error = reason
            change = AdapterChange("rejected", entry.info(), reason=reason)
        keeps = f"; version {entry.live.number} keeps serving" if entry.live else ""
        log.warning("%s adapter '%s' rejected: %s%s", kind, name, reason, keeps)
        self._notify(change)
        return change

    def _remove(self, kind: AdapterKind, name: str) -> AdapterChange | None:
        with self._lock:
            entry = self._entries.pop((kind, name), None)
            if entry is None:
                return None
            old = entry.live
            info = entry.info().model_copy(update={"status": "removed"})
            change = AdapterChange("removed", info, previous_version=old.number if old else None)
        log.info("%s adapter '%s' removed", kind, name)
        if old is not None and self.on_retire:
            self.on_retire(old)
        self._notify(change)
        return change

    def _notify(self, change: AdapterChange) -> None:
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:
                log.exception("an adapter change listener failed")
