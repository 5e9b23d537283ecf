"""The image engine's waiting room: images grouped by what can share one pipeline call, each at
its home row.

A diffusers pipeline runs one adapter mix, one size, one step count and one guidance at a time, so
images that agree on all of these (the *batch key*) are grouped. Groups are served round robin, one
pipeline call per turn, so one busy style cannot starve another.

Inside a group every image waits for its *home row*: `seed % rows`, where `rows` is the engine's
`max_batch` (image i of a request with seed s has seed s + i). A call always places an image at
its home row, so an image sees the same row of the same batch shape whatever it is batched with
(on CUDA some kernels reduce different rows in different orders; see the engine's docstring).

Choosing a call: take the group's images in arrival order, skipping any whose home row is already
taken in this call. That is the same as one FIFO *lane* per row with a call taking the head of
every lane, which is how it is kept here: a skipped image is at the head of its lane, so it goes
in the group's next call, and an image with n images ahead of it in its lane waits exactly n calls
of its group, whatever arrives after it (no starvation). Rows whose lane is empty are padding.

Images without a seed of their own get one from `free_seed`: a random seed whose home row is free
(or least loaded) in the group, so seedless bursts still fill calls completely.

This module is plain Python (no torch) so the fairness and placement rules are tested on their own.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["FairQueue", "free_seed", "home_row"]

T = TypeVar("T")

SEED_RANGE = 2**32  # seeds the engine picks itself are below this


def home_row(seed: int, rows: int) -> int:
    """The row of every call that the image with this seed occupies."""
    return seed % rows


def free_seed(loads: list[int], count: int, randbelow: Callable[[int], int] = secrets.randbelow) -> int:
    """A random seed for a request of `count` images (seeds seed .. seed + count - 1, on consecutive
    rows) that puts its images in the earliest calls of their group.

    `loads[r]` is how many images already wait for row r in the group (`FairQueue.loads`): an image
    added to row r goes in the group's call number `loads[r]` (0: the next one). The start row whose
    images' last call comes first wins, then the one with the fewest calls in all; ties are broken
    at random. The seed is below `SEED_RANGE`.
    """
    rows = len(loads)
    if rows < 1 or count < 1:
        raise ValueError("need at least one row and one image")

    def cost(start: int) -> tuple[int, int]:
        # Image i lands in call loads[row] + (this request's earlier images on that row).
        calls = [loads[(start + i) % rows] + i // rows for i in range(count)]
        return max(calls), sum(calls)

    costs = [cost(start) for start in range(rows)]
    best = min(costs)
    starts = [start for start, c in enumerate(costs) if c == best]
    start = starts[randbelow(len(starts))]
    return randbelow(SEED_RANGE // rows) * rows + start


class FairQueue(Generic[T]):
    """Per-group queues served round robin; inside a group one FIFO lane per row of a call."""

    def __init__(self, rows: int = 1) -> None:
        if rows < 1:
            raise ValueError("a call has at least one row")
        self._rows = rows
        # The front group is served next; a served group that still has work goes to the back.
        self._groups: OrderedDict[Hashable, list[deque[T]]] = OrderedDict()

    @property
    def rows(self) -> int:
        return self._rows

    def push(self, group: Hashable, item: T, row: int) -> None:
        """Queue `item` for `row` of the group's calls, behind what already waits for that row."""
        if not 0 <= row < self._rows:
            raise ValueError(f"row {row} is outside 0..{self._rows - 1}")
        lanes = self._groups.get(group)
        if lanes is None:
            lanes = self._groups[group] = [deque() for _ in range(self._rows)]
        lanes[row].append(item)

    def loads(self, group: Hashable) -> list[int]:
        """How many items wait for each row in `group` (all zero for a group with nothing queued)."""
        lanes = self._groups.get(group)
        return [len(lane) for lane in lanes] if lanes is not None else [0] * self._rows

    def pop_call(self) -> tuple[Hashable, list[T | None]] | None:
        """The next group's next call: one entry per row, the item that waited longest for that
        row, or None (padding) where none waits."""
        if not self._groups:
            return None
        group, lanes = next(iter(self._groups.items()))
        call = [lane.popleft() if lane else None for lane in lanes]
        if any(lanes):
            self._groups.move_to_end(group)
        else:
            del self._groups[group]
        return group, call

    def waits(self, match: Callable[[T], bool]) -> list[int]:
        """For each queued item for which `match` is true: how many calls of its group come before
        the one that takes it (0: the group's next call)."""
        return [i for lanes in self._groups.values() for lane in lanes for i, item in enumerate(lane) if match(item)]

    def remove(self, match: Callable[[T], bool]) -> list[T]:
        """Remove and return every queued item for which `match` is true; the items behind a
        removed one move up one call."""
        removed: list[T] = []
        for group in list(self._groups):
            lanes = self._groups[group]
            for row, lane in enumerate(lanes):
                if any(match(i) for i in lane):
                    removed.extend(i for i in lane if match(i))
                    lanes[row] = deque(i for i in lane if not match(i))
            if not any(lanes):
                del self._groups[group]
        return removed

    def __iter__(self) -> Iterator[T]:
        for lanes in self._groups.values():
            for lane in lanes:
                yield from lane

    def __len__(self) -> int:
        return sum(len(lane) for lanes in self._groups.values() for lane in lanes)

    def __bool__(self) -> bool:
        return bool(self._groups)
