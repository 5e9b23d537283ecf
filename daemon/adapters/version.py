"""Immutable adapter versions: the unit the registry hands to engines.

A version is what one adapter folder held at one moment, parsed and validated: its tensors in host
memory, its config, a number (1, 2, ... per name) and a content hash. Engines never read adapter
files themselves; they receive versions. A request keeps the versions it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # versions travel through torch-free modules (the text scheduler)
    import torch

__all__ = ["AdapterKind", "AdapterVersion"]

AdapterKind = Literal["text", "image"]


@dataclass(frozen=True, eq=False)
class AdapterVersion:
    """One immutable, validated version of one adapter."""

    name: str
    kind: AdapterKind
    number: int  # 1, 2, ... per name, never reused within a daemon's life
    hash: str  # sha256 of the files' bytes, hex, first 16 digits
    tensors: dict[str, torch.Tensor]  # as stored in the file, on the host
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json (text) or {} (image)
    rank: int = 0
    targets: tuple[str, ...] = ()
    # Engine-specific parsed form (e.g. per-layer LoRA matrices), filled by the engine's validator.
    prepared: Any = None

    @property
    def key(self) -> str:
        """A unique string for this version, usable as an engine-side adapter name."""
        return f"{self.name}@{self.number}"

    def __repr__(self) -> str:
        return f"AdapterVersion({self.key}, {self.kind}, rank={self.rank}, hash={self.hash})"
