"""Which sequences run, and what each step computes: priorities, admission, KV blocks, prompt
chunks, preemption, cancellation.

Pure bookkeeping, no torch: the engine asks for a `StepPlan` (`schedule`), runs it (`runner`),
then `commit`s it. Scheduling hands out the KV blocks a step writes; committing records what the
step computed. A step that fails can be run again for fewer of its sequences.

- Order: requests wait by priority (player, normal, background), then arrival.
- Admission: while fewer than `max_seqs` run and adapter slots and KV blocks allow. A prompt
  whose first blocks are in the prefix cache starts after them. A request whose adapters need
  slots that are busy lets requests with resident adapters pass (keeping its place among those
  that wait for slots).
- A step: one decode token for every sequence past its prompt, then prompt chunks (by priority,
  at most `prefill_chunk` tokens each, and at most `max_chunks` of them) until `max_step_tokens`
  are planned: a long prompt never freezes the others' streams for more than one step's worth.
- Preemption: when a waiting request has a higher priority than some running sequence and no
  room (a sequence or KV blocks), the lowest-priority, latest-arrived running sequence pauses. Its
  full blocks stay in the prefix cache, it keeps its generated tokens and waits again with its
  original arrival; back, it recomputes only what the cache lost and goes on where it stopped.
  The same happens when the pool runs out mid-step, with whoever has the lowest priority.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .blocks import NULL_BLOCK, BlockPool, block_key, mix_key
from .request import TextRequest

if TYPE_CHECKING:
    from ...adapters.version import AdapterVersion

__all__ = ["PRIORITIES", "Chunk", "Scheduler", "Sequence", "SlotAllocator", "StepPlan"]

PRIORITIES = {"player": 0, "normal": 1, "background": 2}
_SERIALS = itertools.count()


class SlotAllocator(Protocol):
    """The compute slots adapters need while their sequences run (`slots.SlotTable`)."""

    def resident(self) -> dict[str, int]: ...

    def acquire(self, versions: list[AdapterVersion]) -> list[int] | None: ...

    def release(self, versions: list[AdapterVersion]) -> None: ...


@dataclass(eq=False)
class Sequence:
    """A request the scheduler has taken: what it generated, where its keys and values are."""

    request: TextRequest
    serial: int = field(default_factory=lambda: next(_SERIALS))  # unique: keys caches of batch members
    slots: list[int] = field(default_factory=list)  # its adapters' compute slots while it runs
    table: list[int] = field(default_factory=list)  # KV blocks holding positions 0, block_size, ...
    fed: int = 0  # context tokens whose keys and values are in the cache
    tokens: list[int] = field(default_factory=list)  # generated so far
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    published: int = 0  # full blocks offered to the prefix cache
    cached_tokens: int = 0  # prompt tokens the prefix cache gave it when it first started
    preemptions: int = 0
    cancelled: bool = False
    finished: bool = False  # ended (`Scheduler.finish`); a step launched before may still carry its row
    ends_in_flight: bool = False  # the token of the step in flight is its last by length: planned no more
    started: float | None = None
    first_token: float | None = None
    grammar: Any = None  # its constraint's matcher (constraints.Grammar.start()); None: unconstrained
    grammar_pending: int | None = None  # a sampled token the matcher has not taken yet (`output.take_pending`)

    @property
    def key(self) -> Hashable:
        return self.request.key

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def context_len(self) -> int:
        return self.prompt_len + len(self.tokens)

    @property
    def in_prefill(self) -> bool:
        """More than the last context token is left to feed (a prompt, or a resumed sequence)."""
        return self.context_len - self.fed > 1

    @property
    def priority(self) -> int:
        return PRIORITIES.get(self.request.priority, 1)

    @property
    def versions(self) -> list[AdapterVersion]:
        return [v for v, _ in self.request.adapters]

    @property
    def scales(self) -> list[float]:
        return [s for _, s in self.request.adapters]

    def token(self, position: int) -> int:
        p = self.prompt_len
        return self.request.prompt_ids[position] if position < p else self.tokens[position - p]

    def tokens_at(self, start: int, end: int) -> list[int]:
        """Context tokens [start, end): prompt, then generated (slices, not a call a token)."""
        p = self.prompt_len
        head = list(self.request.prompt_ids[start:min(end, p)]) if start < p else []
        return head + self.tokens[max(start - p, 0):max(end - p, 0)]


@dataclass(frozen=True)
class Chunk:
    """Context tokens [start, start + length) of `seq` go through this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.seq.context_len


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence]  # one token each
    chunks: list[Chunk]

    @property
    def sample(self) -> list[Sequence]:
        """Sequences that get a next token from this step, in the order of their logits."""
        return self.decode + [c.seq for c in self.chunks if c.completes]

    def generated_before(self) -> list[int]:
        """For each sequence in `sample`: how many tokens it has generated before the one this step
        samples, from its positions (the host's `tokens` may be one short: a token in flight)."""
        return [s.fed + 1 - s.prompt_len for s in self.decode] + \
            [c.start + c.length - c.seq.prompt_len for c in self.chunks if c.completes]

    @property
    def decode_only(self) -> bool:
        return not self.chunks

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + [c.seq for c in self.chunks]

    def only(self, keep: Iterable[Sequence]) -> StepPlan:
        """The same step for some of its sequences."""
        ids = {id(s) for s in keep}
        return replace(self, decode=[s for s in self.decode if id(s) in ids],
                       chunks=[c for c in self.chunks if id(c.seq) in ids])


