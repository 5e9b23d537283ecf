"""One pipeline call of exactly `max_batch` rows, each image at its home row (docs/IMAGES.md says why).

`pipeline_call` runs the diffusers pipeline on a call's prompts and seeds, padding empty rows with
throwaway ones (empty prompt, seed 0), and returns the pictures of the real rows; the VAE decodes
those one at a time (`decode_each_image`), so a decoded image never depends on its neighbours.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CallRow", "decode_each_image", "pipeline_call", "png"]


@dataclass(frozen=True)
class CallRow:
    """What one real row of a call draws, and for which request."""

    key: Hashable
    prompt: str
    negative_prompt: str | None
    seed: int


def pipeline_call(pipe: Any, rows: Sequence[CallRow | None], *, width: int, height: int, steps: int,
                  guidance: float, negative: bool, on_step: Callable[[Any, int], None]) -> list[Any]:
    """Run `pipe` at len(rows) images; the pictures of the rows that are not None, in row order.
    `on_step(pipe, i)` runs after denoising step i (it may set `pipe._interrupt`)."""
    real = [i for i, row in enumerate(rows) if row is not None]
    prompts = [row.prompt if row else "" for row in rows]
    negatives = [(row.negative_prompt or "") if row else "" for row in rows]
    # CPU generators give the same starting noise on every device.
    generators = [torch.Generator(device="cpu").manual_seed(row.seed if row else 0) for row in rows]

    def on_step_end(p: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(p, i)
        return callback_kwargs

    with torch.inference_mode(), decode_each_image(pipe, real, len(rows)):
        out = pipe(prompt=prompts, negative_prompt=negatives if negative else None, width=width, height=height,
                   num_inference_steps=steps, guidance_scale=float(guidance), generator=generators,
                   output_type="pil", callback_on_step_end=on_step_end)
    return [out.images[i] for i in real]


def png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def decode_each_image(pipe: Any, rows: list[int], batch: int) -> Iterator[None]:
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
