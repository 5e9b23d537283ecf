"""The image engine: one diffusers pipeline, one worker thread, a LoRA mix chosen per request.

Callers `submit` an `ImageRequest` from any thread and receive `ImageProgressEvent`s, then one
`ImageDoneEvent` or `base.EngineError`, through a callback on the worker thread. Requests with the
same mix (versions and weights), size, step count and guidance share one pipeline call; groups
take turns (`batching.FairQueue`), each image at the home row its seed gives it, in calls of
exactly `max_batch` images: so the same seed and parameters give the same PNG bytes whatever else
is in the call (docs/IMAGES.md has the reasons and the price). Adapter residency and hotswap live
in `slots.AdapterSlots`, request checks in `checks`, the pipeline call in `calls`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Literal

import torch

from ...adapters.loader import AdapterFiles
from ...adapters.version import AdapterVersion
from ...budget import GpuBudget
from ..base import EngineError, EngineErrorCode, EngineInfo, EventSink, PreparedAdapter
from ..device import dtype_name, resolve_device
from .batching import FairQueue, free_seed, home_row
from .calls import CallRow, pipeline_call
from .checks import Refused, check_request
from .jobs import Image, Job
from .loading import LoraCheck, load_pipeline
from .request import ImageConfig, ImageCounters, ImageRequest
from .slots import AdapterSlots

__all__ = ["ImageEngine"]

log = logging.getLogger("loraloom.image")


class ImageEngine:
    """A diffusers text-to-image pipeline serving per-request LoRA mixes from one worker thread."""

    def __init__(self, pipe: Any, config: ImageConfig | None = None, *, name: str, placeholder: bool = False) -> None:
        """Serve an already built pipeline (benchmarks build a real-size random UNet in memory);
        `from_folder` loads one."""
        self.config = cfg = config or ImageConfig()
        device = resolve_device(cfg.device, allow_mps=True)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe, self._name, self._placeholder, self._device = pipe, name, placeholder, device
        self._dtype = dtype_name(pipe.unet.dtype) if getattr(pipe, "unet", None) is not None else "float32"
        self._size_multiple = max(8, int(getattr(pipe, "vae_scale_factor", 8)))
        # Captured before any adapter is injected, so validation never walks a changing model.
        self._lora_check = LoraCheck(pipe, name=name, max_rank=cfg.max_adapter_rank)
        self._slots = AdapterSlots(pipe, limit=cfg.adapter_slots)
        self._counters = ImageCounters()
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._live: dict[Hashable, Job] = {}  # submitted and not finished
        self._cancels: set[Hashable] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._queue: FairQueue[Image] = FairQueue(cfg.max_batch)  # worker thread only
        self.budget: GpuBudget | None = None  # the GPU budget the daemon shares between its engines
        self._step_mark = 0.0  # when the last denoising step ended (the budget times steps)
        log.info("image model %s%s loaded on %s (%s)", name, " (a placeholder that draws noise)" if placeholder else "",
                 device, self._dtype)

    @classmethod
    def from_folder(cls, model: str | Path, config: ImageConfig | None = None, *, cache_dir: Path) -> ImageEngine:
        """`model` is a diffusers pipeline folder, or "default" for the placeholder."""
        cfg = config or ImageConfig()
        pipe, name, placeholder = load_pipeline(model, cfg, cache_dir=cache_dir)
        return cls(pipe, cfg, name=name, placeholder=placeholder)

    # ------------------------------------------------------------ the contract (base.Engine)

    def describe(self) -> EngineInfo:
        cfg = self.config
        return EngineInfo(kind="image", name=self._name, device=str(self._device), dtype=self._dtype,
                          placeholder=self._placeholder,
                          limits={"max_pixels": cfg.max_pixels, "max_steps": cfg.max_steps, "max_count": cfg.max_count,
                                  "max_batch": cfg.max_batch, "size_multiple": self._size_multiple,
                                  "max_adapters": cfg.max_adapters},
                          capabilities=frozenset({"mixes", "seeds", "progress"}))

    def counters(self) -> ImageCounters:
        with self._cond:
            snap = dataclasses.replace(self._counters)
        slot_stats = self._slots.stats
        snap.adapter_loads, snap.adapter_hotswaps = slot_stats.loads, slot_stats.hotswaps
        snap.adapter_unloads = slot_stats.unloads
        return snap

    def stats(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.counters()), "resident_adapters": len(self._slots.resident)}

    @property
    def resident_adapters(self) -> list[str]:
        """Version keys (`name@number`) loaded in the pipeline, least recently used first."""
        return self._slots.resident

    def prepare_adapter(self, files: AdapterFiles) -> PreparedAdapter:
        rank, targets = self.validate_adapter(files.tensors, files.files)
        return PreparedAdapter(rank=rank, targets=targets)

    def validate_adapter(self, tensors: dict[str, torch.Tensor],
                         files: dict[str, int] | None = None) -> tuple[int, tuple[str, ...]]:
        """Check an image LoRA against this model: (rank, target module names) or ValueError (any thread)."""
        return self._lora_check(tensors, files)

    def publish(self, version: AdapterVersion) -> None:
        """Nothing ahead of time: a version is fused into the pipeline by its first call."""

    def retire(self, version: AdapterVersion) -> None:
        """Nothing to do now: `AdapterSlots` drops superseded versions once no request needs them."""

    def start(self) -> None:
        """Start the worker thread (idempotent). Requests submitted before start wait for it."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the image engine was stopped; build a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._worker, name="loraloom-image", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker (idempotent): the running call is interrupted, waiting requests end with STOPPED."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:
            self._fail_waiting()

    def submit(self, request: ImageRequest, on_event: EventSink) -> None:
        """Queue a request. Its events go to `on_event` on the worker thread; only a request
        refused here because the engine is stopped is answered on the caller's thread."""
        job = Job(request=request, on_event=on_event, arrived=time.monotonic())
        with self._cond:
            if not self._stopping:
                if request.key in self._live:
                    refusal = EngineErrorCode.DUPLICATE, f"a request with key {request.key!r} is already running"
                else:
                    self._live[request.key] = job
                    self._inbox.append(job)
                    self._cond.notify_all()
                    return
            else:
                refusal = EngineErrorCode.STOPPED, "the image engine is stopped"
        self._emit(job, EngineError(request.key, *refusal))

    def cancel(self, key: Hashable) -> None:
        """Stop a request between denoising steps (nothing happens if it is not in flight)."""
        with self._cond:
            if key in self._live:
                self._cancels.add(key)
                self._cond.notify_all()

    # ------------------------------------------------------------ worker

    def _worker(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._queue and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                for job in inbox:
                    self._admit(job)
                self._reap_cancelled()
                picked = self._queue.pop_call()
                if picked is not None:
                    self._run_call(*picked)
        except BaseException:
            log.exception("image worker crashed")
            with self._cond:
                self._stopping = True
        finally:
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        with self._cond:
            waiting = list(dict.fromkeys([*self._inbox, *(image.job for image in self._queue)]))
            self._inbox = []
            self._queue = FairQueue(self.config.max_batch)
        for job in waiting:
            if not job.done:
                self._finish_error(job, EngineErrorCode.STOPPED, "the image engine stopped before this request ran")

    def _admit(self, job: Job) -> None:
        """Queue a request's images, each for its home row (see `batching`)."""
        try:
            job.checked = check_request(job.request, self.config, size_multiple=self._size_multiple,
                                        supports_lora=self._lora_check.supported, model_name=self._name)
        except Refused as refused:
            self._finish_error(job, refused.code, refused.message)
            return
        count, batch_key, rows = job.request.count, job.checked.batch_key, self.config.max_batch
        if job.checked.seed is None:
            # A seed whose images' home rows are free (or least loaded) in their group's calls.
            job.checked.seed = free_seed(self._queue.loads(batch_key), count)
        for i in range(count):
            seed = job.checked.seed + i
            self._queue.push(batch_key, Image(job, i, seed), home_row(seed, rows))

    def _reap_cancelled(self) -> None:
        with self._cond:
            if not self._cancels:
                return
            cancels = set(self._cancels)
        now = time.monotonic()
        for job in dict.fromkeys(image.job for image in self._queue.remove(lambda i: i.job.key in cancels)):
            if not job.done:
                self._finish(job, [], "cancelled", now)

    def _run_call(self, group: Hashable, call: list[Image | None]) -> None:
        """One pipeline call: each image at its home row (its index in `call`), None rows padded."""
        call = [image if image is not None and not image.job.done else None for image in call]
        placed = [image for image in call if image is not None]
        if not placed:
            return
        # Rows padded although images of this group wait: their home rows are taken in this call.
        waiting = any(self._queue.loads(group))
        jobs = list(dict.fromkeys(image.job for image in placed))
        lead = jobs[0]
        mix = [(lead.checked.versions[k], w) for k, w in lead.checked.mix]
        referenced = {k for image in self._queue for k, _ in image.job.checked.mix}
        try:
            self._slots.ensure([v for v, _ in mix], referenced)
            self._slots.activate(mix)
        except Exception as exc:
            log.exception("could not load image adapters %s", [v.key for v, _ in mix])
            names = ", ".join(f"'{v.name}' (version {v.number})" for v, _ in mix)
            for job in jobs:
                self._finish_error(job, EngineErrorCode.ADAPTER, f"could not load adapter {names}: {exc}")
            return
        started = time.monotonic()
        for job in jobs:
            if job.started is None:
                job.started = started
            # Progress counts the steps of every call that holds images of the request: this one,
            # those before and those its queued images wait for.
            waits = self._queue.waits(lambda image, job=job: image.job is job)  # type: ignore[misc]
            job.calls_total = job.calls_done + 1 + len(set(waits))
        r = lead.request
        rows = [CallRow(i.job.key, i.job.request.prompt, i.job.request.negative_prompt, i.seed) if i else None
                for i in call]
        self._step_mark = time.perf_counter()
        try:
            out = self._call_pipeline(rows, r, lambda pipe, i: self._after_step(pipe, i, jobs))
        except Exception as exc:
            log.exception("image pipeline call failed")
            for job in jobs:
                if not job.done:
                    self._finish_error(job, EngineErrorCode.FAILED,
                                       f"image generation failed: {type(exc).__name__}: {exc}")
            return
        with self._cond:
            self._counters.record_call(len(placed), self.config.max_batch, waiting)
        now = time.monotonic()
        for job in jobs:
            job.calls_done += 1
        for image, picture in zip(placed, out, strict=True):
            if not image.job.done:
                image.job.results[image.index] = picture
        for job in jobs:
            if not job.done and len(job.results) == job.request.count:
                self._finish(job, job.pngs(), "stop", now)

    def _call_pipeline(self, rows: list[CallRow | None], r: ImageRequest,
                       on_step: Callable[[Any, int], None]) -> list[Any]:
        return pipeline_call(self._pipe, rows, width=r.width, height=r.height, steps=r.steps, guidance=r.guidance,
                             negative=r.negative_prompt is not None, on_step=on_step)

    def _after_step(self, pipe: Any, i: int, jobs: list[Job]) -> None:
        now = time.monotonic()
        with self._cond:
            cancels, stopping = set(self._cancels), self._stopping
        for job in jobs:
            if job.done:
                continue
            if stopping:
                self._finish_error(job, EngineErrorCode.STOPPED, "the image engine is stopping")
            elif job.key in cancels:
                self._finish(job, [], "cancelled", now)
        live = [j for j in jobs if not j.done]
        if not live:
            pipe._interrupt = True  # diffusers skips the remaining steps (then still decodes what it has)
        else:
            per_call = int(getattr(pipe, "_num_timesteps", 0) or len(pipe.scheduler.timesteps))
            for job in live:
                self._emit(job, job.progress(i, per_call, now))
        self._reap_cancelled()  # cancelled requests still waiting are answered now, not after this call
        if self.budget is not None and self.budget.spec.active:
            self._keep_budget()

    def _keep_budget(self) -> None:
        """Between denoising steps: record the step's time and wait while the GPU budget says so."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # the step's time is the device's
        now = time.perf_counter()
        step = now - self._step_mark
        assert self.budget is not None
        self.budget.record(step)
        wait = self.budget.delay(step * 1000)
        if wait > 0:
            time.sleep(min(wait, 1.0))
            self.budget.record(0.0, waited=wait)
        self._step_mark = time.perf_counter()

    # ------------------------------------------------------------ endings

    def _retire_job(self, job: Job) -> None:
        job.done = True
        job.results.clear()
        self._queue.remove(lambda image: image.job is job)  # its images still waiting, if any
        with self._cond:
            if self._live.get(job.key) is job:
                del self._live[job.key]
            self._cancels.discard(job.key)

    def _finish(self, job: Job, images: list[bytes], reason: Literal["stop", "cancelled"], now: float) -> None:
        self._retire_job(job)
        with self._cond:
            if reason == "cancelled":
                self._counters.requests_cancelled += 1
            else:
                self._counters.requests_done += 1
        self._emit(job, job.done_event(images, reason, now))

    def _finish_error(self, job: Job, code: EngineErrorCode, message: str) -> None:
        self._retire_job(job)
        with self._cond:
            self._counters.requests_failed += 1
        self._emit(job, EngineError(job.key, code, message))

    def _emit(self, job: Job, event: Any) -> None:
        try:
            job.on_event(event)
        except Exception:
            # A broken listener must not take the worker (and everyone else's images) down.
            log.exception("image event listener failed for request %r", job.key)
