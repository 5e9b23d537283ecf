"""Which device and dtype an engine runs on: the `device` and `dtype` settings, resolved once.

`auto` picks CUDA, then Apple's MPS, then the CPU; the dtype `auto` is each engine's choice for
that device (`half`: bfloat16 for text, float16 for images), and float32 on a CPU.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_name", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, *, allow_mps: bool = False) -> torch.device:
    """`auto` or a torch device name (cpu, cuda, cuda:1, mps) -> the device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if allow_mps and mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None


def resolve_dtype(name: str, device: torch.device, *, half: torch.dtype) -> torch.dtype:
    """`auto` (`half` on a GPU, float32 on a CPU) or a dtype name -> the dtype."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else half
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (use auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
