"""CUDA graphs for decode steps: one recorded forward pass per (batch size, context, LoRA) bucket.

A decode step launches hundreds of small kernels; on a GPU their launch cost, not the weights'
bytes, bounds the step time. Recording the step once and replaying it removes that cost. A graph
needs fixed shapes and addresses, so the runner keeps static input buffers and pads:
- rows up to the next batch bucket (padding rows write into block 0, which no sequence owns),
- the PyTorch attention up to the next context bucket (the mask hides the rest; a kernel that
  reads the paged cache itself loops over each row's own length, and needs no bucket),
- LoRA in the dense form over the pool rows in use, rounded up to a power of two (one graph per
  width; [B, slots] scales are spread over the rows inside the graph through the storage's
  row->slot map), or no LoRA at all when every row is on the base model (a graph of its own, as
  fast as the base model).
Prefill steps and CPU runs use the eager path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .kv import PagedKV, gather_index
from .lora_plan import LoraBatch
from .lora_pool import LoraSlotStorage
from .model import StepInput, TextModel

__all__ = ["DecodeGraphs"]

log = logging.getLogger("loraloom.text")

_CONTEXT_BUCKET = 256


def _bucket(n: int, sizes: list[int]) -> int:
    for s in sizes:
        if s >= n:
            return s
    return sizes[-1]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ints: torch.Tensor  # [4 + W, batch]: token ids, positions, KV slots, lengths, block tables (one copy a step)
    slot_weights: torch.Tensor | None  # [batch, slots]: each row's scale per slot
    logits: torch.Tensor
    step: StepInput  # keeps every tensor the graph reads alive (e.g. logit_index)
    weights_key: Hashable = None  # whose scales `slot_weights` holds now


class _KernelGaveUp(Exception):
    pass


class DecodeGraphs:
    def __init__(self, model: TextModel, kv: PagedKV, storage: LoraSlotStorage, *, max_rows: int, table_width: int,
                 max_context: int) -> None:
        self.model = model
        self.kv = kv
        self.storage = storage
        self.table_width = table_width
        self.max_context = max_context
        self.batch_sizes = sorted({1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256} & set(range(1, max_rows + 1))
                                  | {max_rows})
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self.replays = 0

    def _paged(self) -> bool:
        """Whether decode attention reads the paged cache itself (and so needs no context bucket)."""
        kernels = self.model.kernels
        return bool(kernels.reads_pages and not kernels.failures)

    def _capture(self, batch: int, context: int, width: int) -> _Graph:
        """A graph for `batch` rows, `context` keys (0: the kernel reads each row's own length) and
        `width` LoRA pool rows (0: no LoRA)."""
        lora = width > 0
        dev = self.model.device
        ints = torch.zeros(4 + self.table_width, batch, dtype=torch.long, device=dev)
        ints[3] = 1
        tables = ints[4:].t()  # [batch, W]: a view, so one copy fills everything
        slot_weights = torch.zeros(batch, self.storage.num_slots, dtype=self.model.dtype, device=dev) if lora else None
        step = StepInput(input_ids=ints[0], positions=ints[1], slots=ints[2], num_decode=batch, decode_tables=tables,
                         decode_lens=ints[3], decode_index=None, prefill=[], prefill_tables=None,
                         logit_index=torch.arange(batch, device=dev), lora=LoraBatch(mode="none"))

        def forward() -> torch.Tensor:
            if slot_weights is not None:  # spread over the rows inside the graph: the host copies [B, S] only
                step.lora = LoraBatch(mode="dense", weights=self.storage.row_weights(slot_weights, width))
            if context:
                step.decode_index = gather_index(tables, context, self.kv.block_size)
            return self.model.forward(step, self.kv, self.storage)

        stream = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the capture
                forward()
        torch.cuda.current_stream(dev).wait_stream(stream)
        if not context and not self._paged():
            raise _KernelGaveUp  # the paged kernel failed while warming up: record with gathered keys instead
        graph = torch.cuda.CUDAGraph()
        # Each graph gets its own memory pool: graphs are replayed in any order, so sharing one
        # would let a replay overwrite another graph's intermediates.
        with torch.cuda.graph(graph):
            logits = forward()
        log.debug("captured a decode graph: batch %d, context %d, LoRA rows %d", batch, context, width)
        return _Graph(graph, ints, slot_weights, logits, step)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            slot_weights: Callable[[], torch.Tensor] | None, weights_key: Hashable = None) -> torch.Tensor:
        """Logits [len(ids), vocab] for a decode-only step. `slot_weights` gives the [n, slots] scales on
        the host (None: every row on the base model); it is only called, and its result copied, when
        `weights_key` differs from the key of the scales this graph last ran with (None: always)."""
        n = len(ids)
        batch = _bucket(n, self.batch_sizes)
        width = 0 if slot_weights is None else self.storage.width(graph=True)
        g = None
        for _ in range(2):
            context = 0
            if not self._paged():
                longest = max(positions) + 1
                context = min(-(-longest // _CONTEXT_BUCKET) * _CONTEXT_BUCKET, self.max_context)
            key = (batch, context, width)
            g = self._graphs.get(key)
            if g is not None:
                break
            try:
                g = self._graphs[key] = self._capture(*key)
                break
            except _KernelGaveUp:
                continue
        assert g is not None
        pad = batch - n
        w = self.table_width
        rows = [ids + [0] * pad, positions + [0] * pad, slots + [0] * pad, [p + 1 for p in positions] + [1] * pad]
        host = torch.tensor(rows + [list(col) for col in zip(*(tables + [[0] * w] * pad), strict=True)])
        g.ints.copy_(host, non_blocking=True)
        if g.slot_weights is not None and (weights_key is None or weights_key != g.weights_key):
            assert slot_weights is not None
            g.slot_weights[:n].copy_(slot_weights(), non_blocking=True)
            g.slot_weights[n:].zero_()
            g.weights_key = weights_key
        g.graph.replay()
        self.replays += 1
        return g.logits[:n]
