"""CUDA graphs for steps: one recorded forward pass per (decode rows, prompt-chunk tokens, context,
LoRA) bucket.

A step launches hundreds of small kernels; on a GPU their launch cost, not the weights' bytes,
bounds the step time. Recording the step once and replaying it removes that cost. A graph needs
fixed shapes and addresses, so the runner keeps static input buffers (one flat int buffer, filled
by one copy a replay) and pads:
- decode rows up to the next batch bucket (padding rows write into block 0, which no sequence owns),
- a step's prompt chunks (up to MAX_CHUNKS, next to the decode rows) together up to the next chunk
  bucket: each chunk's start, length and first position are read from the device by the paged
  prefill kernel, so one graph serves chunks anywhere in any prompts (padding tokens write into
  block 0, their rows are dropped; unused chunk entries have no tokens),
- the PyTorch decode attention up to the next context bucket (the mask hides the rest; the paged
  kernels loop over each row's own length and need no bucket; chunks need the kernels),
- LoRA in the dense form over the pool rows in use, rounded up to a power of two (one graph per
  width; per-token [T, slots] scales are spread over the rows inside the graph through the
  storage's row->slot map), or no LoRA at all when every row is on the base model.
Steps with more chunks or chunk tokens than the largest bucket, and CPU runs, use the eager path.

The host copies what changes: the flat buffer holds the small per-row inputs (one copy a replay)
and, last, the decode rows' block tables, which a graph keeps as they were sent and updates only in
the rows whose table changed (a sequence that crossed into a new block, another sequence in the
row): at a 4,096-token context a table row is 256 ints, and sending all of them every step was
the largest part of a step's host time.

`record=False` runs the same buffers through the forward pass eagerly, with no recording: the CPU
test suite checks the graph inputs that way (layout, padding, tables, scales) against PEFT.

Deterministic mode (`invariant`, `fixed_rows`) records decode steps only, of exactly `max_rows` rows
(the row count its matmuls are fixed to), with LoRA always on and dense over the whole pool, and
one pass per mix member: `slot_weights` is then [members, tokens, slots], one graph per member
count. Its prompt steps run eagerly.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from .kv import PagedKV, PrefillChunk, gather_index
from .lora_plan import LoraBatch
from .lora_pool import LoraSlotStorage
from .model import StepInput, TextModel

__all__ = ["CHUNK_BUCKETS", "MAX_CHUNKS", "StepGraphs"]

log = logging.getLogger("loraloom.text")

_CONTEXT_BUCKET = 256
CHUNK_BUCKETS = (64, 128, 256, 512)  # prompt tokens of one step (finer buckets measured no faster)
MAX_CHUNKS = 8  # prompt chunks of one step (a crowd of NPCs starting new 64-token lines: 8 fill a step)


def _bucket(n: int, sizes: Sequence[int]) -> int:
    for s in sizes:
        if s >= n:
            return s
    return sizes[-1]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: not recorded (`record=False`), `forward` runs each time
    ints: torch.Tensor  # every int input in one buffer (see `_layout`)
    tables: torch.Tensor  # [batch, table width]: the decode rows' block tables, a view of `ints`
    forward: Callable[[], torch.Tensor]
    slot_weights: torch.Tensor | None  # [tokens, slots]: each token's scale per slot ([members, ...] per mix member)
    logits: torch.Tensor | None  # the recorded output (None when not recorded)
    step: StepInput  # keeps every tensor the graph reads alive
    weights_key: Hashable = None  # whose scales `slot_weights` holds now
    sent: list[tuple[int, ...]] = field(default_factory=list)  # each decode row's table as `tables` holds it


class _KernelGaveUp(Exception):
    pass


@dataclass(frozen=True)
class StepRows:
    """One step's host-side inputs for a graph: decode rows, then up to MAX_CHUNKS prompt chunks."""

    ids: list[int]  # decode tokens, then each chunk's tokens
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]  # the decode rows' block tables (unpadded)
    chunk_tables: list[list[int]] = field(default_factory=list)  # each chunk's sequence's block table
    chunk_pos0: list[int] = field(default_factory=list)  # each chunk's first position
    chunk_lens: list[int] = field(default_factory=list)


