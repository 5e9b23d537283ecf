"""`FairQueue` and `free_seed`: round robin between groups, each image at its home row
(`seed % rows`), collisions to the group's next call in arrival order, seedless images on free rows."""

from __future__ import annotations

import random

from daemon.engines.image.batching import SEED_RANGE, FairQueue, free_seed, home_row


def queue(rows: int, *items: tuple[str, int], group: str = "G") -> FairQueue[str]:
    """A queue holding `items` (name, seed) of one group, each at its home row."""
    q: FairQueue[str] = FairQueue(rows)
    for name, seed in items:
        q.push(group, name, home_row(seed, rows))
    return q


def drain(q: FairQueue[str]) -> list[list[str | None]]:
    out = []
    while (picked := q.pop_call()) is not None:
        out.append(picked[1])
    return out


def test_round_robin_between_groups_fifo_inside():
    """Groups take turns (one call each) in order of first arrival; each group keeps its order."""
    q: FairQueue[str] = FairQueue(1)
    for name, group in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A"), ("c1", "C"), ("b2", "B")):
        q.push(group, name, 0)
    assert drain(q) == [["a1"], ["b1"], ["c1"], ["a2"], ["b2"], ["a3"]]


def test_images_land_at_their_home_rows():
    """Every image sits at row seed % rows of its call, whatever its arrival position; free rows
    are padding (None)."""
    assert home_row(1234, 4) == 2 and home_row(7, 1) == 0
    assert drain(queue(4, ("a", 5), ("b", 2), ("c", 12), ("d", 7))) == [["c", "a", "b", "d"]]
    assert drain(queue(4, ("d", 7), ("a", 5))) == [[None, "a", None, "d"]]
    assert drain(queue(4, ("x", 1234))) == [[None, None, "x", None]]


def test_collisions_go_to_the_next_call_in_arrival_order():
    """Taking images in arrival order, one whose home row is taken waits for the group's next
    call, where it is first in line for that row; later images with free rows still join."""
    q = queue(4, ("a", 1), ("b", 5), ("c", 9), ("d", 2), ("e", 6), ("f", 0))
    assert drain(q) == [["f", "a", "d", None], [None, "b", "e", None], [None, "c", None, None]]


def test_a_stream_of_colliding_requests_starves_no_one():
    """Requests keep arriving for the same row: each call serves the one that waited longest, so an
    image with n ahead of it for its row runs in the group's (n + 1)th call; another group still
    gets every other turn."""
    q: FairQueue[str] = FairQueue(2)
    q.push("busy", "b0", 0)
    q.push("busy", "b1", 0)
    q.push("quiet", "q0", 1)
    served = []
    for i in range(2, 8):
        q.push("busy", f"b{i}", 0)  # a newcomer for the taken row, every turn
        group, call = q.pop_call()
        served.append((group, call))
    assert served[:3] == [("busy", ["b0", None]), ("quiet", [None, "q0"]), ("busy", ["b1", None])]
    assert [call[0] for group, call in served if group == "busy"] == ["b0", "b1", "b2", "b3", "b4"]


def test_loads_and_waits_follow_the_lanes():
    """`loads` counts the images waiting per row; `waits` says how many calls of its group come
    before the one that takes an image."""
    q = queue(4, ("a", 1), ("b", 5), ("c", 2), ("d", 9))
    assert q.loads("G") == [0, 3, 1, 0]
    assert q.loads("other") == [0, 0, 0, 0]
    assert sorted(q.waits(lambda name: name in {"b", "c", "d"})) == [0, 1, 2]


def test_remove_moves_the_rest_up_and_drops_empty_groups():
    """Removed items come back; the items behind them move up a call; an emptied group goes."""
    q = queue(2, ("a1", 0), ("a2", 0), ("a3", 1))
    q.push("B", "b1", 1)
    removed = q.remove(lambda name: name in {"a1", "b1"})
    assert sorted(removed) == ["a1", "b1"]
    assert len(q) == 2 and sorted(q) == ["a2", "a3"]
    assert drain(q) == [["a2", "a3"]]
    assert not q


def test_free_seed_picks_a_free_home_row():
    """A seedless image gets a random seed whose home row nothing waits for; if every row is
    taken, the least loaded one. The seed is random (both free rows come up) and below SEED_RANGE."""
    rng = random.Random(3)
    rows = {free_seed([1, 0, 2, 1], 1, rng.randrange) % 4 for _ in range(50)}
    assert rows == {1}
    rows = {free_seed([0, 3, 0, 1], 1, rng.randrange) % 4 for _ in range(50)}
    assert rows == {0, 2}
    rows = {free_seed([2, 1, 1, 3], 1, rng.randrange) % 4 for _ in range(50)}
    assert rows == {1, 2}
    seeds = [free_seed([0, 0, 0], 1, rng.randrange) for _ in range(50)]
    assert all(0 <= s < SEED_RANGE for s in seeds) and len(set(seeds)) == 50
    assert free_seed([5], 1, rng.randrange) % 1 == 0


def test_free_seed_for_several_images_picks_free_consecutive_rows():
    """A request's images take consecutive rows (seed, seed + 1, ...): the start row puts all of
    them in the earliest calls."""
    rng = random.Random(4)
    assert {free_seed([1, 1, 0, 0], 2, rng.randrange) % 4 for _ in range(30)} == {2}
    assert {free_seed([0, 1, 1, 0], 2, rng.randrange) % 4 for _ in range(30)} == {3}
    # Six images on four empty rows need two calls whatever the start; all starts tie.
    assert {free_seed([0, 0, 0, 0], 6, rng.randrange) % 4 for _ in range(60)} == {0, 1, 2, 3}


def test_a_seedless_burst_fills_calls_completely():
    """Seedless images queued one after another, among images with seeds, leave no padding."""
    rng = random.Random(5)
    q: FairQueue[str] = FairQueue(4)
    q.push("G", "s0", home_row(8, 4))  # two seeded images on row 0
    q.push("G", "s1", home_row(12, 4))
    for i in range(6):
        q.push("G", f"n{i}", home_row(free_seed(q.loads("G"), 1, rng.randrange), 4))
    calls = drain(q)
    assert len(calls) == 2 and all(None not in call for call in calls)
    assert [call[0] for call in calls] == ["s0", "s1"]
