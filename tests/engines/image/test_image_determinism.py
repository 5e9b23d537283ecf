"""A request's PNG bytes do not depend on what it shares a pipeline call with.

Every model call of the engine runs at one fixed batch shape (`max_batch` images, padded with
throwaway rows), so a request alone, with companions, or at another row of the batch sees the same
kernels. Each test first checks that the requests really shared one call.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from image_testkit import Collector, request
from PIL import Image

from daemon.engines.image import ImageDoneEvent, ImageEngine

# 96x96 with classifier-free guidance: enough pixels that the old batch-size-dependent kernels
# flipped some of them for this request.
TARGET: dict[str, Any] = dict(prompt="a knight in a forest", seed=1234, width=96, height=96, steps=4)
COMPANIONS: list[dict[str, Any]] = [
    dict(prompt="a dragon over the sea", seed=5),
    dict(prompt="the castle gate at dawn", seed=9),
    dict(prompt="a cute slime monster", seed=77),
]


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


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_companions_do_not_change_the_bytes(make_engine, guidance):
    """The same request gives the same PNG bytes alone, with one companion and with three."""
    expected = alone(make_engine, guidance=guidance)
    for n in (1, 3):
        engine = make_engine(start=False)
        results = run_together(engine, with_target_at(0, COMPANIONS[:n]), guidance=guidance)
        assert engine.stats.pipeline_calls == 1
        assert results[0] == expected, f"with {n} companion(s): {differing_pixels(results[0], expected)}"
        assert all(other != expected for other in results[1:])


def test_row_position_does_not_change_the_bytes(make_engine):
    """The request gives the same bytes at every row of a full batch."""
    expected = alone(make_engine)
    for position in range(len(COMPANIONS) + 1):
        engine = make_engine(start=False)
        results = run_together(engine, with_target_at(position, COMPANIONS))
        assert engine.stats.pipeline_calls == 1
        assert results[position] == expected, f"at row {position}: {differing_pixels(results[position], expected)}"


def test_companions_with_an_adapter_mix(make_engine, version):
    """Batches that run an adapter mix keep the same guarantee."""
    shared = dict(adapters=[(version("ink"), 1.0), (version("pastel"), 0.5)], width=128, height=128)
    expected = alone(make_engine, **shared)
    engine = make_engine(start=False)
    results = run_together(engine, with_target_at(2, COMPANIONS), **shared)
    assert engine.stats.pipeline_calls == 1
    assert results[2] == expected, differing_pixels(results[2], expected)


def test_images_of_one_request_are_the_single_seeds(make_engine):
    """Image i of a `count` request is the image of seed + i asked alone, also when the request
    holds more images than one call (`count` 3 with `max_batch` 2 runs in two calls)."""
    singles = [alone(make_engine, seed=TARGET["seed"] + i, max_batch=2)[0] for i in range(3)]
    engine = make_engine(start=False, max_batch=2)
    (images,) = run_together(engine, [{"count": 3}])
    assert engine.stats.pipeline_calls == 2
    assert images == singles, differing_pixels(images, singles)


def test_max_batch_one_serves_each_request_alone(make_engine):
    """With `max_batch=1` (lowest latency for a lone request) every call holds one image: the
    bytes are the same whatever is queued, and calls run unpadded."""
    expected = alone(make_engine, max_batch=1)
    engine = make_engine(start=False, max_batch=1)
    results = run_together(engine, with_target_at(1, COMPANIONS))
    assert engine.stats.pipeline_calls == 4
    assert results[1] == expected, differing_pixels(results[1], expected)
    assert engine.stats.padding_images == 0
