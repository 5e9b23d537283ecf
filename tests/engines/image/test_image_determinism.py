"""A request's PNG bytes depend on its seed and parameters, not on what it shares a call with nor on
the order requests arrive in.

Every model call of the engine runs at one fixed batch shape (`max_batch` images, padded with
throwaway rows) and every image sits at its home row, `seed % max_batch` (on CUDA the row changes
the bytes; on this CPU it does not, so where images sit is checked directly, by watching the
engine's calls). Each test first checks how the requests were split into calls.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from image_testkit import Collector, request
from PIL import Image

from daemon.engines.image import ImageDoneEvent, ImageEngine, ImageProgressEvent

# 96x96 with classifier-free guidance: enough pixels that the old batch-size-dependent kernels
# flipped some of them for this request. With max_batch 4 its home row is 1234 % 4 = 2.
TARGET: dict[str, Any] = dict(prompt="a knight in a forest", seed=1234, width=96, height=96, steps=4)
COMPANIONS: list[dict[str, Any]] = [  # on the other rows: 0, 1, 3
    dict(prompt="a dragon over the sea", seed=8),
    dict(prompt="the castle gate at dawn", seed=5),
    dict(prompt="a cute slime monster", seed=11),
]
RIVAL: dict[str, Any] = dict(prompt="a ruined tower", seed=6)  # home row 2, like the target's


def run_together(engine: ImageEngine, rows: list[dict[str, Any]], **shared: Any) -> list[list[bytes]]:
    """Submit all rows before the worker starts, so they share calls; return each row's images."""
    collectors = [Collector() for _ in rows]
    for i, (row, c) in enumerate(zip(rows, collectors, strict=True)):
        engine.submit(request(f"r{i}", **{**TARGET, **shared, **row}), c)
    engine.start()
    results = []
    for c in collectors:
        ev = c.wait()
        assert isinstance(ev, ImageDoneEvent) and ev.finish_reason == "stop", ev
        results.append(ev.images)
    return results


def differing_pixels(got: list[bytes], want: list[bytes]) -> str:
    """A readable account of how two lists of PNGs differ (the raw bytes are unreadable)."""
    if len(got) != len(want):
        return f"{len(got)} images instead of {len(want)}"
    counts = []
    for a, b in zip(got, want, strict=True):
        pa, pb = (np.asarray(Image.open(io.BytesIO(x))) for x in (a, b))
        counts.append(int((pa != pb).any(axis=-1).sum()) if pa.shape == pb.shape else -1)
    return f"pixels that differ, per image: {counts}"


def with_target_at(position: int, companions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*companions[:position], {}, *companions[position:]]


def alone(make_engine: Any, **shared: Any) -> list[bytes]:
    engine = make_engine(start=False, **{k: shared.pop(k) for k in ("max_batch",) if k in shared})
    (images,) = run_together(engine, [{}], **shared)
    return images


def watch_calls(engine: ImageEngine) -> list[list[tuple[str, int] | None]]:
    """Record each pipeline call of `engine` as its rows: (request key, seed), or None for padding."""
    calls: list[list[tuple[str, int] | None]] = []
    call = engine._call_pipeline

    def recording(rows: list[Any], *args: Any) -> Any:
        calls.append([(str(row.key), row.seed) if row is not None else None for row in rows])
        return call(rows, *args)

    engine._call_pipeline = recording  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_companions_and_arrival_order_do_not_change_the_bytes(make_engine, guidance):
    """The same request gives the same PNG bytes alone, with one companion and with three, first
    or last to arrive: it always sits at its home row of one call."""
    expected = alone(make_engine, guidance=guidance)
    for companions, position in ((1, 0), (3, 3)):
        engine = make_engine(start=False)
        calls = watch_calls(engine)
        results = run_together(engine, with_target_at(position, COMPANIONS[:companions]), guidance=guidance)
        assert len(calls) == 1 and calls[0][2] == (f"r{position}", TARGET["seed"])
        got = results[position]
        assert got == expected, f"{companions} companion(s), arrived {position}: {differing_pixels(got, expected)}"
        assert all(other != expected for i, other in enumerate(results) if i != position)


def test_companions_on_the_same_home_row_do_not_change_the_bytes(make_engine):
    """A companion that wants the target's row and arrived first takes it; the target waits for
    the next call (at the same row, there with another companion) and gives the same bytes.
    Arriving first, the target keeps its row and the rival waits instead."""
    expected = alone(make_engine)
    late = dict(prompt="a lighthouse", seed=12)  # row 0, like COMPANIONS[0]
    layouts = [  # (arrivals, who sits at row 2 in each call)
        ([RIVAL, COMPANIONS[0], {}, late], [("r0", 6), ("r2", 1234)]),
        ([{}, RIVAL, COMPANIONS[0], COMPANIONS[2]], [("r0", 1234), ("r1", 6)]),
    ]
    for rows, at_row_2 in layouts:
        engine = make_engine(start=False)
        calls = watch_calls(engine)
        position = rows.index({})
        results = run_together(engine, rows)
        assert [call[2] for call in calls] == at_row_2
        assert results[position] == expected, f"arrived {position}: {differing_pixels(results[position], expected)}"
    assert calls[0] == [("r2", 8), None, ("r0", 1234), ("r3", 11)]


