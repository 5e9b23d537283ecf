"""The image engine end to end on the tiny placeholder pipeline: LoRA mixes, determinism,
progress, cancellation, refusals, live adapter updates and batching."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from image_testkit import Collector, generate, request
from PIL import Image

from daemon.engines.base import EngineError, EngineErrorCode
from daemon.engines.image import ImageDoneEvent, ImageProgressEvent


def done(event: Any) -> ImageDoneEvent:
    assert isinstance(event, ImageDoneEvent), event
    return event


def error(event: Any) -> EngineError:
    assert isinstance(event, EngineError), event
    return event


# ---------------------------------------------------------------- the model and the result


def test_info_labels_the_placeholder(make_engine):
    """The default model announces itself as a placeholder on the CPU in float32."""
    info = make_engine(start=False).describe()
    assert info.placeholder is True and info.kind == "image"
    assert "placeholder" in info.name
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.limits["size_multiple"] == 8


def test_result_is_png_of_the_requested_size(make_engine, version):
    """A result holds `count` PNGs of width x height plus the seed and adapter versions used."""
    engine = make_engine()
    ink = version("ink", number=3)
    ev = done(generate(engine, "r", width=64, height=48, count=2, seed=77, adapters=[(ink, 1.0)]))
    assert ev.finish_reason == "stop"
    assert len(ev.images) == 2
    for png in ev.images:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(png)).size == (64, 48)
    assert (ev.seed, ev.width, ev.height) == (77, 64, 48)
    assert ev.adapter_versions == {"ink": 3}
    assert ev.images[0] != ev.images[1]  # seed and seed+1
    t = ev.timings
    assert t.first_step_ms is not None
    assert 0 <= t.queued_ms <= t.first_step_ms <= t.total_ms


# ---------------------------------------------------------------- determinism and adapters


def test_identical_seeds_give_identical_bytes(make_engine):
    """The same request twice gives the same PNG bytes; another seed gives another image."""
    engine = make_engine()
    a = done(generate(engine, "a", seed=5)).images
    b = done(generate(engine, "b", seed=5)).images
    c = done(generate(engine, "c", seed=6)).images
    assert a == b
    assert a != c


def test_seed_is_picked_and_reported(make_engine):
    """Without a seed the engine picks one; asking again with it reproduces the image."""
    engine = make_engine()
    first = done(generate(engine, "a", seed=None))
    again = done(generate(engine, "b", seed=first.seed))
    assert first.images == again.images


def test_adapter_changes_the_image(make_engine, version):
    """An adapter at weight 1 changes the image."""
    engine = make_engine()
    base = done(generate(engine, "base")).images
    styled = done(generate(engine, "ink", adapters=[(version("ink"), 1.0)])).images
    assert styled != base


def test_weight_zero_is_the_base_image(make_engine, version):
    """Weight 0 gives exactly the base image, and so does the base after adapters were used."""
    engine = make_engine()
    base = done(generate(engine, "base")).images
    ink = version("ink")
    assert done(generate(engine, "ink", adapters=[(ink, 1.0)])).images != base
    assert done(generate(engine, "zero", adapters=[(ink, 0.0)])).images == base
    assert done(generate(engine, "base-again")).images == base
    assert engine.resident_adapters == ["ink@1"]  # the adapter stayed loaded meanwhile


def test_two_adapter_mix_differs_from_each_alone(make_engine, version):
    """A mix of two adapters is neither adapter alone, and repeating the mix is reproducible."""
    engine = make_engine()
    ink, pastel = version("ink"), version("pastel")
    only_ink = done(generate(engine, "i", adapters=[(ink, 1.0)])).images
    only_pastel = done(generate(engine, "p", adapters=[(pastel, 1.0)])).images
    mix = done(generate(engine, "m", adapters=[(ink, 1.0), (pastel, 0.7)])).images
    assert mix != only_ink
    assert mix != only_pastel
    # The order adapters are named in does not matter.
    assert done(generate(engine, "m2", adapters=[(pastel, 0.7), (ink, 1.0)])).images == mix


def test_weight_scales_the_effect(make_engine, version):
    """Half the weight is a different image from full weight."""
    engine = make_engine()
    ink = version("ink")
    full = done(generate(engine, "f", adapters=[(ink, 1.0)])).images
    half = done(generate(engine, "h", adapters=[(ink, 0.5)])).images
    assert full != half


def test_text_encoder_lora_is_applied(make_engine, version):
    """A LoRA that also patches the text encoder loads and changes the image."""
    engine = make_engine()
    base = done(generate(engine, "base")).images
    poster = done(generate(engine, "poster", adapters=[(version("poster"), 1.0)]))
    assert poster.images != base


def test_new_version_is_used_by_the_next_request(make_engine, version):
    """A new version of an adapter (same name, new tensors) serves the next request, hotswapped
    into the old version's slot, and draws what that version alone draws."""
    engine = make_engine()
    v1 = version("ink", name="ink", number=1)
    v2 = version("ink_v2", name="ink", number=2)
    first = done(generate(engine, "one", adapters=[(v1, 1.0)]))
    second = done(generate(engine, "two", adapters=[(v2, 1.0)]))
    assert first.images != second.images
    assert second.adapter_versions == {"ink": 2}
    assert engine.resident_adapters == ["ink@2"]
    assert engine.counters().adapter_hotswaps == 1
    assert engine.counters().adapter_loads == 1

    # A fresh engine that only ever saw version 2 draws the same bytes.
    fresh = make_engine()
    alone = done(generate(fresh, "alone", adapters=[(version("ink_v2", name="other"), 1.0)]))
    assert alone.images == second.images


