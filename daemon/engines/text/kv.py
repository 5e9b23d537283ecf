"""The paged KV cache: keys and values of every layer in one pool of fixed-size blocks, and the
attention that reads them through each sequence's block table.

Layout: per layer, `k[slot, kv_head, :]` and `v[...]` for `slot = block * block_size + offset`; a
sequence's position p lives at slot `table[p // block_size] * block_size + p % block_size`.
Memory is the pool's (`kv_cache_mb`), shared by every sequence and by the prefix cache
(`blocks.BlockPool`); `max_context` only bounds one sequence's table.

`decode_attention` and `prefill_attention` are the PyTorch paths (gather the positions a step
reads, then scaled-dot-product attention); on CUDA the kernel set's `paged_decode` reads the pool
directly (`triton_attention.py`), and the PyTorch path is its reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelSpec

__all__ = ["PagedKV", "PrefillChunk", "PrefillPack", "decode_attention", "gather_index", "prefill_attention"]


class PagedKV:
    def __init__(self, spec: ModelSpec, *, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = k
        self.v[layer][slots] = v


def gather_index(tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[N, length] slots of positions 0..length-1 of each table [N, W] (past a table's end: block 0)."""
    pos = torch.arange(length, device=tables.device)
    return tables[:, pos // block_size] * block_size + pos % block_size


def _gathered(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[N, kv_heads, L, D] from the pool at index [N, L]."""
    return pool[index].transpose(1, 2)


def decode_attention(q: torch.Tensor, kv: PagedKV, layer: int, index: torch.Tensor, lens: torch.Tensor,
                     window: int | None) -> torch.Tensor:
    """One query per sequence: q [D, heads, dim] against positions 0..lens-1 (the index [D, L] of
    `gather_index`); the last `window` only where the layer has a sliding window. -> [D, heads, dim]"""
    keys, values = _gathered(kv.k[layer], index), _gathered(kv.v[layer], index)
    key_pos = torch.arange(index.shape[1], device=q.device)[None, :]
    mask = key_pos < lens[:, None]
    if window is not None:
        mask &= key_pos >= lens[:, None] - window
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out.squeeze(2)


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, end) of the step's flat batch are positions pos0.. of the sequence whose block
    table is row `table` of the step's prefill tables."""

    start: int
    end: int
    pos0: int
    table: int


@dataclass(frozen=True)
class PrefillPack:
    """A step's prompt chunks padded into a [C, L] block, so attention is one call per layer."""

    q_index: torch.Tensor  # [C, L] flat token of each chunk position (padding repeats the chunk's first)
    keys: torch.Tensor  # [C, K] slots of each chunk's positions 0..K-1 (K = the longest chunk end)
    mask: torch.Tensor  # [C, 1, L, K]: causal from each chunk's first position; padding sees key 0
    tokens: torch.Tensor  # [N] flat tokens of all chunks, in chunk order
    valid: torch.Tensor  # [N] their places in the flattened [C*L] block

    @staticmethod
    def build(chunks: list[PrefillChunk], tables: torch.Tensor, block_size: int, window: int | None) -> PrefillPack:
        device = tables.device
        lens = torch.tensor([c.end - c.start for c in chunks])
        width = int(lens.max())
        pos = torch.arange(width)
        starts = torch.tensor([c.start for c in chunks])
        pos0 = torch.tensor([c.pos0 for c in chunks])
        real = pos[None, :] < lens[:, None]  # [C, L]
        q_index = torch.where(real, starts[:, None] + pos[None, :], starts[:, None])
        keys = int((pos0 + lens).max())
        qpos = pos0[:, None] + pos[None, :]  # absolute position of each query
        key_pos = torch.arange(keys)[None, None, :]
        mask = key_pos <= qpos[:, :, None]
        if window is not None:  # a sliding window: only the last `window` keys
            mask &= key_pos > qpos[:, :, None] - window
        mask &= real[:, :, None]
        mask[:, :, 0] |= ~real  # padding queries see key 0 (a row with no key at all gives NaN)
        valid = real.flatten().nonzero().squeeze(1)
        index = gather_index(tables[[c.table for c in chunks]], keys, block_size)
        return PrefillPack(q_index.to(device), index, mask[:, None].to(device), q_index.flatten()[valid].to(device),
                           valid.to(device))


def prefill_attention(q: torch.Tensor, kv: PagedKV, layer: int, pack: PrefillPack) -> torch.Tensor:
    """Every prompt chunk's queries (rows of q [T, heads, dim]) against its sequence's positions up
    to each query (the cached prefix included). -> [N, heads, dim] for `pack.tokens`, in order."""
    qc = q[pack.q_index].transpose(1, 2)  # [C, heads, L, dim]
    keys, values = _gathered(kv.k[layer], pack.keys), _gathered(kv.v[layer], pack.keys)
    out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=pack.mask, enable_gqa=keys.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[pack.valid]