def test_companions_with_an_adapter_mix(make_engine, version):
    """Batches that run an adapter mix keep the same guarantee."""
    shared = dict(adapters=[(version("ink"), 1.0), (version("pastel"), 0.5)], width=128, height=128)
    expected = alone(make_engine, **shared)
    engine = make_engine(start=False)
    results = run_together(engine, with_target_at(2, COMPANIONS), **shared)
    assert engine.counters().pipeline_calls == 1
    assert results[2] == expected, differing_pixels(results[2], expected)


def test_each_image_sits_at_its_home_row(make_engine):
    """Every image of every call sits at row seed % max_batch (image i of a request has seed + i);
    one whose row is taken goes in the next call; a seedless request gets a row that was free."""
    engine = make_engine(start=False, max_batch=4)
    fast = dict(width=64, height=64, steps=1)
    layout = [("a", 1234, 1), ("b", 6, 1), ("c", 5, 1), ("d", None, 1), ("e", 3, 2)]
    collectors = {key: Collector() for key, _, _ in layout}
    calls = watch_calls(engine)
    for key, seed, count in layout:
        engine.submit(request(key, seed=seed, count=count, **fast), collectors[key])
    engine.start()
    events = {key: c.wait() for key, c in collectors.items()}
    assert all(isinstance(ev, ImageDoneEvent) and ev.finish_reason == "stop" for ev in events.values())
    d_seed = events["d"].seed
    # a, b, c queued before d: rows 2, 2, 1 taken, so d gets row 0 or 3.
    assert d_seed % 4 in (0, 3)
    for call in calls:
        assert all(cell is None or cell[1] % 4 == row for row, cell in enumerate(call)), call
    assert len(calls) == 2
    assert calls[0][1:3] == [("c", 5), ("a", 1234)] and calls[1][2] == ("b", 6)
    placed = sorted(cell for call in calls for cell in call if cell is not None)
    assert placed == [("a", 1234), ("b", 6), ("c", 5), ("d", d_seed), ("e", 3), ("e", 4)]
    stats = engine.counters()
    assert (stats.images, stats.padding_images, stats.collision_padding) == (6, 2, 0)


def test_a_request_spread_over_calls_counts_all_their_steps(make_engine):
    """A request whose images wait for taken rows counts the steps of every call it is in."""
    engine = make_engine(start=False, max_batch=2)
    calls = watch_calls(engine)
    first, spread = Collector(), Collector()
    engine.submit(request("first", seed=10, steps=2), first)  # row 0
    engine.submit(request("spread", seed=20, count=2, steps=2), spread)  # rows 0 (taken) and 1
    engine.start()
    assert isinstance(first.wait(), ImageDoneEvent) and isinstance(spread.wait(), ImageDoneEvent)
    assert calls == [[("first", 10), ("spread", 21)], [("spread", 20), None]]
    progress = [(e.step, e.total) for e in spread.events if isinstance(e, ImageProgressEvent)]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert (engine.counters().padding_images, engine.counters().collision_padding) == (1, 0)


def test_a_seedless_burst_fills_one_call_and_replays(make_engine):
    """Seedless requests arriving together get seeds on different rows (one full call); replaying
    a reported seed gives the same bytes."""
    engine = make_engine(start=False, max_batch=4)
    fast = dict(width=64, height=64, steps=2)
    collectors = [Collector() for _ in range(4)]
    for i, c in enumerate(collectors):
        engine.submit(request(f"n{i}", seed=None, prompt=f"tile {i}", **fast), c)
    engine.start()
    events = [c.wait() for c in collectors]
    assert engine.counters().pipeline_calls == 1 and engine.counters().padding_images == 0
    assert sorted(ev.seed % 4 for ev in events) == [0, 1, 2, 3]
    replay = Collector()
    engine.submit(request("replay", seed=events[1].seed, prompt="tile 1", **fast), replay)
    assert replay.wait().images == events[1].images


def test_images_of_one_request_are_the_single_seeds(make_engine):
    """Image i of a `count` request is the image of seed + i asked alone, also when the request
    holds more images than one call (`count` 3 with `max_batch` 2 runs in two calls)."""
    singles = [alone(make_engine, seed=TARGET["seed"] + i, max_batch=2)[0] for i in range(3)]
    engine = make_engine(start=False, max_batch=2)
    (images,) = run_together(engine, [{"count": 3}])
    assert engine.counters().pipeline_calls == 2
    assert images == singles, differing_pixels(images, singles)


def test_max_batch_one_serves_each_request_alone(make_engine):
    """With `max_batch=1` (lowest latency for a lone request) every call holds one image at row 0:
    the bytes are the same whatever is queued, and calls run unpadded."""
    expected = alone(make_engine, max_batch=1)
    engine = make_engine(start=False, max_batch=1)
    results = run_together(engine, with_target_at(1, COMPANIONS))
    assert engine.counters().pipeline_calls == 4
    assert results[1] == expected, differing_pixels(results[1], expected)
    assert engine.counters().padding_images == 0
