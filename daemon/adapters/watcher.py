"""Live reload: watchdog events on the adapter folders -> debounced, stable `registry.refresh()`.

Editors save by writing a temp file and renaming it, or by rewriting in place in chunks, often
several times a second. Every event marks its adapter dirty and notes the folder's files (names,
sizes, modification times); a worker thread refreshes an adapter once

- no event arrived for it during the debounce interval,
- its files still look as they did at the last event, and
- (Linux) no file of it is open for writing by any process (a read lease on it would be refused),
  waited for up to `writer_timeout_s`, however long the writer pauses between chunks.

The registry then reads each file (again if it changed during the read), and parses and validates
before anything goes live: a safetensors file whose bytes do not cover what its header declares is
refused. What that guarantees, and what an editor must do, is in docs/ARCHITECTURE.md ("Live reload").
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
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


def open_for_writing(path: Path) -> bool | None:
    """Whether some process has `path` open for writing (Linux: a read lease is refused then);
    None where that cannot be told (another OS, a file of another user, a filesystem without leases)."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        # A writer opening the file while the lease is held breaks it with a signal to us: make that
        # SIGURG, which is ignored unless handled (SIGIO, the default, would end the process).
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    finally:
        os.close(fd)


class AdapterWatcher(FileSystemEventHandler):
    def __init__(self, registry: AdapterRegistry, *, debounce_s: float = 0.25, writer_timeout_s: float = 30.0) -> None:
        self.registry = registry
        self.debounce_s = debounce_s
        self.writer_timeout_s = writer_timeout_s
        self._dirty: dict[_Key, float] = {}  # adapter -> time of its last event
        self._seen: dict[_Key, tuple[tuple[str, int, int], ...] | None] = {}  # files at the last event
        self._busy_since: dict[_Key, float] = {}  # adapter -> when a writer was first seen holding a file
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
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        now = time.monotonic()
        owners = {o for raw in paths if raw for o in [self.registry.owner(Path(raw))] if o is not None}
        snaps = {o: _snapshot(o[1] / o[2]) for o in owners}
        with self._cond:
            for owner in owners:
                self._dirty[owner] = now
                self._seen[owner] = snaps[owner]
            self._cond.notify()

    def _being_written(self, key: _Key, now: float) -> bool:
        """A file of the adapter is open for writing (and has not been for too long)."""
        try:
            files = [p for p in (key[1] / key[2]).iterdir() if p.is_file()]
        except OSError:
            files = []
        if not any(open_for_writing(p) for p in files):
            self._busy_since.pop(key, None)
            return False
        since = self._busy_since.setdefault(key, now)
        if now - since < self.writer_timeout_s:
            return True
        log.warning("a file of %s has been open for writing for %.0f s; reading it anyway", key[1] / key[2],
                    now - since)
        self._busy_since.pop(key, None)
        return False

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
                    if self._being_written(key, now):
                        self._dirty[key] = now  # look again one debounce later
                        continue
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
