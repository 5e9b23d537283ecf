"""One step on the device: a `StepPlan` -> tensors -> a CUDA graph or the eager forward -> logits
(-> constrained rows masked) -> one sampled token per sequence that needs one.

Steps on CUDA replay a recorded graph (`graphs`: decode rows and up to eight prompt chunks); other
steps, and every step on a CPU, run `TextModel.forward` eagerly. Each token's keys and values go to the slot its
sequence's block table gives its position. The LoRA plan of a step (`lora_plan.LoraBatch`) comes
from each sequence's per-slot scales, kept here for as long as the sequence runs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import torch

from .graphs import StepGraphs, StepRows
from .invariant import MIN_ROWS
from .kernels import Kernels
from .kv import PagedKV, PrefillChunk, gather_index
from .lora_plan import LoraBatch
from .lora_pool import LoraSlotStorage
from .model import StepInput, TextModel
from .request import EngineConfig
from .sampler import choose
from .scheduler import Sequence, StepPlan
from .transfer import longs

if TYPE_CHECKING:
    from .constraints import RowMasks

__all__ = ["Launched", "ModelRunner"]


class Launched:
    """A step whose forward and sampling are queued on the device. On CUDA its tokens' copy to
    the host is queued too, behind them and before anything launched later, so `tokens()` waits
    for this step alone, not for the next one the host may have launched meanwhile."""

    def __init__(self, plan: StepPlan, sample: list[Sequence], device_tokens: torch.Tensor | None) -> None:
        self.plan, self.sample, self.device_tokens = plan, sample, device_tokens
        self._rows = {s.serial: i for i, s in enumerate(sample)}
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        if device_tokens is not None and device_tokens.is_cuda:
            self._host = torch.empty(device_tokens.shape, dtype=device_tokens.dtype, pin_memory=True)
            self._host.copy_(device_tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def row(self, seq: Sequence) -> int:
        """Where `seq`'s token is in this step's tokens."""
        return self._rows[seq.serial]

    def tokens(self) -> list[int]:
        """The next token of each sequence in `sample` (waits for the device)."""
        if self.device_tokens is None:
            return []
        if self._ready is None or self._host is None:
            return self.device_tokens.tolist()
        self._ready.synchronize()
        return self._host.tolist()


class ModelRunner:
    def __init__(self, model: TextModel, kv: PagedKV, storage: LoraSlotStorage, kernels: Kernels,
                 config: EngineConfig, graphs: StepGraphs | None, *, table_width: int) -> None:
        self.model = model
        self.kv = kv
        self.table_width = table_width
        self.storage = storage
        self.kernels = kernels
        self.config = config
        self.graphs = graphs
        self.device = model.device
        self.dtype = model.dtype
        self.last_batch_size = 0
        # Test and debugging hook: called with (request keys, float32 logits) after every forward.
        self.on_logits: Callable[[list[Hashable], torch.Tensor], None] | None = None
        self.masks: RowMasks | None = None  # created with the first constrained row
        # Sequences whose grammar the last step found complete with their previous token (`output`).
        self.grammar_done: list[Sequence] = []
        self.in_flight: Launched | None = None  # the last step launched
        # (sequence serial, its slots) -> its scale per slot (float32, host); a paused sequence may come
        # back in other slots.
        self._weights: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def forget(self, seq: Sequence) -> None:
        for key in [k for k in self._weights if k[0] == seq.serial]:
            del self._weights[key]

    def run(self, plan: StepPlan, while_running: Callable[[], None] | None = None) -> list[int]:
        """Run the step; the next token of each sequence in `plan.sample`, in that order.
        `while_running` is called once the forward is launched (on CUDA the device is busy with it
        meanwhile); sequences it finishes still get a token, which the caller drops."""
        return self.launch(plan, while_running).tokens()

    def launch(self, plan: StepPlan, while_running: Callable[[], None] | None = None) -> Launched:
        """Queue the step's forward and sampling; its tokens come with `Launched.tokens()`, and
        until then a later step may take them as the input of its decode rows (`_decode_ids`)."""
        logits = self._forward(plan)  # on CUDA still running while the matchers and masks work
        if while_running is not None:
            while_running()
        sample_seqs = plan.sample
        self.grammar_done = []
        self.in_flight = Launched(plan, sample_seqs, self._choose(plan, logits))
        return self.in_flight

    def _choose(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor | None:
        sample_seqs = plan.sample
        if not sample_seqs:  # only prompt chunks that end mid-prompt
            return None
        rows = [i for i, s in enumerate(sample_seqs) if s.grammar is not None and not s.finished]
        if rows:
            if self.masks is None:
                from .constraints import RowMasks

                self.masks = RowMasks(logits.shape[1], logits.device)
            masks = self.masks
            # A sequence whose last token completed its grammar ends there (this row's token is dropped).
            done = masks.take_pending([sample_seqs[i] for i in rows])
            self.grammar_done = [sample_seqs[i] for i, d in zip(rows, done, strict=True) if d]
            constrained = [i for i, d in zip(rows, done, strict=True) if not d]
            if constrained:
                logits = masks.apply(logits, constrained, masks.compute([sample_seqs[i].grammar for i in constrained]))
        if self.on_logits is not None:
            self.on_logits([s.key for s in sample_seqs], logits)
        params = [s.request.sampling for s in sample_seqs]
        # Token histories only for the rows with a repetition penalty (the others never read them);
        # a decode row's input token, still on the device, ends its history there (`late`).
        late = [i for i, s in enumerate(plan.decode) if params[i].repetition_penalty != 1.0 and s.fed == s.context_len]
        histories = [s.request.prompt_ids + s.tokens if p.repetition_penalty != 1.0 else []
                     for s, p in zip(sample_seqs, params, strict=True)]
        late_tokens = None
        if late:
            assert self.in_flight is not None and self.in_flight.device_tokens is not None
            for i in late:
                histories[i] = histories[i] + [0]
            tokens = self.in_flight.device_tokens
            late_tokens = (late, tokens.index_select(0, longs([self.in_flight.row(plan.decode[i]) for i in late],
                                                               tokens.device)))
        counts = plan.generated_before()  # the sampler's counters
        n = len(sample_seqs)
        if self._fixed_rows() and n < self.config.max_seqs:  # the sampler's reductions over a fixed row count too
            extra = self.config.max_seqs - n
            logits = torch.cat([logits, logits[:1].expand(extra, -1)])
            params, counts, histories = params + params[:1] * extra, counts + counts[:1] * extra, \
                histories + histories[:1] * extra
        return choose(logits, params, counts, histories, late=late_tokens)[:n]

    def _slot(self, seq: Sequence, position: int) -> int:
        bs = self.kv.block_size
        return seq.table[position // bs] * bs + position % bs

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """The cache slots of positions [start, end) of `seq`, a block's run at a time."""
        bs = self.kv.block_size
        out: list[int] = []
        for b in range(start // bs, (end - 1) // bs + 1):
            first = seq.table[b] * bs - b * bs  # slot of position p in block b: first + p
            out.extend(range(first + max(start, b * bs), first + min(end, (b + 1) * bs)))
        return out

    def _tables(self, seqs: list[Sequence]) -> list[list[int]]:
        w = self.table_width
        return [s.table + [0] * (w - len(s.table)) for s in seqs]

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        decode = plan.decode
        ids, from_device = self._decode_ids(decode)
        pos = [s.fed for s in decode]
        slots = [self._slot(s, s.fed) for s in decode]
        chunk_tokens = sum(c.length for c in plan.chunks)
        if self.graphs is not None and self.graphs.takes(len(decode), len(plan.chunks), chunk_tokens):
            return self._replay(plan, ids, pos, slots, from_device)
        fixed = self._fixed_rows()
        if fixed and decode and plan.chunks:  # decode rows and prompt chunks as forwards of their own fixed sizes
            return torch.cat([self._forward(StepPlan(decode, [])), self._forward(StepPlan([], plan.chunks))])
        logit_index = list(range(len(decode)))
        pad = 0
        if fixed:  # the same row count for every step of its kind (cuBLAS picks kernels by it)
            pad = (self.config.max_step_tokens if plan.chunks else self.config.max_seqs) - len(decode) - chunk_tokens
        elif self.config.deterministic:  # at least MIN_ROWS rows: smaller matmuls take other BLAS paths
            pad = max(0, MIN_ROWS - len(decode) - chunk_tokens)
        ids += [0] * pad  # padding rows write position 0 of block 0 (the padding block), as graphs do
        pos += [0] * pad
        slots += [0] * pad
        chunks: list[PrefillChunk] = []
        counts = [1] * len(decode)  # tokens of each sequence in this step, in order
        for j, c in enumerate(plan.chunks):
            start = len(ids)
            ids.extend(c.seq.tokens_at(c.start, c.start + c.length))
            pos.extend(range(c.start, c.start + c.length))
            slots.extend(self._slots(c.seq, c.start, c.start + c.length))
            chunks.append(PrefillChunk(start=start, end=start + c.length, pos0=c.start, table=j))
            counts.append(c.length)
            if c.completes:
                logit_index.append(len(ids) - 1)
        dev = self.device
        d = len(decode) + pad
        lens = [p + 1 for p in pos[:d]]
        tables = self._tables(decode) + [[0] * self.table_width] * pad
        decode_tables = longs([b for t in tables for b in t], dev).view(d, self.table_width)
        logits = len(logit_index)
        head_rows = self.config.max_seqs if fixed else MIN_ROWS
        if self.config.deterministic and logits < head_rows:  # the vocab head too; the extra rows are dropped
            logit_index += [logit_index[-1] if logit_index else 0] * (head_rows - logits)
        decode_lens = longs(lens, dev)
        index = None
        if d and not self.kernels.reads_pages:
            index = gather_index(decode_tables, max(lens), self.kv.block_size)
        input_ids = longs(ids, dev)
        if from_device is not None:
            rows, tokens = from_device
            input_ids.index_copy_(0, rows, tokens)
        step = StepInput(
            input_ids=input_ids, positions=longs(pos, dev), slots=longs(slots, dev),
            num_decode=d, decode_tables=decode_tables, decode_lens=decode_lens, decode_index=index,
            prefill=chunks,
            prefill_tables=longs([b for t in self._tables([c.seq for c in plan.chunks]) for b in t],
                                 dev).view(len(chunks), self.table_width) if chunks else None,
            prefill_meta=longs([x for c in chunks for x in (c.start, c.end - c.start, c.pos0)], dev).view(-1, 3)
            if chunks else None,
            prefill_longest=max((c.end - c.start for c in chunks), default=0),
            logit_index=longs(logit_index, dev),
            lora=self._member_batch(plan, pad) if self.config.deterministic else self._lora_batch(plan.sequences,
                                                                                                   counts),
        )
        self.last_batch_size = len(ids) - pad  # the step's own tokens (deterministic mode pads)
        return self.model.forward(step, self.kv, self.storage)[:logits]

    def _decode_ids(self, decode: list[Sequence]) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor] | None]:
        """The decode rows' input tokens: from the host, or (0 on the host, and the rows and their
        tokens on the device) where a row's input is what the step in flight samples."""
        ids: list[int] = []
        rows: list[int] = []
        sources: list[int] = []
        for i, s in enumerate(decode):
            if s.fed == s.context_len:  # its input token is still on the device
                assert self.in_flight is not None, "a decode row's input token is in no step"
                rows.append(i)
                sources.append(self.in_flight.row(s))
                ids.append(0)
            else:
                ids.append(s.token(s.fed))
        if not rows:
            return ids, None
        assert self.in_flight is not None and self.in_flight.device_tokens is not None
        dev = self.in_flight.device_tokens.device
        return ids, (longs(rows, dev), self.in_flight.device_tokens.index_select(0, longs(sources, dev)))

    def _replay(self, plan: StepPlan, ids: list[int], pos: list[int], slots: list[int],
                from_device: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """A decode step, or decode rows and a few prompt chunks, through a recorded graph."""
        assert self.graphs is not None
        decode, chunks = plan.decode, plan.chunks
        members = [(s.serial, *s.slots) for s in decode]
        for c in chunks:
            span = range(c.start, c.start + c.length)
            ids = ids + c.seq.tokens_at(c.start, c.start + c.length)
            pos = pos + list(span)
            slots = slots + self._slots(c.seq, c.start, c.start + c.length)
            members.append((c.seq.serial, *c.seq.slots, c.start, c.length))
        rows = StepRows(ids, pos, slots, [s.table for s in decode], self._tables([c.seq for c in chunks]),
                        [c.start for c in chunks], [c.length for c in chunks])
        self.last_batch_size = len(ids)
        seqs = plan.sequences
        d = len(decode)

        def weights() -> torch.Tensor:  # per token: the decode rows, then each chunk's tokens
            per_seq = self._stack(seqs)
            if not chunks:
                return per_seq
            return torch.cat([per_seq[:d], *(per_seq[d + j:d + j + 1].expand(c.length, -1)
                                             for j, c in enumerate(chunks))])

        # A sequence's slot scales never change while it runs, so the graph's copy of them is
        # reused for as long as the same sequences decode together.
        if self.config.deterministic:  # decode rows only; LoRA always on, one pass per mix member (`_member_batch`)
            count = max(1, max(len(_mix_order(s)) for s in decode))
            return self.graphs.run(rows, lambda: self._mix_weights([(s, 1) for s in decode]),
                                   weights_key=tuple(members), members=count, from_device=from_device)
        uses_lora = any(self._uses_lora(s) for s in seqs)
        logits = self.graphs.run(rows, weights if uses_lora else None, weights_key=tuple(members),
                                 from_device=from_device)
        if all(c.completes for c in chunks):
            return logits
        keep = [*range(d), *(d + j for j, c in enumerate(chunks) if c.completes)]
        return logits.index_select(0, longs(keep, logits.device))  # `logits[keep]` would wait for the graph

    def _lora_batch(self, seqs: list[Sequence], counts: list[int]) -> LoraBatch:
        """The step's LoRA plan from each sequence's slot vector (no per-token Python): dense over
        the pool prefix where the kernels prefer it (every GPU step, CPU decode steps with the
        numba loop), else `LoraBatch.plan` picks per step."""
        per_seq = self._slot_weights(seqs)
        if per_seq is None:
            return LoraBatch(mode="none")
        per_token = per_seq.repeat_interleave(torch.tensor(counts), dim=0)
        layout = self.config.lora_layout
        prefix = self.kernels.prefers_prefix(len(per_token))
        return LoraBatch.plan(per_token, self.storage, dtype=self.dtype,
                              prefer_prefix=prefix and layout in ("auto", "dense"),
                              force=None if layout == "auto" else layout)

    def _fixed_rows(self) -> bool:
        """Deterministic mode with fixed row counts (a GPU's: `invariant`)."""
        return self.config.deterministic and bool(getattr(self.kernels, "fixed_rows", False))

    def _member_batch(self, plan: StepPlan, pad: int) -> LoraBatch:
        """Deterministic mode's LoRA plan: dense over the whole pool, with weights [members, T, pool
        rows], one pass per mix member in (name, version, scale) order (`invariant`): a row's sum is
        then built in an order its request sets, whatever slots its adapters sit in."""
        rows: list[tuple[Sequence | None, int]] = [(s, 1) for s in plan.decode]
        weights = self._mix_weights(rows + [(None, 1)] * pad + [(c.seq, c.length) for c in plan.chunks])
        dev = self.storage.device
        return LoraBatch(mode="dense", weights=torch.stack(
            [self.storage.row_weights(w.to(dev, self.dtype), width=self.storage.rows) for w in weights]))

    def _mix_weights(self, rows: list[tuple[Sequence | None, int]]) -> torch.Tensor:
        """[members, tokens, slots] (host): for each (sequence or padding, its token count), the scale
        of its j-th mix member (`_mix_order`) on that member's slot in pass j."""
        mixes = [_mix_order(s) if s is not None else [] for s, _ in rows]
        weights = torch.zeros(max(1, max(len(m) for m in mixes)), sum(n for _, n in rows), self.storage.num_slots)
        t = 0
        for (_, n), mix in zip(rows, mixes, strict=True):
            for j, (slot, scale) in enumerate(mix):
                weights[j, t:t + n, slot] = scale
            t += n
        return weights

    def _uses_lora(self, seq: Sequence) -> bool:
        return any(x != 0.0 for x in seq.scales)

    def _slot_weights(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """[rows, slots] scale of every slot for each row, or None when no row uses an adapter."""
        if not any(self._uses_lora(s) for s in seqs):
            return None
        return self._stack(seqs)

    def _stack(self, seqs: list[Sequence]) -> torch.Tensor:
        return torch.stack([self._row_weights(s) for s in seqs])

    def _row_weights(self, seq: Sequence) -> torch.Tensor:
        key = (seq.serial, tuple(seq.slots))
        w = self._weights.get(key)
        if w is None:
            w = self._weights[key] = torch.zeros(self.storage.num_slots)
            for slot, scale in zip(seq.slots, seq.scales, strict=True):
                w[slot] += scale
        return w


def _mix_order(seq: Sequence) -> list[tuple[int, float]]:
    """(slot, scale) of a sequence's adapters by (name, version, scale): the same for the same mix
    whatever order the request listed it in and whatever slots it got."""
    adapters = seq.request.adapters
    order = sorted(range(len(adapters)), key=lambda i: (adapters[i][0].name, adapters[i][0].number, adapters[i][1]))
    return [(seq.slots[i], adapters[i][1]) for i in order if adapters[i][1] != 0.0]
