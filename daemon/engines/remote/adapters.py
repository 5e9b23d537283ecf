"""Which adapters the remote engine holds for us: versioned names, the shared folder, mixes, retiring.

The registry stays ours; the remote only ever sees immutable snapshots under names that hold the
exact content:

- a version is served as `NAME@NUMBER.HASH` (e.g. `npc@2.3fa9c1d2e4b5a6f7`), read from
  `<shared folder>/NAME@NUMBER.HASH/`. A new version is a new name and a new path, so a request
  that started on v2 keeps v2 while v3 loads, and the remote's prefix cache (keyed by name and
  path in vLLM) can never hand v2's keys and values to v3;
- a mix (several adapters, or one at a scale other than 1) is built as one LoRA (`mix.py`) and
  served as `mix.DIGEST`, the digest of the exact versions and scales; the last `mix_cache`
  mixes stay registered (LRU), so a mix used again costs nothing;
- an adapter is registered with the remote on the first request that uses it, and unloaded (its
  folder deleted) once it is retired (replaced, removed, or a mix pushed out of the cache) and
  no request uses it any more.

The files are written from the validated matrices (`PreparedLora`, scaling folded in), so the
remote serves exactly what loraloom validated, whatever it would make of rank or alpha patterns.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import EngineErrorCode
from ..text.config import ModelSpec
from .dialect import Dialect, RemoteAdapter, RemoteFailure
from .http import HttpStatusError, RemoteHttp, RemoteUnreachable
from .mix import mix_tensors, write_peft_folder

if TYPE_CHECKING:
    from ...adapters.version import AdapterVersion

__all__ = ["RemoteAdapters"]

log = logging.getLogger("loraloom.remote")


class _Entry:
    """One adapter registered (or about to be) with the remote."""

    def __init__(self, adapter: RemoteAdapter, parts: tuple[tuple[AdapterVersion, float], ...], mix: bool) -> None:
        self.adapter = adapter
        self.parts = parts
        self.keys = frozenset(v.key for v, _ in parts)
        self.mix = mix
        self.refs = 0
        self.loaded = False
        self.retired = False
        self.last_used = time.monotonic()
        self.lock = threading.Lock()  # one load at a time


class RemoteAdapters:
    def __init__(self, http: RemoteHttp, dialect: Dialect, spec: ModelSpec, *, folder: Path | None,
                 remote_folder: str | None, mix_cache: int = 8,
                 background: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.http, self.dialect, self.spec = http, dialect, spec
        self.folder = folder
        self.remote_folder = (remote_folder or (str(folder) if folder else "")).rstrip("/")
        self.mix_cache = mix_cache
        self.background = background or (lambda fn: fn())
        self._entries: dict[str, _Entry] = {}
        self._retired: set[str] = set()  # version keys retired, so a late first use is retired at once
        self._lock = threading.Lock()
        self.counts = {"loads": 0, "unloads": 0, "mix_builds": 0, "reregistered": 0}
        self.last_mix_ms: float | None = None
        self.problem = self._check_folder()

    def _check_folder(self) -> str | None:
        """Why adapters cannot reach the remote, or None."""
        if self.folder is None:
            return (f"the remote engine at {self.http.url} is not on this machine, so it cannot read this daemon's "
                    "adapter files: set remote_adapter_dir to a folder it can read (and remote_adapter_path to "
                    "where the remote sees that folder, if it mounts it elsewhere)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".loraloom-probe-{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"cannot write adapters for the remote into remote_adapter_dir {self.folder}: {exc}"
        return None

    # ---------------------------------------------------------------- a request's adapter

    def name_for(self, adapters: Sequence[tuple[AdapterVersion, float]]) -> tuple[str, tuple[Any, ...], bool] | None:
        """(remote name, parts, is a mix) for a request's adapters; None for the base model."""
        parts = tuple((v, float(s)) for v, s in adapters if s != 0.0)
        if not parts:
            return None
        if len(parts) == 1 and parts[0][1] == 1.0:
            v = parts[0][0]
            return f"{v.key}.{v.hash}", parts, False
        parts = tuple(sorted(parts, key=lambda p: (p[0].key, p[1])))  # a sum: the order does not matter
        exact = "+".join(f"{v.key}.{v.hash}*{s!r}" for v, s in parts)
        return "mix." + hashlib.sha256(exact.encode()).hexdigest()[:16], parts, True

    def acquire(self, adapters: Sequence[tuple[AdapterVersion, float]]) -> _Entry | None:
        """The registered adapter a request runs on (registering it first); `release` it after."""
        if self.problem is not None and adapters:
            raise RemoteFailure(EngineErrorCode.ADAPTER, self.problem)
        named = self.name_for(adapters)
        if named is None:
            return None
        name, parts, mix = named
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                path = f"{self.remote_folder}/{name}"
                entry = self._entries[name] = _Entry(RemoteAdapter(name, path), parts, mix)
                entry.retired = bool(entry.keys & self._retired)
            entry.refs += 1
            entry.last_used = time.monotonic()
        try:
            self.ensure_loaded(entry)
        except BaseException:
            self.release(entry)
            raise
        if mix:
            self._trim_mixes()
        return entry

    def ensure_loaded(self, entry: _Entry, *, again: bool = False) -> None:
        """Write the entry's folder and register it with the remote (once; `again` after the remote forgot it)."""
        with entry.lock:
            if again:
                entry.loaded = False
                self.counts["reregistered"] += 1
            if entry.loaded:
                return
            started = time.perf_counter()
            assert self.folder is not None
            try:
                loras = [(v.prepared, s) for v, s in entry.parts]
                if any(lora is None for lora, _ in loras):
                    raise RemoteFailure(EngineErrorCode.ADAPTER, f"adapter {entry.adapter.name} has left host memory")
                config, tensors = mix_tensors(loras, self.spec)  # type: ignore[arg-type]
                write_peft_folder(self.folder / entry.adapter.name, config, tensors)
            except OSError as exc:
                raise RemoteFailure(EngineErrorCode.ADAPTER, f"cannot write adapter {entry.adapter.name} into "
                                    f"remote_adapter_dir {self.folder}: {exc}") from None
            try:
                self.dialect.load(self.http, entry.adapter)
            except (RemoteUnreachable, HttpStatusError) as exc:
                code = EngineErrorCode.UNAVAILABLE if isinstance(exc, RemoteUnreachable) else EngineErrorCode.FAILED
                raise RemoteFailure(code, f"registering adapter {entry.adapter.name}: {exc}") from None
            entry.loaded = True
            self.counts["loads"] += 1
            ms = (time.perf_counter() - started) * 1000
            if entry.mix:
                self.counts["mix_builds"] += 1
                self.last_mix_ms = ms
            log.info("registered %s with the remote in %.1f ms%s", entry.adapter.name, ms,
                     f" (a mix of {', '.join(f'{v.key}:{s:g}' for v, s in entry.parts)}, rank "
                     f"{sum(v.rank for v, _ in entry.parts)})" if entry.mix else "")

    def release(self, entry: _Entry | None) -> None:
        if entry is None:
            return
        with self._lock:
            entry.refs -= 1
            drop = entry.refs == 0 and entry.retired and self._entries.get(entry.adapter.name) is entry
            if drop:
                del self._entries[entry.adapter.name]
        if drop:
            self._drop(entry)

    # ---------------------------------------------------------------- retiring

    def retire(self, version: AdapterVersion) -> None:
        """A version was replaced or removed: unload it and the mixes that hold it, once unused."""
        with self._lock:
            self._retired.add(version.key)
            gone = []
            for name, entry in list(self._entries.items()):
                if version.key in entry.keys:
                    entry.retired = True
                    if entry.refs == 0:
                        gone.append(self._entries.pop(name))
        for entry in gone:
            self.background(lambda e=entry: self._drop(e))  # type: ignore[misc]

    def _trim_mixes(self) -> None:
        with self._lock:
            mixes = sorted((e for e in self._entries.values() if e.mix), key=lambda e: e.last_used)
            gone = [e for e in mixes[:max(0, len(mixes) - self.mix_cache)] if e.refs == 0]
            for entry in gone:
                del self._entries[entry.adapter.name]
        for entry in gone:
            self.background(lambda e=entry: self._drop(e))  # type: ignore[misc]

    def _drop(self, entry: _Entry) -> None:
        """Unload from the remote and delete the folder (the entry is no longer in the table)."""
        with entry.lock:
            if entry.loaded:
                try:
                    self.dialect.unload(self.http, entry.adapter)
                    self.counts["unloads"] += 1
                except (RemoteUnreachable, HttpStatusError) as exc:
                    log.warning("could not unload %s from the remote: %s", entry.adapter.name, exc)
                entry.loaded = False
            if self.folder is not None:
                shutil.rmtree(self.folder / entry.adapter.name, ignore_errors=True)
        log.info("unloaded %s from the remote", entry.adapter.name)

    def close(self, deadline_s: float = 10.0) -> None:
        """Unload everything (the daemon stops): bounded, best effort."""
        end = time.monotonic() + deadline_s
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            if time.monotonic() > end:
                log.warning("left %d adapters registered with the remote (out of time)", len(entries))
                break
            self._drop(entry)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            entries = list(self._entries.values())
        return {"registered": sum(e.loaded for e in entries), "mixes": sum(e.mix for e in entries),
                "last_mix_ms": None if self.last_mix_ms is None else round(self.last_mix_ms, 2), **self.counts}
