"""`FairQueue`: round robin between groups, FIFO inside a group, batches bounded by a budget."""

from __future__ import annotations

from daemon.engines.image.batching import FairQueue


def drain(q: FairQueue[tuple[str, int]], budget: int) -> list[list[str]]:
    out = []
    while (picked := q.pop_batch(lambda item: item[1], budget)) is not None:
        out.append([name for name, _ in picked[1]])
    return out


def test_round_robin_between_groups_fifo_inside():
    """Groups take turns in order of first arrival; each group keeps its own order."""
    q: FairQueue[tuple[str, int]] = FairQueue()
    for name, group in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A"), ("c1", "C"), ("b2", "B")):
        q.push(group, (name, 1))
    assert drain(q, budget=1) == [["a1"], ["b1"], ["c1"], ["a2"], ["b2"], ["a3"]]


def test_batches_fill_up_to_the_budget():
    """A batch takes a group's items while their sizes fit, but always at least one."""
    q: FairQueue[tuple[str, int]] = FairQueue()
    for name, size in (("x", 2), ("y", 1), ("z", 2), ("big", 9)):
        q.push("G", (name, size))
    assert drain(q, budget=4) == [["x", "y"], ["z"], ["big"]]


def test_a_busy_group_cannot_starve_another():
    """A group that keeps getting new work still lets a waiting group in every other turn."""
    q: FairQueue[tuple[str, int]] = FairQueue()
    q.push("busy", ("b0", 1))
    q.push("quiet", ("q0", 1))
    served = []
    for i in range(1, 4):
        q.push("busy", (f"b{i}", 1))
        served.append(q.pop_batch(lambda item: item[1], 1)[1][0][0])
    assert served[:2] == ["b0", "q0"]


def test_remove_takes_items_out_and_drops_empty_groups():
    """Removed items come back; a group left empty disappears; len counts what is left."""
    q: FairQueue[tuple[str, int]] = FairQueue()
    q.push("A", ("a1", 1))
    q.push("B", ("b1", 1))
    q.push("B", ("b2", 1))
    removed = q.remove(lambda item: item[0] in {"a1", "b2"})
    assert sorted(removed) == [("a1", 1), ("b2", 1)]
    assert len(q) == 1
    assert list(q) == [("b1", 1)]
    assert drain(q, budget=8) == [["b1"]]
    assert not q
