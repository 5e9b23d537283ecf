"""Small host lists to the device without waiting for it.

`torch.tensor(values, device="cuda")` builds the tensor on the host and copies it with a stream
synchronisation: the host waits there for every kernel queued before it. In the middle of a step
(the forward launched, the host going on with the text of the last token, the sampler's inputs)
that wait serialises the two: the device idles while the host works after it. These helpers copy
through a C buffer with `non_blocking`: from pageable memory the driver stages the bytes before
the call returns, so the host list may go at once, and the copy takes its place in the stream
without a wait. On the CPU they return the host tensor itself. They are also the faster
conversion there: `array` reads a list of ints in a C loop, where `torch.tensor` checks each one.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

__all__ = ["bools", "floats", "longs"]


def _send(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def longs(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on `device`."""
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    return _send(torch.frombuffer(array("q", values), dtype=torch.int64), device)


def floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """float32 [len(values)] on `device`."""
    if not values:
        return torch.empty(0, dtype=torch.float32, device=device)
    return _send(torch.frombuffer(array("f", values), dtype=torch.float32), device)


def bools(values: Sequence[bool], device: torch.device) -> torch.Tensor:
    """bool [len(values)] on `device`."""
    if not values:
        return torch.empty(0, dtype=torch.bool, device=device)
    return _send(torch.frombuffer(bytearray(bool(v) for v in values), dtype=torch.bool), device)
