"""The image engine: one diffusers pipeline, one worker thread, a LoRA mix chosen per request.

`ImageEngine` owns the pipeline and the thread that runs it. Callers `submit` an `ImageRequest`
from any thread and receive `ImageProgressEvent`s, then one `ImageDoneEvent` or `ImageErrorEvent`,
through a callback run on the worker thread (the caller hops threads itself).

diffusers activates adapters for a whole pipeline, so per-request mixes are served by grouping:
requests with the same mix (versions and weights), size, step count and guidance share one
pipeline call; groups take turns (see `batching.FairQueue`). Adapter residency and hotswap live in
`slots.AdapterSlots`; the shape checks behind `validate_adapter` in `lora_format`.

Reproducibility: the same seed and parameters give the same PNG bytes on the same device (CPU or
CUDA) whatever the request shares a call with and in whatever order requests arrive, because each
image is always computed at the same row of the same batch shape:

- The shape. Kernels round differently for different batch shapes (convolutions and GEMMs pick
  other algorithms and blockings; about 1e-6, enough to flip a few 8-bit pixels), so every model
  call (text encoder, UNet, scheduler) runs at exactly `max_batch` images, rows without an image
  holding throwaway padding (empty prompt, seed 0) that is dropped. With classifier-free guidance
  the UNet sees 2 x `max_batch` rows, always. The VAE decodes the real images one at a time and
  skips the padding.
- The row. Within one shape the row matters too on CUDA: measured on an H200 (fp16, SD1.5-sized
  UNet), a cuDNN convolution (1280 channels at 16x16) reduces different batch rows in different
  orders, so the same image came out differently at rows 2..7 than at rows 0 and 1, whatever the
  other rows held; `cudnn.deterministic`, `benchmark=False` and channels_last do not change that.
  So every image has a *home row* that depends on nothing but its seed, `seed % max_batch`, and
  every call places it there (with guidance the UNet rows r and `max_batch` + r). Images of one
  group whose home row is taken in a call wait for the group's next call, first in line for that
  row (`batching` has the rules and why nothing starves).

Image i of a request has seed `seed + i` (and so the home row of that seed) and its own CPU
generator seeded with it, so its starting noise is the same on every device and it equals the
single image asked for with seed `seed + i`; a request for more images than fit in a call takes
several calls. A request without a seed gets a random one whose home rows are free (or least
loaded) in its group (`batching.free_seed`), so seedless bursts still fill calls; the seed is
reported with the result and replaying it gives the same bytes. `benchmarks/bench_image.py`
checks all this on the device at hand.

The price: a call with fewer images than `max_batch` (a lone request, a small group of one adapter
mix) costs as much as a full one. Full calls cost what they did; a lone request waits as long as
for `max_batch` images (in the H200 benchmark at 512x512 a call of 8 took about twice as long as a
call of 1; on a CPU up to `max_batch` times). Requests with a seed whose home rows collide take
more calls than they would fill (requests of one group all given seeds with the same remainder run
one image per call); seedless requests never collide with waiting ones while a row is free.
`max_batch=1` gives the lowest latency for lone requests and no batching. The bytes depend on
`max_batch` itself (another shape, other home rows): engines that should agree need the same value.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from bridge.errors import ErrorCode
from daemon.adapters.version import AdapterVersion

from .batching import FairQueue, free_seed, home_row
from .default_pipeline import PLACEHOLDER_NAME, ensure_default_image_model, is_placeholder_model
from .lora_format import build_shape_index, check_lora, normalize_lora
from .slots import AdapterSlots

__all__ = [
    "ImageDoneEvent",
    "ImageEngine",
    "ImageEngineStats",
    "ImageErrorEvent",
    "ImageEvent",
    "ImageProgressEvent",
    "ImageRequest",
    "ImageTimings",
]

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- requests and events


@dataclass(frozen=True)
class ImageRequest:
    """One image request as the engine sees it: adapter names already resolved to versions."""

    key: Hashable  # unique among the requests in flight; every event carries it
    prompt: str
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    seed: int | None = None  # None: the engine picks one and reports it
    count: int = 1
    adapters: list[tuple[AdapterVersion, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ImageTimings:
    """Milliseconds from the request's arrival (`submit`)."""

    queued_ms: float  # until its pipeline call started
    first_step_ms: float | None  # until its first denoising step finished (None: never ran)
    total_ms: float  # until its result was ready


