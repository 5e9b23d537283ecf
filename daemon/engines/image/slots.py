"""Which adapter versions are loaded into the pipeline, under which PEFT adapter name.

diffusers keeps LoRAs inside the pipeline's modules by adapter name and activates a weighted set of
them for the whole pipeline. `AdapterSlots` is the bookkeeping around that: each resident version
gets a slot name (PEFT names cannot hold the '.' or '@' of `name@number`), slots are kept in LRU
order up to a limit, versions nobody waits for are dropped once a newer version of the same
adapter is in, and a new version of an adapter is *hotswapped* into its predecessor's slot when the
two have the same layout, which copies tensors instead of re-wrapping the model's modules.

Only the engine's worker thread calls into this class: it touches the pipeline.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.adapters.version import AdapterVersion

from .lora_format import fold_header_alpha

__all__ = ["AdapterSlots", "SlotStats"]

log = logging.getLogger("loraloom.image")

# diffusers warns on every unet-only LoRA that it found nothing for the text encoder, and PEFT on
# every second adapter that several adapters share a model: both are this module's normal case.
logging.getLogger("diffusers.loaders.lora_base").setLevel(logging.ERROR)
_PEFT_MULTI_ADAPTER_WARNING = "Already found a `peft_config` attribute"


@dataclass
class SlotStats:
    loads: int = 0
    hotswaps: int = 0
    unloads: int = 0


def _weights(version: AdapterVersion) -> dict[str, Any]:
    # diffusers keeps lora_alpha in the weight file's safetensors header and ignores it for a state
    # dict, so the scale is folded into the matrices. The header is expected in an image version's
    # `config` (`__metadata__` as read from the file; filling it in is the adapter loader's part).
    return dict(fold_header_alpha(version.tensors, version.config))


def _layout(version: AdapterVersion) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in version.tensors.items()}


class AdapterSlots:
    """LRU of adapter versions resident in one pipeline."""

    def __init__(self, pipe: Any, *, limit: int) -> None:
        if limit < 1:
            raise ValueError("adapter_slots must be at least 1")
        self._pipe = pipe
        self._limit = limit
        self._slots: OrderedDict[str, str] = OrderedDict()  # version key -> slot name, LRU first
        self._versions: dict[str, AdapterVersion] = {}
        self._next = 0
        self.stats = SlotStats()

    @property
    def resident(self) -> list[str]:
        """Version keys currently loaded, least recently used first."""
        return list(self._slots)

    def slot_of(self, key: str) -> str | None:
        return self._slots.get(key)

    # ------------------------------------------------------------ loading

    def ensure(self, needed: Sequence[AdapterVersion], referenced: Iterable[str]) -> None:
        """Make every version in `needed` resident.

        `referenced` are version keys that queued requests still use: they are kept if there is
        room, and never hotswapped over.
        """
        needed_keys = {v.key for v in needed}
        keep = needed_keys | set(referenced)
        for version in needed:
            if version.key in self._slots:
                self._slots.move_to_end(version.key)
                continue
            if not self._try_hotswap(version, keep):
                self._make_room(needed_keys, keep)
                self._load(version)
        self._drop_superseded(keep)

    def _try_hotswap(self, version: AdapterVersion, keep: set[str]) -> bool:
        # diffusers hotswaps only the denoiser: a text-encoder LoRA has to be loaded the slow way.
        if not all(k.startswith("unet.") for k in version.tensors):
            return False
        layout = _layout(version)
        for old_key, slot in list(self._slots.items()):
            old = self._versions[old_key]
            if old.name != version.name or old_key in keep or old.number > version.number:
                continue
            if _layout(old) != layout:
                continue
            try:
                self._pipe.load_lora_weights(_weights(version), adapter_name=slot, hotswap=True)
            except Exception:
                # diffusers may leave the slot half-updated; it held a stale version anyway.
                log.warning("hotswap of %s over %s failed; loading it fresh", version.key, old_key, exc_info=True)
                self._unload(old_key)
                return False
            del self._slots[old_key]
            del self._versions[old_key]
            self._slots[version.key] = slot
            self._versions[version.key] = version
            self.stats.hotswaps += 1
            log.info("hotswapped image adapter %s into slot %s (was %s)", version.key, slot, old_key)
            return True
        return False

    def _make_room(self, needed: set[str], keep: set[str]) -> None:
        while len(self._slots) >= self._limit:
            # Prefer evicting what no queued request needs; the batch's own versions never go.
            victims = [k for k in self._slots if k not in keep] or [k for k in self._slots if k not in needed]
            if not victims:
                break  # the batch alone needs more slots than the limit: let it through
            self._unload(victims[0])

    def _load(self, version: AdapterVersion) -> None:
        slot = f"slot{self._next}"
        self._next += 1
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_PEFT_MULTI_ADAPTER_WARNING)
                self._pipe.load_lora_weights(_weights(version), adapter_name=slot)
        except Exception:
            self._forget_slot(slot)
            raise
        self._slots[version.key] = slot
        self._versions[version.key] = version
        self.stats.loads += 1
        log.info("loaded image adapter %s into slot %s", version.key, slot)

    def _drop_superseded(self, keep: set[str]) -> None:
        newest: dict[str, int] = {}
        for v in self._versions.values():
            newest[v.name] = max(newest.get(v.name, 0), v.number)
        for key in list(self._slots):
            v = self._versions[key]
            if v.number < newest[v.name] and key not in keep:
                self._unload(key)

    def _unload(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._versions.pop(key, None)
        self._forget_slot(slot)
        self.stats.unloads += 1
        log.info("unloaded image adapter %s from slot %s", key, slot)

    def _forget_slot(self, slot: str) -> None:
        try:
            self._pipe.delete_adapters([slot])
        except Exception:
            # A failed load may not have registered the name anywhere; nothing left to remove.
            log.debug("delete_adapters(%s) failed", slot, exc_info=True)

    # ------------------------------------------------------------ activation

    def activate(self, mix: Sequence[tuple[AdapterVersion, float]]) -> None:
        """Set the pipeline's active adapters to `mix` (all resident); empty means the base model."""
        if not mix:
            if self._slots:
                # Disabled PEFT layers call only the base layer, so the output is the base's exactly.
                self._pipe.disable_lora()
            return
        self._pipe.enable_lora()
        names = [self._slots[v.key] for v, _ in mix]
        self._pipe.set_adapters(names, adapter_weights=[float(w) for _, w in mix])