def test_new_version_with_another_rank_is_loaded_fresh(make_engine, version):
    """A new version whose layout differs cannot be hotswapped: it is loaded and the old one dropped."""
    engine = make_engine()
    v1 = version("ink", name="ink", number=1)
    v2 = version("ink_r8", name="ink", number=2)
    first = done(generate(engine, "one", adapters=[(v1, 1.0)])).images
    second = done(generate(engine, "two", adapters=[(v2, 1.0)])).images
    assert first != second
    assert engine.resident_adapters == ["ink@2"]
    stats = engine.counters()
    assert (stats.adapter_loads, stats.adapter_hotswaps, stats.adapter_unloads) == (2, 0, 1)


def test_slot_limit_evicts_least_recently_used(make_engine, version):
    """With one slot, using another adapter evicts the first; coming back reloads it correctly."""
    engine = make_engine(adapter_slots=1)
    ink, pastel = version("ink"), version("pastel")
    first = done(generate(engine, "a", adapters=[(ink, 1.0)])).images
    done(generate(engine, "b", adapters=[(pastel, 1.0)]))
    assert engine.resident_adapters == ["pastel@1"]
    again = done(generate(engine, "c", adapters=[(ink, 1.0)])).images
    assert again == first
    assert engine.counters().adapter_unloads == 2


# ---------------------------------------------------------------- progress and cancellation


def test_progress_events_arrive_in_order(make_engine):
    """Each denoising step reports (step, total) from 1 to total before the result."""
    engine = make_engine()
    collector = Collector()
    engine.submit(request("p", steps=6), collector)
    last = done(collector.wait())
    progress = [e for e in collector.events if isinstance(e, ImageProgressEvent)]
    assert [(e.step, e.total) for e in progress] == [(i, 6) for i in range(1, 7)]
    assert collector.events[-1] is last
    assert all(e.key == "p" for e in collector.events)


def test_cancel_midway(make_engine):
    """Cancelling after step 2 stops the denoising loop: result `cancelled`, no images."""
    engine = make_engine()

    def cancel_at_two(event: Any) -> None:
        if isinstance(event, ImageProgressEvent) and event.step == 2:
            engine.cancel("c")

    collector = Collector(cancel_at_two)
    engine.submit(request("c", steps=40), collector)
    ev = done(collector.wait())
    assert ev.finish_reason == "cancelled"
    assert ev.images == []
    steps = [e.step for e in collector.events if isinstance(e, ImageProgressEvent)]
    assert steps == [1, 2]
    assert engine.counters().requests_cancelled == 1
    # The engine keeps serving.
    assert done(generate(engine, "after")).finish_reason == "stop"


