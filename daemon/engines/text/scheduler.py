"""Which sequences run, and what each step computes: admission, prompt chunks, cancellation.

Pure bookkeeping, no torch: the engine asks for a `StepPlan`, runs it (`runner`), then `commit`s
it. Planning changes nothing, so a step that fails can be planned again for fewer sequences.

- Admission: queued requests start in arrival order while cache rows and adapter slots allow; a
  request whose adapters need slots that are busy lets requests with resident adapters pass, but
  keeps its place among those that wait for slots.
- A step: one decode token for every sequence past its prompt, then prompt chunks of at most
  `prefill_chunk` tokens per sequence until `max_step_tokens` are planned, so a long prompt never
  freezes the others' streams.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from .request import TextRequest

if TYPE_CHECKING:
    from ...adapters.version import AdapterVersion

__all__ = ["Chunk", "Scheduler", "Sequence", "SlotAllocator", "StepPlan"]

_SERIALS = itertools.count()


class SlotAllocator(Protocol):
    """The compute slots adapters need while their sequences run (`slots.SlotTable`)."""

    def resident(self) -> dict[str, int]: ...

    def acquire(self, versions: list[AdapterVersion]) -> list[int] | None: ...

    def release(self, versions: list[AdapterVersion]) -> None: ...


@dataclass(eq=False)
class Sequence:
    """A running request: its cache row, its adapters' slots, how far it got."""

    request: TextRequest
    row: int
    slots: list[int]
    serial: int = field(default_factory=lambda: next(_SERIALS))  # unique: keys caches of batch members
    done_prompt: int = 0  # prompt tokens whose keys and values are in the cache
    tokens: list[int] = field(default_factory=list)  # generated so far
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    @property
    def key(self) -> Hashable:
        return self.request.key

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.done_prompt < self.prompt_len

    @property
    def versions(self) -> list[AdapterVersion]:
        return [v for v, _ in self.request.adapters]

    @property
    def scales(self) -> list[float]:
        return [s for _, s in self.request.adapters]


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, start + length) of `seq` go through this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.seq.prompt_len


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence]  # one token each, in cache-row order
    chunks: list[Chunk]

    @property
    def sample(self) -> list[Sequence]:
        """Sequences that get a next token from this step, in the order of their logits."""
        return self.decode + [c.seq for c in self.chunks if c.completes]

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
    def __init__(self, *, rows: int, slots: SlotAllocator, max_step_tokens: int, prefill_chunk: int) -> None:
        self.rows = rows
        self.slots = slots
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self.queue: deque[TextRequest] = deque()
        self.running: list[Sequence] = []
        self._free_rows = list(range(rows - 1, -1, -1))  # popped from the end: row 0 first

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def enqueue(self, request: TextRequest) -> None:
        self.queue.append(request)

    def cancel(self, key: Hashable) -> TextRequest | None:
        """Cancel a request: a queued one is removed and returned; a running one is marked and
        ends at the next `take_cancelled`."""
        for req in self.queue:
            if req.key == key:
                self.queue.remove(req)
                return req
        for seq in self.running:
            if seq.key == key:
                seq.cancelled = True
        return None

    def take_cancelled(self) -> list[Sequence]:
        return [s for s in self.running if s.cancelled]

    def admit(self) -> list[Sequence]:
        """Start queued requests while rows and slots allow; returns the new sequences."""
        started: list[Sequence] = []
        blocked_on_slots = False
        for req in list(self.queue):
            if not self._free_rows:
                break
            versions = [v for v, _ in req.adapters]
            resident = self.slots.resident()
            needs_load = any(v.key not in resident for v in versions)
            if blocked_on_slots and needs_load:
                continue  # keep arrival order among requests that wait for slots
            slots = self.slots.acquire(versions)
            if slots is None:
                blocked_on_slots = True
                continue
            self.queue.remove(req)
            seq = Sequence(req, self._free_rows.pop(), slots)
            self.running.append(seq)
            started.append(seq)
        return started

    def plan(self) -> StepPlan | None:
        """The next step, or None when nothing runs."""
        if not self.running:
            return None
        decode = sorted((s for s in self.running if not s.in_prefill), key=lambda s: s.row)
        budget = max(self.max_step_tokens - len(decode), 1)
        chunks: list[Chunk] = []
        for s in self.running:
            if not s.in_prefill or budget <= 0:
                continue
            n = min(s.prompt_len - s.done_prompt, self.prefill_chunk, budget)
            chunks.append(Chunk(s, s.done_prompt, n))
            budget -= n
        return StepPlan(decode, chunks)

    def commit(self, plan: StepPlan) -> None:
        """The plan ran: its prompt chunks are in the cache."""
        for c in plan.chunks:
            c.seq.done_prompt = c.start + c.length

    def finish(self, seq: Sequence) -> None:
        """The sequence ended: free its row and its adapters' slots."""
        self.running.remove(seq)
        self._free_rows.append(seq.row)
        self.slots.release(seq.versions)