class Scheduler:
    def __init__(self, *, max_seqs: int, slots: SlotAllocator, pool: BlockPool, max_step_tokens: int,
                 prefill_chunk: int, priorities: bool = True, max_chunks: int | None = None) -> None:
        self.max_seqs = max_seqs
        self.slots = slots
        self.pool = pool
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        # Prompt chunks of one step at most (None: any): what one CUDA graph takes (`graphs.MAX_CHUNKS`).
        # A step with more ran eagerly, ~5x a graph's time: when a crowd of NPCs started new lines at
        # once (31 64-token prompts; H200, 1B) that step stalled every stream for ~25 ms.
        self.max_chunks = max_chunks
        self.priorities = priorities
        self.waiting: list[Sequence] = []  # new and paused sequences, in (priority, arrival) order
        self.running: list[Sequence] = []
        self.preempted = 0

    # ---------------------------------------------------------------- requests in and out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def enqueue(self, request: TextRequest) -> None:
        self._wait(Sequence(request))

    def cancel(self, key: Hashable) -> Sequence | None:
        """Cancel a request: a waiting one is removed and returned; a running one is marked and
        ends at the next `take_cancelled`."""
        for seq in self.waiting:
            if seq.key == key:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.key == key:
                seq.cancelled = True
        return None

    def take_cancelled(self) -> list[Sequence]:
        return [s for s in self.running if s.cancelled]

    def finish(self, seq: Sequence) -> None:
        """The sequence ended: its blocks go back (full ones stay cached) and its adapters' slots.
        A paused one (its token from a step in flight ended it) leaves the queue; it holds nothing."""
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finished = True

    # ---------------------------------------------------------------- scheduling

    def schedule(self, *, hold: frozenset[str] = frozenset(),
                 prompt_tokens: int | None = None) -> tuple[list[Sequence], StepPlan | None]:
        """Admit what may start; plan the next step. (the sequences that started for the first
        time, the plan or None when nothing runs.) Sequences of the priority classes in `hold` sit
        this step out (a tokens/s budget); `prompt_tokens` bounds this step's prompt tokens too (a
        step-time budget: prompt chunks shrink; the decode rows run whatever it says)."""
        started = self._admit()
        if not self.running:
            return started, None
        active = [s for s in self.running if s.request.priority not in hold] if hold else self.running
        decode: list[Sequence] = []
        for seq in sorted((s for s in active if not s.in_prefill and not s.ends_in_flight), key=self._order):
            if seq in self.running and self._reserve(seq, seq.fed + 1):
                decode.append(seq)
        budget = self.max_step_tokens - len(decode)
        budget = max(budget if prompt_tokens is None else min(budget, prompt_tokens), 1)
        chunks: list[Chunk] = []
        for seq in sorted((s for s in active if s.in_prefill), key=self._order):
            if budget <= 0 or (self.max_chunks is not None and len(chunks) >= self.max_chunks):
                break
            if seq not in self.running:
                continue
            n = min(seq.context_len - seq.fed, self.prefill_chunk, budget)
            if not self._reserve(seq, seq.fed + n):  # the pool is short: what its blocks hold already
                n = min(n, len(seq.table) * self.pool.block_size - seq.fed)
            if n > 0 and seq in self.running:
                chunks.append(Chunk(seq, seq.fed, n))
                budget -= n
        decode = [s for s in decode if s in self.running]  # a later reservation may have paused one
        chunks = [c for c in chunks if c.seq in self.running]
        if not decode and not chunks:
            return started, None
        return started, StepPlan(decode, chunks)

    def commit(self, plan: StepPlan) -> None:
        """The plan ran: its tokens' keys and values are in the cache; full blocks are published.
        Sequences that finished while it ran (`finish`) are left as they are."""
        for seq in plan.decode:
            if not seq.finished:
                seq.fed += 1
        for c in plan.chunks:
            if not c.seq.finished:
                c.seq.fed = c.start + c.length
        for seq in plan.sequences:
            if not seq.finished:
                self._publish(seq)

    # ---------------------------------------------------------------- internals

    def _order(self, seq: Sequence) -> tuple[int, float]:
        return (seq.priority if self.priorities else 1, seq.request.arrival)

    def _wait(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=self._order)

    def _admit(self) -> list[Sequence]:
        started: list[Sequence] = []
        blocked_on_slots = False
        for seq in list(self.waiting):
            if len(self.running) >= self.max_seqs and not self._pause_for(seq):
                break
            resident = self.slots.resident()
            needs_load = any(v.key not in resident for v in seq.versions)
            if blocked_on_slots and needs_load:
                continue  # keep arrival order among requests that wait for slots
            slots = self.slots.acquire(seq.versions)
            if slots is None:
                blocked_on_slots = True
                continue
            seq.slots = slots
            self._reuse_prefix(seq)
            # Room for the whole prompt first, so admitted prompts are not paused mid-way.
            needed = self.pool.blocks_for(seq.context_len) - len(seq.table)
            while self.pool.available < needed and self._pause_for(seq):
                pass
            if self.pool.available < needed and self.running:
                self._free(seq)
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            if seq.started is None:
                seq.started = time.perf_counter()
                seq.cached_tokens = seq.fed
                started.append(seq)
        return started

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start after the longest run of its first blocks that the prefix cache holds (never the
        whole context: its last token must go through the model to give the next token's logits)."""
        bs = self.pool.block_size
        full = (seq.context_len - 1) // bs
        if not seq.keys or len(seq.keys) < full:
            mix = mix_key([(v.key, s) for v, s in seq.request.adapters])
            keys = list(seq.keys)
            for b in range(len(keys), full):
                keys.append(block_key(keys[-1] if keys else b"", mix, seq.tokens_at(b * bs, (b + 1) * bs)))
            seq.keys = keys
        seq.table = self.pool.match(seq.keys[:full])
        seq.fed = len(seq.table) * bs
        seq.published = len(seq.table)

    def _reserve(self, seq: Sequence, end: int) -> bool:
        """Blocks for positions up to `end`; pauses lower-priority sequences for them if it must.
        False (the sequence itself may have been paused) when there is no room."""
        while len(seq.table) * self.pool.block_size < end:
            block = self.pool.allocate()
            if block is None:
                if self._pause_for(seq, lowest=True):
                    continue
                return False
            seq.table.append(block)
        return True

    def _pause_for(self, seq: Sequence, *, lowest: bool = False) -> bool:
        """Pause the lowest-priority, latest running sequence below `seq` (or, with `lowest`, at or
        below it, itself included as a last resort). True if one was paused."""
        rank = seq.priority if self.priorities else 1
        candidates = [s for s in self.running if (s.priority if self.priorities else 1) > rank
                      or (lowest and (s.priority if self.priorities else 1) == rank)]
        if not candidates:
            return False
        victim = max(candidates, key=lambda s: (s.priority if self.priorities else 1, s.request.arrival))
        if victim is seq and len(candidates) > 1:
            victim = max((s for s in candidates if s is not seq),
                         key=lambda s: (s.priority if self.priorities else 1, s.request.arrival))
        self.running.remove(victim)
        self._free(victim)
        victim.preemptions += 1
        self.preempted += 1
        self._wait(victim)
        return True

    def _free(self, seq: Sequence) -> None:
        self._publish(seq)
        self.pool.release([b for b in seq.table if b != NULL_BLOCK])
        seq.table = []
        seq.fed = 0
        seq.published = 0
        if seq.slots:
            self.slots.release(seq.versions)
            seq.slots = []

    def _publish(self, seq: Sequence) -> None:
        bs = self.pool.block_size
        while (seq.published + 1) * bs <= seq.fed and seq.published < len(seq.table):
            b = seq.published
            if b >= len(seq.keys):
                mix = mix_key([(v.key, s) for v, s in seq.request.adapters])
                seq.keys.append(block_key(seq.keys[-1] if seq.keys else b"", mix, seq.tokens_at(b * bs, (b + 1) * bs)))
            self.pool.publish(seq.table[b], seq.keys[b])
            seq.published += 1