def test_cancel_one_request_of_a_batch(make_engine):
    """Cancelling one request of a shared call ends it at once; its companion still finishes."""
    engine = make_engine(start=False)

    def cancel_at_one(event: Any) -> None:
        if isinstance(event, ImageProgressEvent) and event.step == 1:
            engine.cancel("x")

    x, y = Collector(cancel_at_one), Collector()
    engine.submit(request("x", steps=8, seed=1), x)
    engine.submit(request("y", steps=8, seed=2), y)
    engine.start()
    assert done(x.wait()).finish_reason == "cancelled"
    ev = done(y.wait())
    assert ev.finish_reason == "stop" and len(ev.images) == 1
    assert engine.counters().pipeline_calls == 1
    assert max(e.step for e in x.events if isinstance(e, ImageProgressEvent)) == 1


def test_request_larger_than_a_call_counts_all_its_steps(make_engine):
    """A request for more images than `max_batch` runs in several calls; its progress counts the
    steps of all of them, and cancelling it skips the calls not yet started."""
    engine = make_engine(max_batch=2)
    collector = Collector()
    engine.submit(request("big", steps=2, count=3), collector)
    ev = done(collector.wait())
    assert len(ev.images) == 3 and len(set(ev.images)) == 3
    progress = [(e.step, e.total) for e in collector.events if isinstance(e, ImageProgressEvent)]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert (engine.counters().pipeline_calls, engine.counters().images, engine.counters().padding_images) == (2, 3, 1)

    def cancel_at_one(event: Any) -> None:
        if isinstance(event, ImageProgressEvent) and event.step == 1:
            engine.cancel("cut")

    cut = Collector(cancel_at_one)
    engine.submit(request("cut", steps=2, count=3), cut)
    assert done(cut.wait()).finish_reason == "cancelled"
    done(generate(engine, "after", steps=1))  # the worker is past the cancelled request's call
    assert engine.counters().pipeline_calls == 4  # 2, then 1 of the cancelled request's 2, then 1


