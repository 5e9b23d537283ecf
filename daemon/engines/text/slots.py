"""Which adapter version sits in which compute slot: LRU, pinning, reference counts.

Pure bookkeeping; copying matrices is `LoraSlotStorage`'s job. A version in use by a running
sequence is never evicted; a pinned adapter is evicted only when retired (replaced by a newer
version or removed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ...adapters.version import AdapterVersion
from .lora_pool import LoraSlotStorage

__all__ = ["SlotStats", "SlotTable"]


@dataclass
class SlotStats:
    loads: int = 0
    hits: int = 0
    evictions: int = 0


class SlotTable:
    def __init__(self, storage: LoraSlotStorage, *, pinned: Iterable[str] = ()) -> None:
        self.storage = storage
        self.pinned = set(pinned)
        self._slot_of: dict[str, int] = {}  # version key -> slot
        self._version: dict[str, AdapterVersion] = {}
        self._refs: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unreferenced; oldest first
        self._retired: set[str] = set()
        self._free = list(range(storage.num_slots - 1, -1, -1))
        self.stats = SlotStats()

    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)

    def in_use(self, key: str) -> int:
        return self._refs.get(key, 0)

    def can_acquire(self, versions: list[AdapterVersion]) -> bool:
        missing = {v.key for v in versions if v.key not in self._slot_of}
        if not missing:
            return True
        evictable = sum(1 for k in self._idle if k not in missing and self._evictable(k))
        return len(missing) <= len(self._free) + evictable

    def acquire(self, versions: list[AdapterVersion]) -> list[int] | None:
        """Reserve a slot for each version (loading it if needed); None if slots are too few now."""
        if not self.can_acquire(versions):
            return None
        slots = []
        for v in versions:
            key = v.key
            if key in self._slot_of:
                self.stats.hits += 1
                self._idle.pop(key, None)
            else:
                slot = self._free.pop() if self._free else self._evict_one()
                self.storage.load(slot, v.prepared)
                self._slot_of[key] = slot
                self._version[key] = v
                self.stats.loads += 1
            self._refs[key] = self._refs.get(key, 0) + 1
            slots.append(self._slot_of[key])
        return slots

    def release(self, versions: list[AdapterVersion]) -> None:
        for v in versions:
            key = v.key
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                if key in self._retired:
                    self._drop(key)
                else:
                    self._idle[key] = None

    def retire(self, key: str) -> None:
        """The version was replaced or removed: free its slot now, or when its last user ends."""
        if key not in self._slot_of:
            return
        if key in self._refs:
            self._retired.add(key)
        else:
            self._drop(key)

    def _evictable(self, key: str) -> bool:
        return self._version[key].name not in self.pinned

    def _evict_one(self) -> int:
        for key in self._idle:
            if self._evictable(key):
                self.stats.evictions += 1
                slot = self._slot_of[key]
                self._idle.pop(key)
                del self._slot_of[key]
                del self._version[key]
                return slot
        raise RuntimeError("no evictable slot")  # can_acquire() rules this out

    def _drop(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        self._version.pop(key, None)
        self._idle.pop(key, None)
        self._retired.discard(key)
        self.storage.clear(slot)
        self._free.append(slot)
