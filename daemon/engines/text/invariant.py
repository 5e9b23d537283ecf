"""Deterministic mode: a row's logits are the same bits whatever shares its batch.

A seeded request must give the same tokens alone, among 31 others, arriving first or last, after
a prefix-cache hit or a preemption. Counter-based noise (`sampler`) makes sampling independent of
the batch; this module makes the logits so. A kernel's result for one row can depend on the rest
of the batch in three ways, each closed here:

- **Which code path runs.** The BLAS takes other paths for small matrices (MKL: rows past a
  multiple of four come out otherwise while there are fewer than twelve), and the
  engine's own fast paths (the transposed CPU product of `lora.linear`, the LoRA layouts of
  `lora_plan`, flash attention for a lone prompt) are chosen by the batch's shape. Here a step has
  at least `MIN_ROWS` rows (the runner pads it), every projection is a plain `F.linear`, and the
  LoRA layout is always the dense one over the whole pool.
- **How long a reduction is.** A matmul's sum over K is grouped by the BLAS's panels, which depend
  on K itself: the same 300 terms padded with zeros to 304 or 320 columns give other bits (checked on
  MKL). So nothing here reduces over a length that other rows decide. Attention for a query at
  position p reads exactly the keys of blocks 0 .. p // block_size, whatever the chunk it came in or
  the longest sequence of the step: the scores and the weighted values are two matmuls of that
  fixed length (the softmax denominator rides along as a column of ones), the rest is elementwise.
  Decode and prompt rows take this same road, so the keys a resumed or a prefix-cached sequence
  reads are the bits it would have computed itself.
- **Where an adapter sits.** The same adapter can load into any slot, and a mix's members into
  either order. The expand runs once per mix member, in the order of (name, version, scale): each
  pass adds one member's update (the other pool rows are exact zeros in its weights), so the sum
  of a row is built in an order set by the request alone.

`probe` checks the BLAS properties this rests on (row results independent of the row count from
`MIN_ROWS` on) when the engine starts, and refuses the mode where they do not hold.

On a GPU, cuBLAS chooses its kernels (split-K among them) by the row count, so rows are not
independent of the count there. The mode then runs with **fixed row counts** (`fixed_rows`): a
decode step is padded to `max_seqs` rows, a step of prompt chunks to `max_step_tokens` rows, and a
step with both runs as those two forwards; the attention products of one KV block are padded to a
block's worth of queries and run one sequence at a time; the vocab head and the sampler see
`max_seqs` rows. What remains is that a matmul of a fixed shape gives a row the same bits whatever
the other rows hold, which `probe` checks on the device at start.

Attention on a GPU runs through the prompt-chunk Triton kernel (`triton_attention.paged_prefill`),
decode rows included, as chunks of one token. It is invariant by construction: one program per
(chunk, tile of queries, KV head), no split of the positions, and a query's online softmax walks
KV tiles of a fixed size from position 0 in the same order wherever the query sits. A tile the query
does not see (past its position, or before its window) changes none of its bits: its scores are -inf,
so the running max stays, the rescale is exactly 1 (or the sums stay exactly 0) and the products add
exact zeros. Without Triton (and in the CPU suite's `fixed_rows=True` runs) `attend_blocks` serves,
one sequence at a time. RMSNorm, RoPE (with the KV write) and SiLU-and-multiply take the Triton
kernels on a GPU too: a program per row or element, tiles fixed by the model's sizes; so does the
LoRA expand (`triton_lora`, its tiles chosen from the shapes alone, never by timing), once per mix
member over the whole pool. Decode steps replay CUDA graphs of `max_seqs` rows (`graphs`,
`fixed_rows`). What it still pays against the default engine: padded row counts, a pass per mix
member, and cuBLAS products of fixed shapes rather than batch-invariant kernels of our own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import triton_attention, triton_lora
from .kernels import TorchKernels, TritonKernels
from .lora import lora_expand_fused
from .lora_pool import GroupSlots
from .quant import QuantWeight, Weight

__all__ = ["MIN_ROWS", "InvariantKernels", "NotDeterministic", "attend_blocks", "probe"]

MIN_ROWS = 12  # a matmul of fewer rows may take other code paths in the BLAS (`probe` checks from here on)


class NotDeterministic(RuntimeError):
    """This machine or device cannot give batch-invariant results (the message says why)."""


def probe(device: torch.device, dtype: torch.dtype, *, fixed_rows: bool = False) -> None:
    """Raise NotDeterministic unless every row of the matmuls used here comes out the same with any
    row count from MIN_ROWS on (plain, with a bias, added into a wider output, batched). MKL, for
    one, gives rows past a multiple of four other bits when there are fewer than twelve. With
    `fixed_rows`, only that a fixed shape gives a row the same bits whatever the others hold."""
    if fixed_rows:
        return _probe_fixed_rows(device, dtype)
    if device.type != "cpu":
        raise NotDeterministic(
            f"matmuls whose rows do not depend on the row count are a CPU property; {device} chooses its "
            "kernels by the row count (deterministic mode runs there with fixed row counts: fixed_rows)")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    w, b, x = rand(384, 160), rand(384), rand(150, 160)
    k, v, q, u = rand(2, 96, 80), rand(2, 80, 33), rand(2, 150, 96), rand(96, 33)
    qs, ks, vs = rand(150, MIN_ROWS, 64), rand(150, 64, 48), rand(150, 48, 65)

    def accumulated(m: int) -> torch.Tensor:  # the LoRA expand: a product added into columns of a wider output
        y = F.linear(x[:m], w)
        y[:, 16:49].addmm_(x[:m, :96], u)
        return y

    checks = {
        "linear": lambda m: F.linear(x[:m], w),
        "linear with bias": lambda m: F.linear(x[:m], w, b),
        "accumulating matmul": accumulated,
        "batched matmul": lambda m: torch.matmul(torch.matmul(q[:, :m], k), v).transpose(0, 1),
        # the attention of several sequences at once: one product per (sequence, head), any count of them
        "batched matmul by batch count": lambda m: torch.matmul(torch.matmul(qs[:m], ks[:m]), vs[:m]),
    }
    for name, f in checks.items():
        full = f(150)
        for m in (*range(MIN_ROWS, 40), 64, 65, 149):
            if not torch.equal(f(m), full[:m]):
                raise NotDeterministic(
                    f"this machine's {name} gives rows other bits with {m} rows than with 150 "
                    f"({dtype}); deterministic mode cannot be promised here")


def _probe_fixed_rows(device: torch.device, dtype: torch.dtype) -> None:
    """Every product of a fixed shape gives its first rows the same bits when the other rows (or the
    other matrices of a batch) hold something else, and twice the same bits for the same input."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    w, b, u = rand(384, 160), rand(384), rand(96, 33)
    k, v = rand(2, 96, 80), rand(2, 80, 33)

    def accumulated(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w)
        y[:, 16:49].addmm_(x[:, :96], u)
        return y

    checks = {"linear": lambda x: F.linear(x, w), "linear with bias": lambda x: F.linear(x, w, b),
              "accumulating matmul": accumulated,
              "batched matmul": lambda x: torch.matmul(torch.matmul(torch.stack([x[:, :96], x[:, 64:]]), k), v)}
    for rows in (16, 48, 150):
        x = rand(rows, 160)
        other = x.clone()
        other[rows // 2:] = rand(rows - rows // 2, 160)
        for name, f in checks.items():
            a, again, c = f(x), f(x), f(other)
            half = rows // 2
            if not torch.equal(a, again) or not torch.equal(a[..., :half, :], c[..., :half, :]):
                raise NotDeterministic(
                    f"this device's {name} of {rows} rows gives a row other bits when the other rows change, "
                    f"or from one run to the next ({dtype}); deterministic mode cannot be promised here")


def attend_blocks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  window: int | None, rows_to: int | None = None) -> torch.Tensor:
    """Causal attention, for each of S sequences, of its queries q [S, n, heads, dim] at `positions`
    [S, n] (all in one KV block, the same block in every sequence) over keys/values [S, L, kv_heads,
    dim] of positions 0..L-1, L the end of that block. -> [S, n, heads, dim]

    Every reduction has length L or dim, fixed by the block, and each (sequence, kv head) is a
    matrix product of its own shape in the batch: the same bits for a query whatever else is
    computed beside it (`probe` checks that a batched product does not depend on the batch count).
    `rows_to`: pad each (sequence, kv head) product to that many query rows (fixed-rows layout)."""
    seqs, n, heads, dim = q.shape
    length, kv_heads = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    rows = n * group
    padded = max(rows, MIN_ROWS) if rows_to is None else rows_to  # a fixed count where row counts matter
    qh = q.new_zeros(seqs, kv_heads, padded, dim)
    qh[:, :, :rows] = q.view(seqs, n, kv_heads, group, dim).permute(0, 2, 1, 3, 4).reshape(seqs, kv_heads, rows, dim)
    k = keys.permute(0, 2, 3, 1).reshape(seqs * kv_heads, dim, length)
    scores = torch.matmul(qh.view(seqs * kv_heads, padded, dim), k).mul_(dim ** -0.5)
    scores = scores.view(seqs, kv_heads, padded, length)
    key_pos = torch.arange(length, device=q.device)
    qpos = positions.repeat_interleave(group, dim=1)  # [S, rows]: row r of a head group is query r // group
    allowed = key_pos <= qpos[..., None]
    if window is not None:
        allowed &= key_pos > qpos[..., None] - window
    if padded > rows:  # padding rows see key 0 (a row with no key at all gives NaN)
        allowed = torch.cat([allowed, (key_pos == 0).expand(seqs, padded - rows, length)], dim=1)
    scores.masked_fill_(~allowed[:, None], float("-inf"))
    probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    v = torch.cat([values.permute(0, 2, 1, 3), values.new_ones(seqs, kv_heads, length, 1)], dim=-1)  # + denominator
    out = torch.matmul(probs.view(seqs * kv_heads, padded, length), v.reshape(seqs * kv_heads, length, dim + 1))
    out = out.view(seqs, kv_heads, padded, dim + 1)[:, :, :rows]
    out = out[..., :dim] / out[..., dim:]
    return out.reshape(seqs, kv_heads, n, group, dim).permute(0, 2, 1, 3, 4).reshape(seqs, n, heads, dim)


