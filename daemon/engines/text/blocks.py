"""The KV pool's bookkeeping: which block holds what, who uses it, and the prefix cache over it.

Pure Python, no tensors. The pool (`kv.PagedKV`) is `num_blocks` blocks of `block_size` token
positions; a sequence owns a list of blocks (its block table) covering its positions in order.
Block 0 is never handed out: padding and unused table entries point at it.

A block whose positions all hold keys and values is *full*, and full blocks are immutable. A
full block can be *published* under a key that chains its tokens with everything before it and
with the exact adapter versions and scales of the sequence (`block_key`): a later sequence whose
first blocks have the same keys shares those blocks instead of computing them again. Blocks
nobody uses stay cached, and the least recently used of them is reused first when the pool runs
out. A new version of an adapter has another key, so it never meets its old version's blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BlockPool", "PoolStats", "block_key", "mix_key"]

NULL_BLOCK = 0


def mix_key(adapters: Sequence[tuple[str, float]]) -> bytes:
    """What the keys and values of a sequence depend on besides its tokens: its adapter versions
    (`name@number`) and scales, in any order; b"" for the base model (scale 0 counts as absent)."""
    parts = sorted((key, scale) for key, scale in adapters if scale != 0.0)
    return ";".join(f"{key}={scale!r}" for key, scale in parts).encode()


def block_key(parent: bytes, mix: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens, the key of the block before it (b"" for the first) and the mix."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(struct.pack("<I", len(mix)))
    h.update(mix)
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return h.digest()


@dataclass
class PoolStats:
    lookups: int = 0  # prompt tokens looked up in the prefix cache
    hits: int = 0  # of those, found
    evictions: int = 0  # cached blocks reused for other content


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # popped from the end: low blocks first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unused; least recently used first
        self.stats = PoolStats()

    # -- queries --------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unused)."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        return self.num_blocks - 1 - self.available

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- handing out and taking back -----------------------------------------------------------

    def allocate(self) -> int | None:
        """A block for new content, or None when every block is in use."""
        if self._free:
            block = self._free.pop()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.stats.evictions += 1
        else:
            return None
        self._refs[block] = 1
        return block

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of `keys`, each now used once more."""
        found: list[int] = []
        if self.prefix_cache:
            for key in keys:
                block = self._block_of.get(key)
                if block is None:
                    break
                found.append(block)
        for block in found:
            if self._refs[block] == 0:
                self._idle.pop(block, None)
            self._refs[block] += 1
        self.stats.lookups += len(keys) * self.block_size
        self.stats.hits += len(found) * self.block_size
        return found

    def publish(self, block: int, key: bytes) -> None:
        """`block` is full and holds the content `key` names: later sequences may share it."""
        if not self.prefix_cache or block in self._key_of or key in self._block_of:
            return  # already cached (this block, or the same content in another block)
        self._key_of[block] = key
        self._block_of[key] = block

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence stops using `blocks`; cached ones stay (least recently used first out)."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]
