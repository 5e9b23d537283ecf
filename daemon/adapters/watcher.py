"""Live reload: watchdog events on the adapter folders -> debounced, stable `registry.refresh()`.

Editors save by writing a temp file and renaming it, or by rewriting in place in chunks, often
several times a second. Every event marks its adapter dirty and notes the folder's files (names,
sizes, modification times); a worker thread refreshes an adapter once no event arrived for it
during the debounce interval AND its files still look as they did at the last event. The
registry then parses and validates before anything goes live, so a half-written file can at
worst be rejected, never served.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .registry import AdapterRegistry
from .version import AdapterKind

__all__ = ["AdapterWatcher"]

log = logging.getLogger("loraloom.adapters")

_Key = tuple[AdapterKind, Path, str]


def _snapshot(folder: Path) -> tuple[tuple[str, int, int], ...] | None:
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return None


class AdapterWatcher(FileSystemEventHandler):
    def __init__(self, registry: AdapterRegistry, *, debounce_s: float = 0.25) -> None:
        self.registry = registry
        self.debounce_s = debounce_s
        self._dirty: dict[_Key, float] = {}  # adapter -> time of its last event
        self._seen: dict[_Key, tuple[tuple[str, int, int], ...] | None] = {}  # files at the last event
        self._cond = threading.Condition()
        self._stopping = False
        self._observer = Observer()
        self._worker = threading.Thread(target=self._run, name="loraloom-reload", daemon=True)
        self.refreshes = 0

    def start(self) -> None:
        for roots in self.registry.folders.values():
            for root in roots:
                root.mkdir(parents=True, exist_ok=True)
                self._observer.schedule(self, str(root), recursive=True)
        self._observer.start()
        self._worker.start()

    def stop(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify()
        self._observer.stop()
        self._observer.join()
        self._worker.join()

    # watchdog calls this on its own thread for every event
    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        now = time.monotonic()
        owners = {o for raw in paths if raw for o in [self.registry.owner(Path(str(raw)))] if o is not None}
        snaps = {o: _snapshot(o[1] / o[2]) for o in owners}
        with self._cond:
            for owner in owners:
                self._dirty[owner] = now
                self._seen[owner] = snaps[owner]
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._dirty:
                    self._cond.wait()
                if self._stopping:
                    return
                now = time.monotonic()
                due = [k for k, t in self._dirty.items() if now - t >= self.debounce_s]
                if not due:
                    wait = min(self.debounce_s - (now - t) for t in self._dirty.values())
                    self._cond.wait(max(wait, 0.005))
                    continue
            for key in due:
                kind, root, name = key
                snap = _snapshot(root / name)
                with self._cond:
                    if self._dirty.get(key, 0) > now - self.debounce_s:
                        continue  # a new event arrived meanwhile
                    if self._seen.get(key) != snap:
                        # Changed without an event we saw (or still being written): wait once more.
                        self._seen[key] = snap
                        self._dirty[key] = time.monotonic()
                        continue
                    self._dirty.pop(key, None)
                    self._seen.pop(key, None)
                self.refreshes += 1
                try:
                    self.registry.refresh(kind, root, name)
                except Exception:
                    log.exception("reloading %s failed", root / name)
