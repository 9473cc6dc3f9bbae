"""KV-cache blocks: allocation, reference counts, and the prefix cache (mechanism, no policy).

A block holds `block_size` consecutive tokens of one sequence. A full block whose tokens
have been computed is registered under the hash of (its parent block's hash, its tokens), so
a later sequence with the same prefix reuses it. Blocks nobody references stay in the cache
and are evicted least-recently-freed first when fresh blocks are needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def block_hashes(token_ids: list[int], block_size: int, num_blocks: int,
                 start: int = 0, parent: int | None = None) -> list[int]:
    """Chained content hashes of full blocks start..num_blocks-1."""
    out = []
    for b in range(start, num_blocks):
        parent = hash((parent, tuple(token_ids[b * block_size:(b + 1) * block_size])))
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block
        # Unreferenced blocks, least recently freed first; hashed ones are still reusable.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = PrefixStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Cached blocks for the longest computed prefix (at least one token is left to compute,
        so that the sequence still gets logits); returns (blocks, their hashes). Takes a
        reference on each block returned."""
        if not self.enable_prefix_caching:
            return [], []
        full = (len(token_ids) - 1) // self.block_size
        self.stats.queried_tokens += len(token_ids)
        blocks, hashes = [], []
        for h in block_hashes(token_ids, self.block_size, full):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
        for block in blocks:
            self._ref(block)
        self.stats.hit_tokens += len(blocks) * self.block_size
        return blocks, hashes

    def can_allocate(self, num_new_blocks: int) -> bool:
        return num_new_blocks <= len(self.free)

    def allocate(self, num_new_blocks: int) -> list[int]:
        """Fresh blocks (evicting least recently freed cached ones); all or nothing."""
        if num_new_blocks > len(self.free):
            raise RuntimeError(f"asked for {num_new_blocks} blocks, {len(self.free)} free")
        out = []
        for _ in range(num_new_blocks):
            block, _ = self.free.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:  # evict its cached content
                if self.cached.get(h) == block:
                    del self.cached[h]
                self.block_hash[block] = None
            self.ref_count[block] = 1
            out.append(block)
        return out

    def register(self, block: int, block_hash: int) -> None:
        """Marks a full, computed block as holding the content `block_hash` names."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        self.block_hash[block] = block_hash
        self.cached.setdefault(block_hash, block)

    def release(self, blocks: list[int]) -> None:
        # Free from the end of the sequence first: its tail is the least likely to be shared,
        # so it should be evicted first.
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.ref_count[block] == 0:
                self.free[block] = None

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.cached.items()):
            if self.ref_count[block] == 0:
                del self.cached[h]
                self.block_hash[block] = None