def test_cancel_a_waiting_request(make_engine):
    """A request cancelled before it ran ends `cancelled` without any progress."""
    engine = make_engine(start=False)
    collector = Collector()
    engine.submit(request("w"), collector)
    engine.cancel("w")
    engine.start()
    ev = done(collector.wait())
    assert ev.finish_reason == "cancelled"
    assert ev.timings.first_step_ms is None
    assert not [e for e in collector.events if isinstance(e, ImageProgressEvent)]
    engine.cancel("w")  # no longer in flight, and one never submitted: nothing happens
    engine.cancel("never-submitted")
    assert done(generate(engine, "w")).finish_reason == "stop"  # the key is free again


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(width=100), "multiple of 8"),
        (dict(height=4), "at least 8"),
        (dict(width=2048, height=2048), "more than this daemon's limit"),
        (dict(steps=500), "steps must be between 1 and 100"),
        (dict(steps=0), "steps must be between"),
        (dict(count=0), "count must be between"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_parameters_are_refused(make_engine, fields, words):
    """Bad sizes, step counts and such get `invalid_parameter` with a readable reason."""
    engine = make_engine()
    ev = error(generate(engine, "bad", **fields))
    assert ev.code == EngineErrorCode.INVALID
    assert words in ev.message
    assert done(generate(engine, "good")).finish_reason == "stop"


def test_text_adapter_is_refused(make_engine, version):
    """A text adapter named in an image request is `adapter_unavailable`."""
    from dataclasses import replace

    engine = make_engine()
    text = replace(version("ink"), kind="text")
    ev = error(generate(engine, "t", adapters=[(text, 1.0)]))
    assert ev.code == EngineErrorCode.ADAPTER
    assert "text adapter" in ev.message


def test_unloadable_adapter_fails_only_its_request(make_engine, version, random_tensor):
    """An adapter that diffusers cannot load fails its request; the next one is fine."""
    from dataclasses import replace

    engine = make_engine()
    broken = replace(version("ink"), name="broken", tensors={"unet.nowhere.lora_A.weight": random_tensor(2, 3)})
    ev = error(generate(engine, "b", adapters=[(broken, 1.0)]))
    assert ev.code == EngineErrorCode.ADAPTER
    assert "broken" in ev.message
    assert done(generate(engine, "ok", adapters=[(version("ink"), 1.0)])).finish_reason == "stop"


def test_duplicate_key_is_refused(make_engine):
    """A key already in flight is refused with `duplicate_id`; the first request is unharmed."""
    engine = make_engine(start=False)
    first, second = Collector(), Collector()
    engine.submit(request("same"), first)
    engine.submit(request("same"), second)
    assert error(second.wait()).code == EngineErrorCode.DUPLICATE
    engine.start()
    assert done(first.wait()).finish_reason == "stop"


def test_stop_answers_waiting_requests(make_engine):
    """Stopping fails queued requests with `shutting_down`; stop is idempotent, start refused."""
    engine = make_engine(start=False)
    collector = Collector()
    engine.submit(request("w"), collector)
    engine.stop()
    engine.stop()
    assert error(collector.wait()).code == EngineErrorCode.STOPPED
    late = Collector()
    engine.submit(request("late"), late)
    assert error(late.wait()).code == EngineErrorCode.STOPPED
    with pytest.raises(RuntimeError):
        engine.start()


def test_listener_errors_do_not_stop_the_worker(make_engine):
    """A callback that raises is logged; later requests are still served."""
    engine = make_engine()

    def broken(event: Any) -> None:
        raise RuntimeError("listener bug")

    engine.submit(request("x"), broken)
    assert done(generate(engine, "y")).finish_reason == "stop"


# ---------------------------------------------------------------- batching and fairness


def test_same_adapter_set_is_batched(make_engine, version):
    """Requests with the same mix, size and steps share one pipeline call; another mix gets its own."""
    engine = make_engine(start=False, max_batch=4)
    ink = version("ink")
    collectors = {k: Collector() for k in ("a", "b", "c", "d")}
    engine.submit(request("a", seed=1, adapters=[(ink, 1.0)]), collectors["a"])
    engine.submit(request("b", seed=2, adapters=[(ink, 1.0)], prompt="a dragon"), collectors["b"])
    engine.submit(request("c", seed=3, adapters=[(ink, 0.5)]), collectors["c"])
    # Seeds 7 and 8 of d: home rows 3 and 0, free of a's and b's (rows 1, 2), so one call.
    engine.submit(request("d", seed=7, adapters=[(ink, 1.0)], count=2), collectors["d"])
    engine.start()
    for c in collectors.values():
        assert done(c.wait()).finish_reason == "stop"
    stats = engine.counters()
    assert stats.pipeline_calls == 2  # {a, b, d} at weight 1, then {c} at weight 0.5
    assert stats.largest_batch == 4
    assert stats.images == 5


def test_batch_is_bounded_by_max_batch(make_engine):
    """No pipeline call holds more than max_batch images."""
    engine = make_engine(start=False, max_batch=2)
    collectors = [Collector() for _ in range(5)]
    for i, c in enumerate(collectors):
        engine.submit(request(f"r{i}", seed=i), c)
    engine.start()
    for c in collectors:
        done(c.wait())
    assert engine.counters().pipeline_calls == 3
    assert engine.counters().largest_batch == 2


def test_groups_are_served_round_robin(make_engine, version):
    """Different adapter sets take turns; inside a set requests keep their order."""
    engine = make_engine(start=False, max_batch=1)
    order: list[str] = []
    lock = threading.Lock()
    pastel = version("pastel")

    def track(event: Any) -> None:
        if isinstance(event, ImageDoneEvent):
            with lock:
                order.append(str(event.key))

    collectors = []
    for key, adapters in (
        ("A1", []),
        ("A2", []),
        ("A3", []),
        ("B1", [(pastel, 1.0)]),
        ("B2", [(pastel, 1.0)]),
    ):
        c = Collector(track)
        collectors.append(c)
        engine.submit(request(key, adapters=adapters, steps=2), c)
    engine.start()
    for c in collectors:
        c.wait()
    assert order == ["A1", "B1", "A2", "B2", "A3"]


def test_batched_request_matches_itself(make_engine):
    """The same batch run twice gives the same bytes for each of its requests."""
    runs = []
    for _ in range(2):
        engine = make_engine(start=False)
        a, b = Collector(), Collector()
        engine.submit(request("a", seed=10), a)
        engine.submit(request("b", seed=20, prompt="a castle"), b)
        engine.start()
        runs.append((done(a.wait()).images, done(b.wait()).images))
        assert engine.counters().pipeline_calls == 1
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]
