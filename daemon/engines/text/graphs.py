"""CUDA graphs for decode steps: one recorded forward pass per (batch size, context, LoRA) bucket.

A decode step launches hundreds of small kernels; on a GPU their launch cost, not the weights'
bytes, bounds the step time. Recording the step once and replaying it removes that cost. A graph
needs fixed shapes and addresses, so the runner keeps static input buffers and pads:
- rows up to the next batch bucket (padding rows write into a scratch KV-cache row),
- attention up to the next context bucket (the mask hides the rest),
- LoRA in the dense form over all slots ([B, slots*rank] weights; zero for base rows), or no LoRA
  at all when every row is on the base model (a graph of its own, as fast as the base model).
Prefill steps and CPU runs use the eager path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .lora import LoraBatch, LoraSlotStorage
from .model import KVCache, StepInput, TextModel

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
    ids: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor
    lens: torch.Tensor
    weights: torch.Tensor | None
    logits: torch.Tensor
    step: StepInput  # keeps every tensor the graph reads alive (e.g. logit_index)


class DecodeGraphs:
    def __init__(self, model: TextModel, cache: KVCache, storage: LoraSlotStorage, *, max_rows: int,
                 scratch_row: int) -> None:
        self.model = model
        self.cache = cache
        self.storage = storage
        self.scratch_row = scratch_row
        self.batch_sizes = sorted({1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256} & set(range(1, max_rows + 1))
                                  | {max_rows})
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}
        self.replays = 0

    def _capture(self, batch: int, context: int, lora: bool) -> _Graph:
        dev = self.model.device
        s, r = self.storage.num_slots, self.storage.max_rank
        ids = torch.zeros(batch, dtype=torch.long, device=dev)
        pos = torch.zeros(batch, dtype=torch.long, device=dev)
        rows = torch.full((batch,), self.scratch_row, dtype=torch.long, device=dev)
        lens = torch.ones(batch, dtype=torch.long, device=dev)
        weights = torch.zeros(batch, s * r, dtype=self.model.dtype, device=dev) if lora else None
        step = StepInput(input_ids=ids, positions=pos, cache_rows=rows, num_decode=batch, decode_rows=rows,
                         decode_lens=lens, max_decode_len=context, prefill=[],
                         logit_index=torch.arange(batch, device=dev),
                         lora=LoraBatch(mode="dense", weights=weights) if lora else LoraBatch(mode="none"))
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the capture
                self.model.forward(step, self.cache, self.storage)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Each graph gets its own memory pool: graphs are replayed in any order, so sharing one
        # would let a replay overwrite another graph's intermediates.
        with torch.cuda.graph(graph):
            logits = self.model.forward(step, self.cache, self.storage)
        log.debug("captured a decode graph: batch %d, context %d, lora %s", batch, context, lora)
        return _Graph(graph, ids, pos, rows, lens, weights, logits, step)

    def run(self, ids: list[int], positions: list[int], rows: list[int], weights: torch.Tensor | None) -> torch.Tensor:
        """Logits [len(ids), vocab] for a decode-only step. `weights` [n, slots*rank] on the host, or None."""
        n = len(ids)
        batch = _bucket(n, self.batch_sizes)
        longest = max(positions) + 1
        context = min(-(-longest // _CONTEXT_BUCKET) * _CONTEXT_BUCKET, self.cache.max_len)
        key = (batch, context, weights is not None)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(batch, context, weights is not None)
        pad = batch - n
        g.ids.copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        g.pos.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        g.rows.copy_(torch.tensor(rows + [self.scratch_row] * pad), non_blocking=True)
        g.lens.copy_(torch.tensor([p + 1 for p in positions] + [1] * pad), non_blocking=True)
        if g.weights is not None:
            assert weights is not None
            g.weights[:n].copy_(weights, non_blocking=True)
            g.weights[n:].zero_()
        g.graph.replay()
        self.replays += 1
        return g.logits[:n]
