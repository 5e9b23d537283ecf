"""The image engine's waiting room: requests grouped by what can share one pipeline call.

A diffusers pipeline runs one adapter mix, one size, one step count and one guidance at a time, so
requests that agree on all of these (the *batch key*) are grouped. Groups are served round robin
so one busy style cannot starve another; inside a group requests keep their arrival order. This
module is plain Python (no torch) so the fairness rules are tested on their own.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-group FIFO queues served round robin, popped as batches bounded by a size budget."""

    def __init__(self) -> None:
        # The front group is served next; a served group that still has work goes to the back.
        self._groups: OrderedDict[Hashable, deque[T]] = OrderedDict()

    def push(self, group: Hashable, item: T) -> None:
        self._groups.setdefault(group, deque()).append(item)

    def pop_batch(self, size: Callable[[T], int], budget: int) -> tuple[Hashable, list[T]] | None:
        """Take the next group's oldest items while their sizes fit `budget` (always at least one)."""
        if not self._groups:
            return None
        group, items = next(iter(self._groups.items()))
        batch = [items.popleft()]
        used = size(batch[0])
        while items and used + size(items[0]) <= budget:
            used += size(items[0])
            batch.append(items.popleft())
        if items:
            self._groups.move_to_end(group)
        else:
            del self._groups[group]
        return group, batch

    def remove(self, match: Callable[[T], bool]) -> list[T]:
        """Remove and return every queued item for which `match` is true."""
        removed: list[T] = []
        for group in list(self._groups):
            items = self._groups[group]
            keep = deque(i for i in items if not match(i))
            if len(keep) != len(items):
                removed.extend(i for i in items if match(i))
                if keep:
                    self._groups[group] = keep
                else:
                    del self._groups[group]
        return removed

    def __iter__(self) -> Iterator[T]:
        for items in self._groups.values():
            yield from items

    def __len__(self) -> int:
        return sum(len(items) for items in self._groups.values())

    def __bool__(self) -> bool:
        return bool(self._groups)