@dataclass(frozen=True)
class ImageProgressEvent:
    key: Hashable
    step: int  # 1 .. total
    total: int


@dataclass(frozen=True)
class ImageDoneEvent:
    key: Hashable
    images: list[bytes]  # PNG files; empty when cancelled
    seed: int
    width: int
    height: int
    finish_reason: Literal["stop", "cancelled"]
    adapter_versions: dict[str, int]  # adapter name -> version number the request used
    timings: ImageTimings


@dataclass(frozen=True)
class ImageErrorEvent:
    key: Hashable
    code: ErrorCode
    message: str


ImageEvent = ImageProgressEvent | ImageDoneEvent | ImageErrorEvent


@dataclass
class ImageEngineStats:
    """Counters since the engine was built; `ImageEngine.stats` returns a snapshot."""

    pipeline_calls: int = 0
    images: int = 0  # images generated by finished pipeline calls
    requests_done: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    largest_batch: int = 0  # most images in one pipeline call
    padding_images: int = 0  # throwaway rows computed to keep every call at `max_batch` images
    collision_padding: int = 0  # of those, rows left empty while images of the call's group waited
    # for their home row, taken in that call (the price of home rows over packing in arrival order)
    adapter_loads: int = 0
    adapter_hotswaps: int = 0
    adapter_unloads: int = 0


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class _Job:
    request: ImageRequest
    on_event: Callable[[object], None]
    arrived: float
    seed: int | None = None  # the request's, or picked when it is queued
    mix: tuple[tuple[str, float], ...] = ()  # (version key, weight), sorted, zero weights left out
    versions: dict[str, AdapterVersion] = field(default_factory=dict)
    batch_key: Hashable = None
    started: float | None = None
    first_step: float | None = None
    done: bool = False
    results: dict[int, Any] = field(default_factory=dict)  # image index -> PIL image, as calls finish
    calls_done: int = 0  # pipeline calls that held images of this request
    calls_total: int = 1  # calls_done + the current call + the calls its queued images wait for

    @property
    def key(self) -> Hashable:
        return self.request.key


@dataclass(eq=False)
class _Image:
    """One image of a request: image `index` has seed `job.seed + index`."""

    job: _Job
    index: int
    seed: int


def _ms(since: float, now: float) -> float:
    return round((now - since) * 1000.0, 3)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def _decode_each_image(pipe: Any, rows: list[int], batch: int) -> Iterator[None]:
    """While active, the pipeline's VAE decodes the latents at `rows` (of its `batch`) one at a
    time and skips the rest (padding), so a decoded image never depends on its neighbours either.

    Only a call that looks like the pipeline's own (`batch` latents, `return_dict=False`, as every
    diffusers text-to-image pipeline calls it) is split; anything else goes through untouched.
    """
    vae = getattr(pipe, "vae", None)
    if vae is None or not callable(getattr(vae, "decode", None)):
        yield
        return
    decode = vae.decode

    def decode_each(z: Any, *args: Any, **kwargs: Any) -> Any:
        if not (torch.is_tensor(z) and z.shape[0] == batch and kwargs.get("return_dict") is False):
            return decode(z, *args, **kwargs)
        generators = kwargs.pop("generator", None)
        decoded = {}
        for i in rows:
            if isinstance(generators, list):
                kwargs["generator"] = generators[i]
            elif generators is not None:
                kwargs["generator"] = generators
            decoded[i] = decode(z[i : i + 1], *args, **kwargs)[0]
        first = decoded[rows[0]]
        padding = first.new_zeros((1, *first.shape[1:]))
        return (torch.cat([decoded.get(i, padding) for i in range(batch)]),)

    shadowed = vars(vae).get("decode")  # set on the instance by someone else (hooks), if at all
    vae.decode = decode_each
    try:
        yield
    finally:
        if shadowed is None:
            del vae.decode  # the class's method shows through again
        else:
            vae.decode = shadowed


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _resolve_dtype(dtype: str, device: str, placeholder: bool) -> str:
    if dtype == "auto":
        # Random placeholder weights overflow in half precision; real checkpoints are made for it.
        if placeholder or device == "cpu":
            return "float32"
        return "float16"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return dtype