class StepGraphs:
    def __init__(self, model: TextModel, kv: PagedKV, storage: LoraSlotStorage, *, max_rows: int, table_width: int,
                 max_context: int, fixed_rows: bool = False, record: bool = True) -> None:
        self.model = model
        self.kv = kv
        self.storage = storage
        self.table_width = table_width
        self.max_context = max_context
        self.fixed_rows = fixed_rows  # deterministic mode: decode steps of max_rows rows only, LoRA per member
        self.record = record  # False: the forward runs eagerly on the same buffers (tests on the CPU)
        self.batch_sizes = [max_rows] if fixed_rows else sorted(
            {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256} & set(range(1, max_rows + 1)) | {max_rows})
        self._graphs: dict[tuple[int, int, int, int, int], _Graph] = {}
        self.replays = 0
        self.chunk_replays = 0  # replays that carried a prompt chunk
        self.captures = 0  # graphs recorded (each costs about three steps' time, the step that meets it waits)

    def paged(self) -> bool:
        """Whether attention reads the paged cache itself (chunk graphs need it; decode needs no bucket)."""
        kernels = self.model.kernels
        return bool(kernels.reads_pages and not kernels.failures)

    def takes(self, decode_rows: int, chunks: int, chunk_tokens: int) -> bool:
        if self.fixed_rows:
            return 0 < decode_rows <= self.batch_sizes[-1] and chunks == 0
        return decode_rows <= self.batch_sizes[-1] and chunks <= MAX_CHUNKS and chunk_tokens <= CHUNK_BUCKETS[-1] \
            and (chunks == 0 or self.paged())

    def _layout(self, batch: int, chunk: int) -> dict[str, slice]:
        """Where each input sits in the flat int buffer of a (batch, chunk) graph: what `_host` sends
        every replay, then the decode rows' tables (sent by the row, as they change)."""
        t, w = batch + chunk, self.table_width
        sizes = [("ids", t), ("positions", t), ("slots", t), ("lens", batch)]
        if chunk:
            sizes += [("meta", 3 * MAX_CHUNKS), ("chunk_tables", MAX_CHUNKS * w), ("logit_index", batch + MAX_CHUNKS)]
        sizes.append(("tables", batch * w))
        out, at = {}, 0
        for name, n in sizes:
            out[name] = slice(at, at + n)
            at += n
        return out

    def _capture(self, batch: int, chunk: int, context: int, width: int, members: int) -> _Graph:
        lora = width > 0
        dev = self.model.device
        layout = self._layout(batch, chunk)
        ints = torch.zeros(max(s.stop for s in layout.values()), dtype=torch.long, device=dev)
        ints[layout["lens"]] = 1
        tokens = batch + chunk
        tables = ints[layout["tables"]].view(batch, self.table_width)
        shape = (members, tokens, self.storage.num_slots) if members else (tokens, self.storage.num_slots)
        slot_weights = torch.zeros(shape, dtype=self.model.dtype, device=dev) if lora else None
        if chunk:
            ints[layout["meta"]][:3] = torch.tensor([batch, 1, 0], device=dev)  # the rest: chunks of no tokens
            ints[layout["logit_index"]] = torch.arange(batch + MAX_CHUNKS, device=dev)
        step = StepInput(
            input_ids=ints[layout["ids"]], positions=ints[layout["positions"]], slots=ints[layout["slots"]],
            num_decode=batch, decode_tables=tables, decode_lens=ints[layout["lens"]], decode_index=None,
            prefill=[PrefillChunk(start=batch, end=tokens, pos0=0, table=0)] if chunk else [],
            prefill_tables=ints[layout["chunk_tables"]].view(MAX_CHUNKS, self.table_width) if chunk else None,
            prefill_meta=ints[layout["meta"]].view(MAX_CHUNKS, 3) if chunk else None, prefill_longest=chunk,
            logit_index=ints[layout["logit_index"]] if chunk else torch.arange(batch, device=dev),
            lora=LoraBatch(mode="none"))

        def forward() -> torch.Tensor:
            if slot_weights is not None and members:  # [members, T, pool rows]: one expand per member
                step.lora = LoraBatch(mode="dense", weights=torch.stack(
                    [self.storage.row_weights(w, width) for w in slot_weights]))
            elif slot_weights is not None:  # spread over the rows inside the graph: the host copies [T, S] only
                step.lora = LoraBatch(mode="dense", weights=self.storage.row_weights(slot_weights, width))
            if context:
                step.decode_index = gather_index(tables, context, self.kv.block_size)
            return self.model.forward(step, self.kv, self.storage)

        if not self.record:
            return _Graph(None, ints, tables, forward, slot_weights, None, step, sent=[()] * batch)
        stream = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the capture
                forward()
        torch.cuda.current_stream(dev).wait_stream(stream)
        if not context and not self.paged():
            raise _KernelGaveUp  # a paged kernel failed while warming up: record with gathered keys instead
        graph = torch.cuda.CUDAGraph()
        # Each graph gets its own memory pool: graphs are replayed in any order, so sharing one
        # would let a replay overwrite another graph's intermediates.
        with torch.cuda.graph(graph):
            logits = forward()
        self.captures += 1
        log.debug("captured a graph: %d decode rows, %d chunk tokens, context %d, LoRA rows %d, mix members %d",
                  batch, chunk, context, width, members)
        return _Graph(graph, ints, tables, forward, slot_weights, logits, step, sent=[()] * batch)

    def run(self, rows: StepRows, slot_weights: Callable[[], torch.Tensor] | None,
            weights_key: Hashable = None, members: int = 0,
            from_device: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the decode rows, then of each chunk's last token. `slot_weights`
        gives the [tokens, slots] scales on the host (None: every token on the base model); it is
        only called, and its result copied, when `weights_key` differs from the key of the scales
        the graph last ran with (None: always). With `members` (deterministic mode) they are
        [members, tokens, slots], and LoRA reads the whole pool. `from_device` (decode rows, their
        input tokens on the device) replaces those rows' ids (the tokens of a step still in flight)."""
        n = len(rows.tables)
        chunk_len = sum(rows.chunk_lens)
        batch = _bucket(n, self.batch_sizes) if n else 0
        chunk = _bucket(chunk_len, CHUNK_BUCKETS) if chunk_len else 0
        width = 0 if slot_weights is None else self.storage.rows if members else self.storage.width(graph=True)
        g = None
        for _ in range(2):
            context = 0
            if not self.paged():
                longest = max(rows.positions[:n]) + 1
                context = min(-(-longest // _CONTEXT_BUCKET) * _CONTEXT_BUCKET, self.max_context)
            key = (batch, chunk, context, width, members)
            g = self._graphs.get(key)
            if g is not None:
                break
            try:
                g = self._graphs[key] = self._capture(batch, chunk, context, width, members)
                break
            except _KernelGaveUp:
                continue
        assert g is not None
        host = self._host(rows, batch, chunk)
        assert len(host) == g.tables.storage_offset(), "the host inputs and the layout disagree"
        # array('q') -> tensor is a C loop; torch.tensor(list) checks each int (~2,000 in a chunk step: 7x slower).
        g.ints[:len(host)].copy_(torch.frombuffer(array("q", host), dtype=torch.int64), non_blocking=True)
        if from_device is not None:  # the layout starts with the decode rows' ids
            g.ints.index_copy_(0, *from_device)
        self._send_tables(g, rows.tables, batch)
        if g.slot_weights is not None and (weights_key is None or weights_key != g.weights_key):
            assert slot_weights is not None
            per_token = slot_weights()
            g.slot_weights.zero_()
            if members:
                g.slot_weights[:, :n].copy_(per_token[:, :n], non_blocking=True)
            else:
                g.slot_weights[:n].copy_(per_token[:n], non_blocking=True)
            if chunk_len:
                g.slot_weights[batch:batch + chunk_len].copy_(per_token[n:], non_blocking=True)
            g.weights_key = weights_key
        if g.graph is None:
            logits = g.forward()
        else:
            g.graph.replay()
            assert g.logits is not None
            logits = g.logits
        self.replays += 1
        self.chunk_replays += bool(chunk_len)
        if not chunk_len:
            return logits[:n]
        return torch.cat([logits[:n], logits[batch:batch + len(rows.chunk_lens)]])

    def _send_tables(self, g: _Graph, tables: list[list[int]], batch: int) -> None:
        """The decode rows' tables into the graph's, only the rows that differ from what it holds
        (padding rows: all zeros, block 0)."""
        want = [tuple(t) for t in tables] + [()] * (batch - len(tables))
        changed = [i for i, (a, b) in enumerate(zip(want, g.sent, strict=True)) if a != b]
        if not changed:
            return
        w = self.table_width
        rows = torch.tensor([list(want[i]) + [0] * (w - len(want[i])) for i in changed], dtype=torch.long)
        index = torch.tensor(changed, dtype=torch.long)
        g.tables.index_copy_(0, index.to(g.tables.device, non_blocking=True),
                             rows.to(g.tables.device, non_blocking=True))
        for i in changed:
            g.sent[i] = want[i]

    def _host(self, rows: StepRows, batch: int, chunk: int) -> list[int]:
        """The flat int buffer's content, in `_layout` order."""
        n, w = len(rows.tables), self.table_width
        pad, cpad = batch - n, chunk - sum(rows.chunk_lens)

        def spread(values: list[int], fill: int) -> list[int]:  # decode part padded, then chunk part padded
            return values[:n] + [fill] * pad + values[n:] + [fill] * cpad

        out = spread(rows.ids, 0) + spread(rows.positions, 0) + spread(rows.slots, 0)
        out += [p + 1 for p in rows.positions[:n]] + [1] * pad
        if chunk:
            unused = MAX_CHUNKS - len(rows.chunk_lens)
            starts = [batch + sum(rows.chunk_lens[:j]) for j in range(len(rows.chunk_lens))]
            for start, count, pos0 in zip(starts, rows.chunk_lens, rows.chunk_pos0, strict=True):
                out += [start, count, pos0]
            out += [0, 0, 0] * unused
            for table in rows.chunk_tables:
                out += table
            out += [0] * (unused * w)
            out += list(range(n)) + [0] * pad
            out += [start + count - 1 for start, count in zip(starts, rows.chunk_lens, strict=True)] + [0] * unused
        return out
