"""The memory budget: what the engines take on their device, decided before anything is allocated.

A game shares the GPU's memory with its renderer, so it can cap the daemon (`gpu_memory_mb`; on
the CPU device the same cap applies to RAM). What counts, for the built-in text engine on its
device:

    weights    the base model in its dtype (config.json's shapes; exactly what the engine holds)
    kv cache   the paged pool: blocks x 16 tokens x 2 (k, v) x layers x kv_heads x head_dim x itemsize
    lora pool  lora_slots x max_lora_rank rank rows, each an A row and a B row of every target
    workspace  one step's activations, logits and gathered keys (an estimate from the step's shape)
    image      the image pipeline's weights (its safetensors headers, in the dtype it will run in)

Without a budget the settings decide every size (the defaults of `daemon/settings.py`). With one,
explicit settings are honoured or refused, and the unset ones are fitted: `lora_slots` shrinks
(down to `max_adapters_per_request`, the most slots one request's mix holds at once, or one) until
one full-length sequence of KV fits beside it, then the KV cache takes what
is left, up to room for `max_seqs` sequences of `max_context` tokens (beyond that it would only be
prefix cache). A model whose weights, workspace, one slot and one sequence do not fit is refused
with the numbers. The formulas mirror `engines/text/engine.py`, `kv.py` and `lora_pool.py`; a test
compares them with the tensors an engine allocates.

Plain arithmetic on a `ModelSpec` (no torch); `plan_for_settings` does the reading and resolving.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engines.text.config import LORA_TARGETS, ModelSpec

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "MIB",
    "MemoryPlan",
    "OverBudget",
    "TextMemory",
    "fit_for_settings", "fit_text_memory",
    "image_weight_bytes",
    "measured_bytes",
    "plan_for_settings",
    "safetensors_numel",
    "text_weight_bytes",
]

log = logging.getLogger("loraloom")

MIB = 2**20
BLOCK_SIZE = 16  # token positions per KV block (EngineConfig.block_size)
ROW_BLOCK = 16  # pool rows kept together in the fused weights (lora_pool.ROW_BLOCK)
# Projection groups of the LoRA pool: (input width, member outputs) by ModelSpec dimension names.
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# Settings an explicit value of which the budget must honour (else it fits them).
FITTED = ("kv_cache_mb", "lora_slots")


class OverBudget(ValueError):
    """The settings ask for more memory than the budget allows (the message says what and how much)."""


def _mib(n: int) -> int:
    return -(-n // MIB)


# ---------------------------------------------------------------------------- the text engine

def text_weight_bytes(spec: ModelSpec, itemsize: int, quant: str | None = None, head_quant: str | None = None) -> int:
    """Bytes of the base weights as the engine holds them (`TextModel.nbytes`). `quant`: what the
    projections hold once loaded (int4 for AWQ/GPTQ folders, `QuantScheme.weight_kind`); `head_quant`:
    what the embedding table and an untied vocab head hold (`QuantScheme.head_kind`: quantizing at load
    takes them too); norms are dense (a GPTQ folder's quantized head: an over-estimate)."""
    h, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    if quant is None:
        proj = sum(inp * out for inp, out in spec.target_dims().values()) * itemsize
    else:
        from .engines.text.quant import planned_nbytes

        kind: Any = quant  # one of quant.QuantKind
        proj = sum(planned_nbytes(out, inp, kind, itemsize) for inp, out in spec.target_dims().values())
    per_layer = 2 * h + (q + 2 * kv if spec.attention_bias else 0)
    from .engines.text.quant import planned_nbytes

    head_kind: Any = head_quant
    embed = planned_nbytes(spec.vocab_size, h, head_kind, itemsize) * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * proj + embed + (spec.num_layers * per_layer + h) * itemsize


def kv_bytes_per_block(spec: ModelSpec, itemsize: int, block_size: int = BLOCK_SIZE) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize * block_size


def kv_blocks(spec: ModelSpec, itemsize: int, *, max_seqs: int, context: int, kv_cache_mb: int | None,
              block_size: int = BLOCK_SIZE) -> int:
    """Blocks of the engine's KV pool, block 0 (padding) included: `TextEngine.__init__`'s rule."""
    width = -(-context // block_size)
    blocks = (kv_cache_mb * MIB // kv_bytes_per_block(spec, itemsize, block_size) if kv_cache_mb is not None
              else -(-max_seqs * context // (2 * block_size)))
    return max(blocks, width + 1) + 1


def lora_row_bytes(spec: ModelSpec, itemsize: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Bytes of one pool row (an A row and a B row of every target, every layer)."""
    dims = spec.target_dims()
    per_layer = 0
    for group in _GROUPS:
        members = [t for t in group if t in targets]
        if members:
            per_layer += len(members) * dims[members[0]][0] + sum(dims[t][1] for t in members)
    return spec.num_layers * per_layer * itemsize


def lora_pool_rows(lora_slots: int, max_lora_rank: int) -> int:
    """Rows the pool allocates: every slot at max_rank, plus the zero row, in whole row blocks."""
    return -(-(lora_slots * max_lora_rank + 1) // ROW_BLOCK) * ROW_BLOCK


def workspace_bytes(spec: ModelSpec, itemsize: int, *, max_seqs: int, context: int, step_tokens: int,
                    lora_rows: int) -> int:
    """An estimate of one step's transient tensors: the widest layer's activations (with the LoRA
    shrink columns), the logits and sampling copies (float32), the keys and values a decode step
    gathers on the PyTorch attention path, and the RoPE tables."""
    t = max(step_tokens, max_seqs)
    h, q, kv, i = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    act = t * (4 * h + q + 2 * kv + 4 * i + 3 * lora_rows) * itemsize
    logits = 3 * (max_seqs + 4) * spec.vocab_size * 4
    gathered = 2 * max_seqs * context * kv * itemsize
    rope = 2 * max(context, min(spec.max_position_embeddings, 4096)) * spec.head_dim * 4
    return act + logits + gathered + rope


@dataclass(frozen=True)
class TextMemory:
    """What the text engine allocates on its device, in bytes, and the sizes that decided it."""

    weights: int
    kv_cache: int
    lora_pool: int
    workspace: int
    kv_cache_mb: int | None  # what the engine is given (None: its default rule)
    kv_cache_tokens: int  # usable positions (the padding block left out)
    kv_block_bytes: int
    lora_slots: int
    max_lora_rank: int
    lora_row_bytes: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.lora_pool + self.workspace


def text_memory(spec: ModelSpec, itemsize: int, *, max_seqs: int, max_context: int, kv_cache_mb: int | None,
                lora_slots: int, max_lora_rank: int, step_tokens: int,
                targets: tuple[str, ...] = LORA_TARGETS, quant: str | None = None,
                head_quant: str | None = None) -> TextMemory:
    """The allocation of an engine with exactly these settings."""
    context = min(max_context, spec.max_position_embeddings)
    per_block = kv_bytes_per_block(spec, itemsize)
    blocks = kv_blocks(spec, itemsize, max_seqs=max_seqs, context=context, kv_cache_mb=kv_cache_mb)
    rows = lora_pool_rows(lora_slots, max_lora_rank)
    row = lora_row_bytes(spec, itemsize, targets)
    return TextMemory(
        weights=text_weight_bytes(spec, itemsize, quant, head_quant), kv_cache=blocks * per_block,
        lora_pool=rows * row,
        workspace=workspace_bytes(spec, itemsize, max_seqs=max_seqs, context=context, step_tokens=step_tokens,
                                  lora_rows=rows),
        kv_cache_mb=kv_cache_mb, kv_cache_tokens=(blocks - 1) * BLOCK_SIZE, kv_block_bytes=per_block,
        lora_slots=lora_slots, max_lora_rank=max_lora_rank, lora_row_bytes=row)


def fit_text_memory(spec: ModelSpec, itemsize: int, *, budget: int | None, other: int = 0, max_seqs: int,
                    max_context: int, kv_cache_mb: int | None, lora_slots: int, max_lora_rank: int,
                    step_tokens: int, explicit: frozenset[str] = frozenset(), min_slots: int = 1,
                    quant: str | None = None, head_quant: str | None = None) -> TextMemory:
    """The text engine's allocation within `budget` bytes (None: the settings as they are), beside
    `other` bytes the image model takes on the same device; fitted slots stay at `min_slots` or more
    (a request's mix holds that many adapters in slots at once). OverBudget says why not."""
    def plan(kv_mb: int | None, slots: int) -> TextMemory:
        return text_memory(spec, itemsize, max_seqs=max_seqs, max_context=max_context, kv_cache_mb=kv_mb,
                           lora_slots=slots, max_lora_rank=max_lora_rank, step_tokens=step_tokens, quant=quant,
                           head_quant=head_quant)

    asked = plan(kv_cache_mb, lora_slots)
    if budget is None:
        return asked
    fixed_kv = kv_cache_mb is not None
    fixed_slots = "lora_slots" in explicit
    floor = max(1, min(min_slots, lora_slots))
    smallest = plan(kv_cache_mb if fixed_kv else 0, lora_slots if fixed_slots else floor)  # kv 0: one sequence
    need = smallest.total + other
    if need > budget:
        parts = [f"weights {_mib(smallest.weights)} MiB", f"step workspace {_mib(smallest.workspace)} MiB",
                 f"KV cache {_mib(smallest.kv_cache)} MiB ("
                 + ("kv_cache_mb" if fixed_kv else f"one sequence of {min(max_context, spec.max_position_embeddings)}"
                    " tokens") + ")",
                 f"LoRA pool {_mib(smallest.lora_pool)} MiB ({smallest.lora_slots} slot(s) x rank {max_lora_rank})"]
        if other:
            parts.append(f"image model {_mib(other)} MiB")
        alone = smallest.weights + other
        what = ("the model itself does not fit" if alone > budget
                else "the model and the smallest caches do not fit")
        raise OverBudget(
            f"{what} in gpu_memory_mb={budget // MIB}: it needs {_mib(need)} MiB ({', '.join(parts)}); raise "
            "gpu_memory_mb, or lower max_context / max_lora_rank"
            + (" / max_adapters_per_request" if not fixed_slots and floor > 1 else "")
            + (", or leave out kv_cache_mb / lora_slots to let them be fitted" if fixed_kv or fixed_slots else "")
            + (", or turn the image model off (image_model none)" if other else "")
            + ", or use a smaller model")
    room = budget - other
    slots = lora_slots
    if not fixed_slots:
        while slots > floor and plan(kv_cache_mb if fixed_kv else 0, slots).total > room:
            slots -= 1
        if slots < lora_slots:
            log.warning("memory budget: lora_slots %d -> %d to fit gpu_memory_mb=%d", lora_slots, slots,
                        budget // MIB)
    if fixed_kv:
        return plan(kv_cache_mb, slots)
    # The KV cache takes what is left, up to room for every sequence at full length (kv_cache_mb 0:
    # the engine's smallest pool, one sequence).
    base = plan(0, slots)
    context = min(max_context, spec.max_position_embeddings)
    full_mb = _mib(max_seqs * context * base.kv_block_bytes // BLOCK_SIZE)
    kv_mb = max(0, min(full_mb, (room - (base.total - base.kv_cache)) // MIB))
    while kv_mb > 0 and plan(kv_mb, slots).total > room:
        kv_mb -= 1
    return plan(kv_mb, slots)


# ---------------------------------------------------------------------------- the image model

def safetensors_numel(path: Path) -> int:
    """Elements of every tensor in a safetensors file, from its header alone."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for key, value in header.items():
        if key != "__metadata__":
            n = 1
            for d in value["shape"]:
                n *= int(d)
            total += n
    return total


def image_weight_bytes(folder: Path, itemsize: int) -> int:
    """Bytes of a diffusers pipeline's weights in the dtype it will run in (variant files such as
    `*.fp16.safetensors` only count where a component has no plain one: diffusers loads the plain one)."""
    total = 0
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
        total += sum(safetensors_numel(f) for f in (plain or files[:1])) * itemsize
    return total


# ---------------------------------------------------------------------------- the plan of one daemon

@dataclass(frozen=True)
class MemoryPlan:
    """What the daemon's engines take on one device; `describe()` is the /healthz and welcome report."""

    device: str
    budget: int | None
    text: TextMemory | None
    image: int
    device_total: int | None = None  # the device's memory (CUDA), for the log

    @property
    def reserved(self) -> int:
        return (self.text.total if self.text else 0) + self.image

    def describe(self, text_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """MiB figures: the budget, what is reserved (by part), what holds data now, and what the
        device (CUDA) or the process (CPU: resident memory) holds measured."""
        t = self.text
        used = self.image
        if t is not None:
            used += t.weights
            if text_stats:
                blocks = int(text_stats.get("kv_blocks_in_use", 0)) + int(text_stats.get("kv_blocks_cached", 0))
                used += blocks * t.kv_block_bytes + int(text_stats.get("lora_rows_in_use", 0)) * t.lora_row_bytes
        return {"device": self.device, "budget_mb": None if self.budget is None else self.budget // MIB,
                "reserved_mb": _mib(self.reserved), "used_mb": _mib(used),
                "weights_mb": _mib(t.weights) if t else 0, "kv_cache_mb": _mib(t.kv_cache) if t else 0,
                "lora_pool_mb": _mib(t.lora_pool) if t else 0, "workspace_mb": _mib(t.workspace) if t else 0,
                "image_mb": _mib(self.image), "kv_cache_tokens": t.kv_cache_tokens if t else 0,
                "lora_slots": t.lora_slots if t else 0,
                "measured_mb": _mib(measured_bytes(self.device)),
                "device_total_mb": None if self.device_total is None else self.device_total // MIB}


def measured_bytes(device: str) -> int:
    """What the device's allocator holds (CUDA), or the process's resident memory (CPU)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.memory_reserved(device))
    if sys.platform == "win32":
        return _windows_working_set()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak: KiB on Linux, bytes on macOS
        return int(rss if sys.platform == "darwin" else rss * 1024)


def _windows_working_set() -> int:
    """The process's working set on Windows (psapi's GetProcessMemoryInfo), 0 if it cannot be read."""
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    *((name, ctypes.c_size_t) for name in (
                        "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                        "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage",
                        "PeakPagefileUsage"))]

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    try:
        psapi: Any = ctypes.WinDLL("psapi")  # type: ignore[attr-defined]
        kernel32: Any = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE  # a pseudo handle: pointer-sized, not an int
        psapi.GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
        if psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return int(counters.WorkingSetSize)
    except (OSError, AttributeError):
        pass
    return 0


def fit_for_settings(settings: Settings, folder: Path, itemsize: int, *, other: int = 0) -> TextMemory:
    """`fit_text_memory` for the model in `folder` (dense, quantized at load by `settings.quantize`, or
    the int4 of an AWQ/GPTQ checkpoint) with the sizes, the budget and the explicit choices of `settings`."""
    from .engines.text.quant_formats import scheme_for

    scheme = scheme_for(folder, settings.quantize)
    return fit_text_memory(
        ModelSpec.from_folder(folder), itemsize, quant=scheme.weight_kind, head_quant=scheme.head_kind,
        budget=None if settings.gpu_memory_mb is None else settings.gpu_memory_mb * MIB,
        other=other, max_seqs=settings.max_seqs, max_context=settings.max_context, kv_cache_mb=settings.kv_cache_mb,
        lora_slots=settings.lora_slots, max_lora_rank=settings.max_lora_rank, step_tokens=settings.step_tokens,
        explicit=frozenset(n for n in FITTED if n in settings.model_fields_set),
        min_slots=settings.max_adapters_per_request)


def plan_for_settings(settings: Settings, text_folder: Path | None) -> MemoryPlan:
    """The plan of a daemon with these settings (`text_folder`: the resolved local text model, None
    when no text model runs here). Raises OverBudget before anything is allocated."""
    import torch

    from .engines.device import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    itemsize = torch.empty((), dtype=resolve_dtype(settings.dtype, device, half=torch.bfloat16)).element_size()
    budget = None if settings.gpu_memory_mb is None else settings.gpu_memory_mb * MIB
    total = None
    if device.type == "cuda":
        total = int(torch.cuda.get_device_properties(device).total_memory)
    image = _image_bytes(settings, device)
    text = None
    if text_folder is not None:
        text = fit_for_settings(settings, text_folder, itemsize, other=image)
    elif budget is not None and image > budget:
        raise OverBudget(f"the image model does not fit in gpu_memory_mb={settings.gpu_memory_mb}: its weights "
                         f"take {_mib(image)} MiB")
    plan = MemoryPlan(device=str(device), budget=budget, text=text, image=image, device_total=total)
    if budget is not None and total is not None and budget > total:
        log.warning("gpu_memory_mb=%d is more than the device has (%d MiB)", budget // MIB, total // MIB)
    return plan


def _image_bytes(settings: Settings, device: Any) -> int:
    """The image pipeline's weights on the device, 0 when it is off (or cannot load: its load says why)."""
    import importlib.util

    if settings.image_model == "none":
        return 0
    if settings.image_model == "default" and importlib.util.find_spec("diffusers") is None:
        return 0
    import torch

    from .engines.device import DTYPES, resolve_dtype
    from .engines.image.default_pipeline import ensure_default_image_model, is_placeholder_model
    from .engines.text.default_model import default_cache_dir

    folder = (ensure_default_image_model(settings.cache_dir or default_cache_dir())
              if settings.image_model == "default" else Path(settings.image_model).expanduser())
    if not (folder / "model_index.json").is_file():
        return 0
    placeholder = is_placeholder_model(folder)
    dtype = (DTYPES.get(settings.dtype, torch.float32) if placeholder
             else resolve_dtype(settings.dtype, device, half=torch.float16))
    return image_weight_bytes(folder, torch.empty((), dtype=dtype).element_size())