# ---------------------------------------------------------------- the engine


class ImageEngine:
    """A diffusers text-to-image pipeline serving per-request LoRA mixes from one worker thread."""

    def __init__(
        self,
        model: str | Path,
        *,
        cache_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        # limits
        max_batch: int = 4,
        max_pixels: int = 1024 * 1024,
        max_steps: int = 100,
        max_count: int = 8,
        max_adapters: int = 8,
        max_adapter_rank: int = 256,
        # adapters resident in the pipeline at once (LRU beyond that)
        adapter_slots: int = 8,
    ) -> None:
        import importlib

        auto: Any = importlib.import_module("diffusers").AutoPipelineForText2Image
        if str(model) == "default":
            path = ensure_default_image_model(Path(cache_dir))
        else:
            path = Path(model).expanduser()
            if not (path / "model_index.json").is_file():
                raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        placeholder = is_placeholder_model(path)
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device, placeholder)
        importlib.import_module("diffusers").utils.logging.disable_progress_bar()  # not in the daemon's log
        pipe = auto.from_pretrained(path, dtype=_DTYPES[dtype], local_files_only=True)
        name = PLACEHOLDER_NAME if placeholder else path.name
        self._setup(
            pipe,
            name=name,
            placeholder=placeholder,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            max_pixels=max_pixels,
            max_steps=max_steps,
            max_count=max_count,
            max_adapters=max_adapters,
            max_adapter_rank=max_adapter_rank,
            adapter_slots=adapter_slots,
        )

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        name: str,
        placeholder: bool,
        device: str = "auto",
        **limits: int,
    ) -> ImageEngine:
        """Serve an already built pipeline (benchmarks build a real-size random UNet in memory)."""
        self = cls.__new__(cls)
        device = _resolve_device(device)
        dtype = next((k for k, v in _DTYPES.items() if v == pipe.unet.dtype), "float32")
        defaults: dict[str, int] = {
            "max_batch": 4,
            "max_pixels": 1024 * 1024,
            "max_steps": 100,
            "max_count": 8,
            "max_adapters": 8,
            "max_adapter_rank": 256,
            "adapter_slots": 8,
        }
        unknown = set(limits) - set(defaults)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        defaults.update(limits)
        self._setup(pipe, name=name, placeholder=placeholder, device=device, dtype=dtype, **defaults)
        return self

    def _setup(
        self,
        pipe: Any,
        *,
        name: str,
        placeholder: bool,
        device: str,
        dtype: str,
        max_batch: int,
        max_pixels: int,
        max_steps: int,
        max_count: int,
        max_adapters: int,
        max_adapter_rank: int,
        adapter_slots: int,
    ) -> None:
        if min(max_batch, max_pixels, max_steps, max_count, max_adapter_rank) < 1 or max_adapters < 0:
            raise ValueError("limits must be positive")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
        self._name = name
        self._placeholder = placeholder
        self._device = device
        self._dtype = dtype
        self._max_batch = max_batch
        self._max_pixels = max_pixels
        self._max_steps = max_steps
        self._max_count = max_count
        self._max_adapters = max_adapters
        self._max_adapter_rank = max_adapter_rank
        self._size_multiple = max(8, int(getattr(pipe, "vae_scale_factor", 8)))
        # Captured before any adapter is injected, so validation never walks a changing model.
        self._supports_lora = hasattr(pipe, "load_lora_weights")
        self._shape_index = build_shape_index(pipe) if self._supports_lora else {}
        unet = getattr(pipe, "unet", None)
        self._unet_config = getattr(unet, "config", None) if unet is not None else None
        self._slots = AdapterSlots(pipe, limit=adapter_slots)
        self._stats = ImageEngineStats()

        self._cond = threading.Condition()
        self._inbox: list[_Job] = []
        self._live: dict[Hashable, _Job] = {}  # submitted and not finished
        self._cancels: set[Hashable] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._queue: FairQueue[_Image] = FairQueue(max_batch)  # worker thread only
        if placeholder:
            log.warning("image model %s is a PLACEHOLDER with random weights: it draws noise", name)
        log.info("image model %s loaded on %s (%s)", name, device, dtype)

    # ------------------------------------------------------------ facts

    @property
    def info(self) -> dict[str, Any]:
        """What the handshake announces about this model."""
        return {
            "name": self._name,
            "device": self._device,
            "dtype": self._dtype,
            "placeholder": self._placeholder,
            "pipeline": type(self._pipe).__name__,
            "size_multiple": self._size_multiple,
            "max_pixels": self._max_pixels,
            "max_steps": self._max_steps,
            "max_batch": self._max_batch,
        }

    @property
    def stats(self) -> ImageEngineStats:
        with self._cond:
            snap = dataclasses.replace(self._stats)
        slot_stats = self._slots.stats
        snap.adapter_loads = slot_stats.loads
        snap.adapter_hotswaps = slot_stats.hotswaps
        snap.adapter_unloads = slot_stats.unloads
        return snap

    @property
    def resident_adapters(self) -> list[str]:
        """Version keys (`name@number`) loaded in the pipeline, least recently used first."""
        return self._slots.resident

    # ------------------------------------------------------------ adapters

    def validate_adapter(
        self, tensors: dict[str, torch.Tensor], files: dict[str, bytes] | None = None
    ) -> tuple[int, tuple[str, ...]]:
        """Check an image LoRA against this model: (rank, target module names) or ValueError.

        Safe to call from any thread; it reads only what was recorded when the model was loaded.
        `files` (other files of the adapter folder, by name) only sharpen the error message.
        """
        if not self._supports_lora:
            raise ValueError(f"the image model {self._name} ({type(self._pipe).__name__}) does not take LoRAs")
        try:
            if not tensors:
                raise ValueError("the adapter holds no tensors")
            parts = normalize_lora(type(self._pipe), tensors, unet_config=self._unet_config)
            return check_lora(parts, self._shape_index, max_rank=self._max_adapter_rank)
        except ValueError as exc:
            hint = ""
            if files and "adapter_config.json" in files:
                hint = " (the folder has an adapter_config.json: it looks like a text adapter in PEFT format)"
            raise ValueError(f"{exc}{hint}") from None

    # ------------------------------------------------------------ lifecycle

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
        """Stop the worker (idempotent): the running call is interrupted, waiting requests fail
        with `shutting_down`."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:
            self._fail_waiting()

    # ------------------------------------------------------------ requests

    def submit(self, request: ImageRequest, on_event: Callable[[object], None]) -> None:
        """Queue a request. Its events go to `on_event` on the worker thread; only a request
        refused here because the engine is stopped is answered on the caller's thread."""
        job = _Job(request=request, on_event=on_event, arrived=time.monotonic())
        with self._cond:
            if not self._stopping:
                if request.key in self._live:
                    refusal = ErrorCode.DUPLICATE_ID, f"a request with key {request.key!r} is already running"
                else:
                    self._live[request.key] = job
                    self._inbox.append(job)
                    self._cond.notify_all()
                    return
            else:
                refusal = ErrorCode.SHUTTING_DOWN, "the image engine is stopped"
        self._emit(job, ImageErrorEvent(request.key, refusal[0], refusal[1]))

    def cancel(self, key: Hashable) -> bool:
        """Ask for a request to stop between denoising steps; False if no such request is live."""
        with self._cond:
            if key not in self._live:
                return False
            self._cancels.add(key)
            self._cond.notify_all()
            return True

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
            self._queue = FairQueue(self._max_batch)
        for job in waiting:
            if not job.done:
                self._finish_error(job, ErrorCode.SHUTTING_DOWN, "the image engine stopped before this request ran")

    def _admit(self, job: _Job) -> None:
        """Queue a request's images, each for its home row (see `batching`)."""
        try:
            self._check(job)
        except _Refused as refused:
            self._finish_error(job, refused.code, refused.message)
            return
        count = job.request.count
        if job.seed is None:
            # A seed whose images' home rows are free (or least loaded) in their group's calls.
            job.seed = free_seed(self._queue.loads(job.batch_key), count)
        for i in range(count):
            seed = job.seed + i
            self._queue.push(job.batch_key, _Image(job, i, seed), home_row(seed, self._max_batch))

    def _check(self, job: _Job) -> None:
        """Validate a request and fill in its seed (if it has one), normalized mix and batch key."""
        r = job.request
        bad = ErrorCode.INVALID_PARAMETER
        if not isinstance(r.prompt, str):
            raise _Refused(bad, "prompt must be a string")
        if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
            raise _Refused(bad, "negative_prompt must be a string or absent")
        m = self._size_multiple
        for what, value in (("width", r.width), ("height", r.height)):
            if not isinstance(value, int) or value < m:
                raise _Refused(bad, f"{what} must be an integer of at least {m}, got {value!r}")
            if value % m:
                lower, upper = value - value % m, value - value % m + m
                raise _Refused(bad, f"{what} {value} is not a multiple of {m}; try {lower} or {upper}")
        if r.width * r.height > self._max_pixels:
            raise _Refused(
                bad,
                f"{r.width}x{r.height} is {r.width * r.height} pixels, more than this daemon's limit of "
                f"{self._max_pixels} (e.g. 1024x1024)",
            )
        if not isinstance(r.steps, int) or not 1 <= r.steps <= self._max_steps:
            raise _Refused(bad, f"steps must be between 1 and {self._max_steps}, got {r.steps!r}")
        if not isinstance(r.count, int) or not 1 <= r.count <= self._max_count:
            raise _Refused(bad, f"count must be between 1 and {self._max_count}, got {r.count!r}")
        if not isinstance(r.guidance, (int, float)) or not math.isfinite(r.guidance) or r.guidance < 0:
            raise _Refused(bad, f"guidance must be a finite number >= 0, got {r.guidance!r}")
        if r.seed is not None:
            if not isinstance(r.seed, int) or not 0 <= r.seed <= MAX_SEED:
                raise _Refused(bad, f"seed must be an integer between 0 and {MAX_SEED}, got {r.seed!r}")
            job.seed = r.seed

        weights: dict[str, float] = {}
        for item in r.adapters:
            version, weight = item
            if not isinstance(version, AdapterVersion):
                raise _Refused(bad, f"adapters must be (AdapterVersion, weight) pairs, got {type(version).__name__}")
            if version.kind != "image":
                raise _Refused(
                    ErrorCode.ADAPTER_UNAVAILABLE,
                    f"adapter '{version.name}' is a {version.kind} adapter and cannot be used for images",
                )
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise _Refused(bad, f"the weight of adapter '{version.name}' must be a finite number")
            if not self._supports_lora:
                raise _Refused(
                    ErrorCode.ADAPTER_UNAVAILABLE, f"the image model {self._name} does not take LoRA adapters"
                )
            job.versions[version.key] = version
            weights[version.key] = weights.get(version.key, 0.0) + float(weight)
        if len(job.versions) > self._max_adapters:
            raise _Refused(bad, f"{len(job.versions)} adapters in one request; the limit is {self._max_adapters}")
        # Weight 0 is left out of the mix, so it is the base model exactly and batches with it.
        job.mix = tuple(sorted((k, w) for k, w in weights.items() if w != 0.0))
        job.batch_key = (job.mix, r.width, r.height, r.steps, float(r.guidance), r.negative_prompt is None)

    def _reap_cancelled(self) -> None:
        with self._cond:
            if not self._cancels:
                return
            cancels = set(self._cancels)
        now = time.monotonic()
        for job in dict.fromkeys(image.job for image in self._queue.remove(lambda i: i.job.key in cancels)):
            if not job.done:
                self._finish_cancelled(job, now)

    def _run_call(self, group: Hashable, call: list[_Image | None]) -> None:
        """One pipeline call: each image at its home row (its index in `call`), None rows padded."""
        call = [image if image is not None and not image.job.done else None for image in call]
        placed = [image for image in call if image is not None]
        if not placed:
            return
        # Rows padded although images of this group wait: their home rows are taken in this call.
        waiting = any(self._queue.loads(group))
        jobs = list(dict.fromkeys(image.job for image in placed))
        lead = jobs[0]
        mix = [(lead.versions[k], w) for k, w in lead.mix]
        referenced = {k for image in self._queue for k, _ in image.job.mix}
        try:
            self._slots.ensure([v for v, _ in mix], referenced)
            self._slots.activate(mix)
        except Exception as exc:
            log.exception("could not load image adapters %s", [v.key for v, _ in mix])
            names = ", ".join(f"'{v.name}' (version {v.number})" for v, _ in mix)
            for job in jobs:
                self._finish_error(job, ErrorCode.ADAPTER_UNAVAILABLE, f"could not load adapter {names}: {exc}")
            return

        started = time.monotonic()
        for job in jobs:
            if job.started is None:
                job.started = started
            # Progress counts the steps of every call that holds images of the request: this one,
            # those before and those its queued images wait for.
            waits = self._queue.waits(lambda image, job=job: image.job is job)
            job.calls_total = job.calls_done + 1 + len(set(waits))
        try:
            out = self._call(lead.request, call, jobs, waiting)
        except Exception as exc:
            log.exception("image pipeline call failed")
            message = f"image generation failed: {type(exc).__name__}: {exc}"
            for job in jobs:
                if not job.done:
                    self._finish_error(job, ErrorCode.INTERNAL, message)
            return
        now = time.monotonic()
        for job in jobs:
            job.calls_done += 1
        for image, picture in zip(placed, out, strict=True):
            if not image.job.done:
                image.job.results[image.index] = picture
        for job in jobs:
            if not job.done and len(job.results) == job.request.count:
                self._finish(job, [_png(job.results[i]) for i in range(job.request.count)], "stop", now)

    def _call(self, r: ImageRequest, call: list[_Image | None], jobs: list[_Job], waiting: bool) -> list[Any]:
        """One pipeline call of exactly `max_batch` rows: the images of `call` at their rows, the
        None rows padded with throwaway ones (empty prompt, seed 0). Returns the pictures of
        `call`'s images, in row order."""
        rows = [row for row, image in enumerate(call) if image is not None]
        prompts = [image.job.request.prompt if image else "" for image in call]
        negatives = [(image.job.request.negative_prompt or "") if image else "" for image in call]
        # CPU generators give the same starting noise on every device.
        generators = [torch.Generator(device="cpu").manual_seed(image.seed if image else 0) for image in call]

        def on_step_end(pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            self._after_step(pipe, i, jobs)
            return callback_kwargs

        with torch.inference_mode(), _decode_each_image(self._pipe, rows, self._max_batch):
            out = self._pipe(
                prompt=prompts,
                negative_prompt=None if r.negative_prompt is None else negatives,
                width=r.width,
                height=r.height,
                num_inference_steps=r.steps,
                guidance_scale=float(r.guidance),
                generator=generators,
                output_type="pil",
                callback_on_step_end=on_step_end,
            )
        with self._cond:
            self._stats.pipeline_calls += 1
            self._stats.images += len(rows)
            self._stats.padding_images += self._max_batch - len(rows)
            if waiting:
                self._stats.collision_padding += self._max_batch - len(rows)
            self._stats.largest_batch = max(self._stats.largest_batch, len(rows))
        return [out.images[row] for row in rows]

    def _after_step(self, pipe: Any, i: int, jobs: list[_Job]) -> None:
        now = time.monotonic()
        with self._cond:
            cancels = set(self._cancels)
            stopping = self._stopping
        for job in jobs:
            if job.done:
                continue
            if stopping:
                self._finish_error(job, ErrorCode.SHUTTING_DOWN, "the image engine is stopping")
            elif job.key in cancels:
                self._finish_cancelled(job, now)
        live = [j for j in jobs if not j.done]
        if not live:
            # diffusers skips the remaining steps (then still decodes what it has).
            pipe._interrupt = True
        else:
            # A request that takes several calls counts the steps of all of them (`_run_call`).
            per_call = int(getattr(pipe, "_num_timesteps", 0) or len(pipe.scheduler.timesteps))
            for job in live:
                if job.first_step is None:
                    job.first_step = now
                step = job.calls_done * per_call + i + 1
                self._emit(job, ImageProgressEvent(job.key, step, max(step, job.calls_total * per_call)))
        # Cancelled requests still waiting are answered now, not after this call.
        self._reap_cancelled()

    # ------------------------------------------------------------ endings

    def _done_event(
        self, job: _Job, images: list[bytes], reason: Literal["stop", "cancelled"], now: float
    ) -> ImageDoneEvent:
        started = job.started if job.started is not None else now
        return ImageDoneEvent(
            key=job.key,
            images=images,
            seed=job.seed if job.seed is not None else 0,
            width=job.request.width,
            height=job.request.height,
            finish_reason=reason,
            adapter_versions={v.name: v.number for v, _ in job.request.adapters},
            timings=ImageTimings(
                queued_ms=_ms(job.arrived, started),
                first_step_ms=None if job.first_step is None else _ms(job.arrived, job.first_step),
                total_ms=_ms(job.arrived, now),
            ),
        )

    def _retire(self, job: _Job) -> None:
        job.done = True
        job.results.clear()
        self._queue.remove(lambda image: image.job is job)  # its images still waiting, if any
        with self._cond:
            if self._live.get(job.key) is job:
                del self._live[job.key]
            self._cancels.discard(job.key)

    def _finish(self, job: _Job, images: list[bytes], reason: Literal["stop", "cancelled"], now: float) -> None:
        self._retire(job)
        with self._cond:
            if reason == "cancelled":
                self._stats.requests_cancelled += 1
            else:
                self._stats.requests_done += 1
        self._emit(job, self._done_event(job, images, reason, now))

    def _finish_cancelled(self, job: _Job, now: float) -> None:
        self._finish(job, [], "cancelled", now)

    def _finish_error(self, job: _Job, code: ErrorCode, message: str) -> None:
        self._retire(job)
        with self._cond:
            self._stats.requests_failed += 1
        self._emit(job, ImageErrorEvent(job.key, code, message))

    def _emit(self, job: _Job, event: ImageEvent) -> None:
        try:
            job.on_event(event)
        except Exception:
            # A broken listener must not take the worker (and everyone else's images) down.
            log.exception("image event listener failed for request %r", job.key)
