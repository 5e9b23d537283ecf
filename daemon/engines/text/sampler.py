"""Per-row sampling for a whole batch at once: greedy, temperature, top-k, top-p, repetition penalty.

Randomness is counter-based: the noise for (seed, step, token id) is a hash, not a generator's
state, so it does not depend on the batch and rows need no Python loop. What that buys: given
the same logits, a seeded row draws the same token whatever shares its batch. The logits are
another matter. By default the kernels' reduction order depends on the batch's shape, so a row's
logits move in the last bits with its companions (on the CPU as on a GPU), and a sampled or
greedy continuation can part ways after some tokens. In deterministic mode (`invariant.py`,
the `deterministic` setting) the logits are the same bits whatever shares the batch, so a seeded
request's tokens are too: tested on the CPU in both of its layouts, and on an H200 (fixed row
counts, with this sampler over a fixed row count too): alone vs among 1, 7 and 31 companions at
every arrival, mixes, slot placement, prefix-cache hits and preemption.
"""

from __future__ import annotations

import torch

from .request import SamplingParams
from .transfer import bools, floats, longs

__all__ = ["SamplingParams", "choose", "sample"]

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3's finaliser; values stay in [0, 2^32) inside int64, so products never lose low bits.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) noise [B, vocab] from per-row 64-bit seeds and step counters."""
    device = seeds.device
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    row = _fmix32(lo ^ _fmix32(hi ^ ((counters * 0x9E3779B9) & _M32)))
    ids = torch.arange(vocab, device=device, dtype=torch.int64)
    h = _fmix32(row[:, None] ^ ((ids[None, :] * 0x27D4EB2F) & _M32))
    h = _fmix32(h ^ ((row[:, None] * 0x165667B1) & _M32))
    return (h.to(torch.float64) + 0.5).div(2**32).to(torch.float32)


def sample(logits: torch.Tensor, params: list[SamplingParams], counters: list[int],
           histories: list[list[int]]) -> list[int]:
    """Choose one token per row of float32 `logits` [B, V]. The copy to the host is the step's one
    wait for the device."""
    return choose(logits, params, counters, histories).tolist()


def choose(logits: torch.Tensor, params: list[SamplingParams], counters: list[int],
           histories: list[list[int]], late: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
    """`sample`'s tokens [B] (int64), left on the logits' device: nothing here waits for it.
    `late` (rows, their tokens on the device): the last entry of those rows' histories is a
    placeholder for a token the host does not have yet."""
    b, vocab = logits.shape
    device = logits.device
    if any(p.repetition_penalty != 1.0 for p in params):
        width = max(1, max(len(h) for h in histories))
        hist = torch.full((b, width), vocab, dtype=torch.long)
        for i, h in enumerate(histories):
            if params[i].repetition_penalty != 1.0 and h:
                hist[i, : len(h)] = torch.tensor(h[-width:], dtype=torch.long)
        hist = hist.to(device, non_blocking=True)
        if late is not None:  # into the flat view: index_copy_ queues without a wait
            rows, tokens = late
            hist.view(-1).index_copy_(0, longs([r * width + len(histories[r]) - 1 for r in rows], device), tokens)
        penalty = floats([p.repetition_penalty for p in params], device)[:, None]
        padded = torch.cat([logits, torch.zeros(b, 1, device=device)], dim=1)
        seen = padded.gather(1, hist)
        padded.scatter_(1, hist, torch.where(seen > 0, seen / penalty, seen * penalty))
        logits = padded[:, :vocab]
    greedy = [p.temperature == 0.0 for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    temps = floats([p.temperature if p.temperature > 0 else 1.0 for p in params], device)
    scaled = logits / temps[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        k = longs([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device)[:, None]
        drop = ranks >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        top_p = floats([p.top_p for p in params], device)[:, None]
        drop |= before >= top_p
        drop[:, 0] = False
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(scaled, float("-inf")).scatter(1, order, kept)
    else:
        filtered = scaled
    seeds = longs([p.seed & (2**63 - 1) for p in params], device)
    steps = longs(counters, device)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, vocab)))
    choice = (filtered + gumbel).argmax(dim=-1)
    if any(greedy):
        choice = torch.where(bools(greedy, device), logits.argmax(dim=-1), choice)
    return choice