def _gather(pool: torch.Tensor, tables: list[list[int]], blocks: int, block_size: int) -> torch.Tensor:
    """[S, blocks * block_size, kv_heads, dim]: positions 0.. of each sequence from its block table."""
    ids = torch.tensor([t[:blocks] for t in tables], dtype=torch.long, device=pool.device)
    index = (ids[:, :, None] * block_size + torch.arange(block_size, device=pool.device)).flatten(1)
    return pool[index]


class InvariantKernels(TorchKernels):
    """The kernel set of deterministic mode: PyTorch ops laid out so that no row's result depends
    on the batch (see the module docstring)."""

    name = "invariant"
    reads_pages = True

    def __init__(self, device: torch.device, dtype: torch.dtype, *, fixed_rows: bool | None = None) -> None:
        self.fixed_rows = device.type == "cuda" if fixed_rows is None else fixed_rows
        probe(device, dtype, fixed_rows=self.fixed_rows)
        super().__init__(device)
        # On a GPU, attention through the prompt-chunk kernel, for decode rows too (`paged_decode`), and
        # RMSNorm, RoPE with the KV write and SiLU-and-multiply through the Triton kernels: one program
        # per row (or element) with fixed tiles, so a row's bits do not depend on the others.
        self._attention = triton_attention if self.fixed_rows and triton_attention.available(device) else None
        self._rows = TritonKernels(device) if self._attention is not None and device.type == "cuda" else None
        self._meta: tuple[torch.Tensor, torch.Tensor] | None = None  # this forward's (lens, `_decode_meta`)

    def prefers_prefix(self, tokens: int) -> bool:
        return True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return super().rms_norm(x, weight, eps) if self._rows is None else self._rows.rms_norm(x, weight, eps)

    def silu_mul(self, gu: torch.Tensor, n: int) -> torch.Tensor:
        return super().silu_mul(gu, n) if self._rows is None else self._rows.silu_mul(gu, n)

    def rope_write(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int, kv: Any, layer: int, slots: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._rows is None:
            return super().rope_write(qkv, cos, sin, heads, kv_heads, head_dim, kv, layer, slots)
        return self._rows.rope_write(qkv, cos, sin, heads, kv_heads, head_dim, kv, layer, slots)

    def rope_qk(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            return super().rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)
        return self._rows.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)

    def linear(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, QuantWeight):
            return weight.linear(x, bias)
        return F.linear(x, weight, bias)

    def paged_decode(self, q: torch.Tensor, kv: Any, layer: int, tables: torch.Tensor, lens: torch.Tensor,
                     window: int | None) -> torch.Tensor | None:
        if self._attention is not None:  # each decode row as a prompt chunk of one token (see paged_prefill)
            meta = self._decode_meta(lens)
            out = torch.empty_like(q)
            if self._attention.paged_prefill(q, kv.k[layer], kv.v[layer], tables, meta, out, window, kv.block_size,
                                             1):
                return out
        bs = kv.block_size
        out = torch.zeros_like(q)
        by_blocks: dict[int, list[int]] = {}  # sequences whose query is in the same block: one batch
        positions = [length - 1 for length in lens.tolist()]
        table_rows = tables.tolist()
        rows_to = bs * (q.shape[1] // kv.k[layer].shape[1]) if self.fixed_rows else None
        for i, pos in enumerate(positions):
            if self.fixed_rows and table_rows[i][0] == 0:  # a padding row (block 0 is the padding block)
                continue
            # One sequence at a time with fixed rows: a batch of products may run otherwise by its count.
            by_blocks.setdefault(i if self.fixed_rows else pos // bs + 1, []).append(i)
        for members in by_blocks.values():
            rows = [table_rows[i] for i in members]
            blocks = positions[members[0]] // bs + 1
            keys, values = (_gather(pool, rows, blocks, bs) for pool in (kv.k[layer], kv.v[layer]))
            index = torch.tensor(members, device=q.device)
            pos = torch.tensor([[positions[i]] for i in members], device=q.device)
            out[index] = attend_blocks(q[index][:, None], keys, values, pos, window, rows_to)[:, 0]
        return out

    def begin_forward(self) -> None:
        self._meta = None

    def _decode_meta(self, lens: torch.Tensor) -> torch.Tensor:
        """[rows, 3] (start, length 1, position) of each decode row as a one-token chunk: built once a
        forward pass, not once a layer (four small launches each; 64 of them a step on a 16-layer
        model). A recorded graph has it built in its first layer and rebuilds it on every replay."""
        if self._meta is None or self._meta[0] is not lens:
            rows = torch.arange(lens.shape[0], device=lens.device)
            self._meta = (lens, torch.stack([rows, torch.ones_like(lens), lens - 1], dim=1))
        return self._meta[1]

    def paged_prefill(self, q: torch.Tensor, kv: Any, layer: int, tables: torch.Tensor, meta: torch.Tensor,
                      out: torch.Tensor, window: int | None, longest: int) -> bool:
        if self._attention is not None and self._attention.paged_prefill(
                q, kv.k[layer], kv.v[layer], tables, meta, out, window, kv.block_size, longest):
            return True
        bs = kv.block_size
        table_rows = tables.tolist()
        for c, (start, length, pos0) in enumerate(meta.tolist()):
            p = pos0
            while p < pos0 + length:  # the chunk's queries, one KV block of positions at a time
                block = p // bs
                end = min((block + 1) * bs, pos0 + length)
                keys, values = (_gather(pool, [table_rows[c]], block + 1, bs) for pool in (kv.k[layer], kv.v[layer]))
                rows = slice(start + p - pos0, start + end - pos0)
                positions = torch.arange(p, end, device=q.device)[None]
                rows_to = bs * (q.shape[1] // kv.k[layer].shape[1]) if self.fixed_rows else None
                out[rows] = attend_blocks(q[rows][None], keys, values, positions, window, rows_to)[0]
                p = end
        return True

    def project_prefix(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, group: GroupSlots,
                       weights: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """`weights` [members, T, pool rows]: one expand per mix member, in the request's order."""
        if weights.dim() == 2:
            weights = weights[None]
        width, n = weights.shape[2], len(group.members)
        if group.a_start == 0:  # a quantized base: its own matmul, then the shrink of the A rows
            assert isinstance(weight, QuantWeight)
            y = torch.cat([weight.linear(x, bias), F.linear(x, group.fused[:width * n])], dim=1)
        else:
            end = group.base_out + width * n
            y = F.linear(x, group.fused[:end], None if group.fused_bias is None else group.fused_bias[:end])
        # The residual rides with the first member's pass: the passes after it add exact zeros to a row
        # with fewer members, so its sum is the same whatever the step's member count.
        for j, member in enumerate(weights):
            extra = residual if j == 0 else None
            if not self._expand_kernel(y, group, member, extra):
                lora_expand_fused(y, group, member, residual=extra)
        return y[:, :group.base_out]

    def _expand_kernel(self, y: torch.Tensor, group: GroupSlots, weights: torch.Tensor,
                       residual: torch.Tensor | None) -> bool:
        """One member's expand through the Triton kernel on a GPU; False: PyTorch ops do it (no GPU, a
        shape the kernel does not take, or a kernel that failed once, as the default set does)."""
        if self._rows is None or self.failures:
            return False
        try:
            return triton_lora.expand_fused(y, group, weights, residual=residual)
        except Exception as exc:
            self._fail("the LoRA expand", exc)
            return False
