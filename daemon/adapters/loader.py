"""Reading one adapter folder from disk into an `AdapterVersion` (nothing is validated here).

A file whose size or modification time moves while it is read raises `FilesChanging` (the watcher
tries again once the writer is done); a safetensors file whose bytes do not exactly cover what its
header declares (truncated, or with bytes past the end) is refused by the safetensors parser.

Text adapters are PEFT folders (adapter_config.json + adapter_model.safetensors); image adapters
are diffusers LoRA folders (one *.safetensors, usually pytorch_lora_weights.safetensors). The
bytes are read once: the hash and the tensors come from the same bytes, so a file rewritten
while we read can never give a version whose hash and weights disagree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from .version import AdapterKind, AdapterVersion

__all__ = ["AdapterFiles", "FilesChanging", "read_adapter_files"]

TEXT_CONFIG = "adapter_config.json"
TEXT_WEIGHTS = "adapter_model.safetensors"


class FilesChanging(ValueError):
    """A file changed while it was read: someone is still writing the folder (try again later)."""


def _read_stable(path: Path) -> bytes:
    """The bytes of `path`, if its size and modification time are the same after the read as before."""
    before = path.stat()
    data = path.read_bytes()
    after = path.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        raise FilesChanging(f"{path.name} changed while it was read")
    return data


class AdapterFiles:
    """The parsed content of an adapter folder at one moment."""

    def __init__(self, kind: AdapterKind, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 digest: str, files: dict[str, int]) -> None:
        self.kind = kind
        self.config = config
        self.tensors = tensors
        self.hash = digest
        self.files = files  # name -> size

    def to_version(self, name: str, number: int, prepared: Any, rank: int,
                   targets: tuple[str, ...]) -> AdapterVersion:
        return AdapterVersion(name=name, kind=self.kind, number=number, hash=self.hash, tensors=self.tensors,
                              config=self.config, rank=rank, targets=targets, prepared=prepared)


def _weights_file(folder: Path, kind: AdapterKind) -> Path:
    if kind == "text":
        path = folder / TEXT_WEIGHTS
        if not path.exists():
            if (folder / "adapter_model.bin").exists():
                raise ValueError("adapter_model.bin (pickle) is not loaded for safety; save as safetensors")
            raise ValueError(f"{TEXT_WEIGHTS} is missing")
        return path
    candidates = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not candidates:
        raise ValueError("no *.safetensors file in the folder")
    if len(candidates) > 1:
        preferred = folder / "pytorch_lora_weights.safetensors"
        if preferred in candidates:
            return preferred
        raise ValueError(f"several weight files ({', '.join(p.name for p in candidates)}); keep one")
    return candidates[0]


def read_adapter_files(folder: Path, kind: AdapterKind) -> AdapterFiles:
    """Read and parse an adapter folder, or raise ValueError with a reason a designer can act on."""
    digest = hashlib.sha256()
    sizes: dict[str, int] = {}
    config: dict[str, Any] = {}
    if kind == "text":
        cfg_path = folder / TEXT_CONFIG
        try:
            raw_cfg = _read_stable(cfg_path)
        except FileNotFoundError:
            raise ValueError(f"{TEXT_CONFIG} is missing") from None
        try:
            config = json.loads(raw_cfg)
        except ValueError as exc:
            raise ValueError(f"{TEXT_CONFIG} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{TEXT_CONFIG} must hold a JSON object")
        digest.update(raw_cfg)
        sizes[TEXT_CONFIG] = len(raw_cfg)
    weights = _weights_file(folder, kind)
    raw = _read_stable(weights)
    sizes[weights.name] = len(raw)
    digest.update(raw)
    try:
        tensors = load_safetensors(raw)
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise ValueError(
            f"{weights.name} is not a readable safetensors file (truncated or corrupt?): {reason}") from None
    if kind == "image":  # diffusers keeps LoRA settings (e.g. lora_alpha) in the file's header
        config = _safetensors_metadata(raw)
    return AdapterFiles(kind, config, tensors, digest.hexdigest()[:16], sizes)


def _safetensors_metadata(raw: bytes) -> dict[str, Any]:
    """The `__metadata__` strings of a safetensors file (already validated by the tensor load)."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}
