"""A LoRA slot storage fused into a small fake model's weights, and its plain-loop reference.

Shared by test_lora_ops.py (PyTorch paths and the numba loop) and test_triton_lora.py (the Triton kernel, on CUDA or
under Triton's interpreter in a subprocess: run this file with TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib
import sys

import torch

from daemon.engines.text.kernels import NumbaKernels, TorchKernels, TritonKernels
from daemon.engines.text.lora import lora_project, lora_reference
from daemon.engines.text.lora_plan import LoraBatch
from daemon.engines.text.lora_pool import GROUPS, LoraSlotStorage, PreparedLora

KERNELS = {"torch": TorchKernels, "numba": NumbaKernels, "triton": TritonKernels}

# Odd-sized on purpose: q/k/v of 48/16/16 columns, MLP of 80 (not a multiple of 32).
DIMS = {"q_proj": (32, 48), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (48, 32),
        "gate_proj": (32, 80), "up_proj": (32, 80), "down_proj": (80, 32)}
SLOTS, MAX_RANK = 4, 8
RANKS = (4, 8, 2, 8)  # one adapter per slot: the pool packs them in 22 rows, not 32
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SOME = ("q_proj", "v_proj", "up_proj")


class FakeModel:
    """One layer of group weights (qkv, o, gate_up, down), fused the way TextModel does it."""

    def __init__(self, dtype: torch.dtype, device: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weights: dict[str, torch.Tensor] = {}
        for key, members in GROUPS:
            out = sum(DIMS[t][1] for t in members)
            self.weights[key] = torch.randn(out, DIMS[members[0]][0], generator=g).to(device, dtype)
        self.bias = torch.randn(self.weights["qkv"].shape[0], generator=g).to(device, dtype)

    def fuse_rows(self, layer: int, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weights[key]
        fused = torch.cat([w, torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)])
        bias = torch.cat([self.bias, torch.zeros(rows, dtype=w.dtype, device=w.device)]) if key == "qkv" else None
        return fused, bias


def make_lora(rank: int, targets: tuple[str, ...], seed: int) -> PreparedLora:
    g = torch.Generator().manual_seed(seed)
    parts = {t: (torch.randn(rank, DIMS[t][0], generator=g) / 4, torch.randn(rank, DIMS[t][1], generator=g) / 4)
             for t in targets}
    return PreparedLora(rank=rank, targets=targets, layers=(parts,))


def build(targets: tuple[str, ...], dtype: torch.dtype = torch.float32, device: str = "cpu",
          seed: int = 0) -> tuple[FakeModel, LoraSlotStorage, list[PreparedLora]]:
    model = FakeModel(dtype, device, seed)
    storage = LoraSlotStorage(model, num_layers=1, target_dims=DIMS, targets=targets, num_slots=SLOTS,
                              max_rank=MAX_RANK, device=torch.device(device), dtype=dtype)
    loras = [make_lora(rank, targets, seed + 1 + slot) for slot, rank in enumerate(RANKS)]
    for slot, lora in enumerate(loras):
        storage.load(slot, lora)
    return model, storage, loras


def rows_case(t: int) -> tuple[list[list[int]], list[list[float]]]:
    """Base rows, single adapters and mixes; every slot used within the first three rows."""
    pattern = ([1, 2, 3], [0], [], [2], [3], [0, 3], [1], [2])
    scales = ([1.0, -0.5, 0.25], [1.0], [], [-1.0], [2.0], [0.3, 0.7], [0.5], [0.0])
    return [list(pattern[i % 8]) for i in range(t)], [list(scales[i % 8]) for i in range(t)]


def slot_matrix(slots: list[list[int]], scales: list[list[float]]) -> torch.Tensor:
    w = torch.zeros(len(slots), SLOTS)
    for i, (row, sc) in enumerate(zip(slots, scales, strict=True)):
        for s, x in zip(row, sc, strict=True):
            w[i, s] += x
    return w


def compare(model: FakeModel, storage: LoraSlotStorage, loras: list[PreparedLora], batch: LoraBatch,
            slots: list[list[int]], scales: list[list[float]], *, kernel: str = "torch") -> float:
    """Largest error of lora_project over every group against base GEMM + the plain loop over the
    adapters' own matrices, relative to the largest reference value. The o and down groups also
    add a residual stream (as the model calls them)."""
    device, dtype = storage.device, model.bias.dtype
    kernels = KERNELS[kernel](device)
    worst = 0.0
    g = torch.Generator().manual_seed(7)
    for key, members in GROUPS:
        group = storage.groups[0].get(key)
        x = torch.randn(len(slots), DIMS[members[0]][0], generator=g).to(device, dtype)
        bias = model.bias if key == "qkv" else None
        residual = None
        if key in ("o", "down"):
            residual = torch.randn(len(slots), model.weights[key].shape[0], generator=g).to(device, dtype)
        got = lora_project(x, model.weights[key], bias, group, batch, kernels, residual=residual).double()
        assert not kernels.failures, kernels.failures
        want = torch.nn.functional.linear(x.double(), model.weights[key].double(),
                                          None if bias is None else bias.double())
        if residual is not None:
            want += residual.double()
        col = 0
        for target in members:
            width = DIMS[target][1]
            if target in storage.targets:
                mats = [(lora.layers[0][target][0].double().to(device), lora.layers[0][target][1].double().to(device))
                        for lora in loras]
                want[:, col:col + width] += lora_reference(x.double(), list(mats), slots, scales)
            col += width
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


def check(dtype: torch.dtype, device: str, t: int, *, kernel: str, targets: tuple[str, ...]) -> float:
    """The dense-over-the-prefix path (the one the kernels take) on every group: the relative error."""
    model, storage, loras = build(targets, dtype, device)
    slots, scales = rows_case(t)
    batch = LoraBatch.plan(slot_matrix(slots, scales), storage, dtype=dtype, prefer_prefix=True)
    assert batch.mode == "dense" and batch.rows is None  # the fused path
    # Record that the kernel really ran (the Triton one declines shapes it cannot do).
    hooks = {"triton": ("triton_lora", "expand_fused"), "numba": ("cpu_lora", "apply_group")}
    module, name = hooks.get(kernel, ("", ""))
    launches: list[bool] = []
    if module:
        mod = importlib.import_module(f"daemon.engines.text.{module}")
        run = getattr(mod, name)

        def counted(*args: object, **kw: object) -> bool:
            launches.append(run(*args, **kw) is not False)
            return launches[-1]

        setattr(mod, name, counted)
    try:
        return compare(model, storage, loras, batch, slots, scales, kernel=kernel)
    finally:
        if module:
            setattr(mod, name, run)
            assert launches and all(launches), launches


if __name__ == "__main__":  # under TRITON_INTERPRET=1: the kernel on the CPU
    for targets in (ALL, SOME):
        for t in (3, 40, 100, 200):
            err = check(torch.float32, "cpu", t, kernel="triton", targets=targets)
            print(f"targets={len(targets)} rows={t} err={err:.2e}")
            if err > 1e-5:
                sys.exit(1)
