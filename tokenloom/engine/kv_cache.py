"""Paged KV cache bookkeeping: a pool of fixed-size blocks with ref counts and a prefix-cache map.

A full block is identified by a hash chained from its parent's hash and its own tokens, so equal
prefixes map to equal hash chains. Freed blocks keep their hash (and contents) and wait in an LRU
free list: a later request with the same prefix takes them back before they are reused for others.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenloom.engine.request import Request


@dataclass(slots=True)
class Block:
    """One block of `block_size` token slots."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters of prefix-cache lookups, in tokens."""

    queries: int = 0
    hits: int = 0


class BlockPool:
    """All blocks, the free list in LRU order (oldest freed first) and the hash → block map."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (cached-but-free ones included)."""
        return len(self.free)

    def lookup(self, block_hash: int) -> Block | None:
        """The block holding the prefix with this hash, if any."""
        block_id = self.cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def take(self, n: int) -> list[Block]:
        """Take `n` free blocks, evicting the least recently freed cached contents first."""
        taken = []
        for _ in range(n):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, block: Block) -> None:
        """Add a reference to a block found in the prefix cache."""
        if block.ref_count == 0:
            del self.free[block.block_id]
        block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; unreferenced blocks return to the free list's tail.

        Blocks are released in reverse so a request's tail blocks are evicted before its prefix."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None

    def publish(self, block_id: int, block_hash: int) -> None:
        """Record that a now-full block holds the prefix with `block_hash`."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after weights change)."""
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The chained hash of a full block."""
    return hash((parent_hash, token_ids))


class KVCacheManager:
    """Gives requests the blocks their tokens need and finds cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        """Size of the pool."""
        return len(self.pool.blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend the request's chain of full-block hashes to cover its first `num_tokens` tokens."""
        bs = self.block_size
        while (len(request.block_hashes) + 1) * bs <= num_tokens:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else request.cache_salt
            tokens = tuple(request.token_slice(i * bs, (i + 1) * bs))
            request.block_hashes.append(hash_block(parent, tokens))

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """Blocks already holding the request's longest cached prefix.

        At least the last token is left to compute: its logits are needed to sample."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        self._update_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits  # counted in the stats by the scheduler, once, when the request is admitted

    def allocate(self, request: Request, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Give `request` blocks for `num_new_tokens` more tokens (after `cached` prefix blocks).

        Returns False, changing nothing, when the pool is too small."""
        num_computed = request.num_computed_tokens + len(cached) * self.block_size
        have = len(request.block_ids) + len(cached)
        need = -(-(num_computed + num_new_tokens) // self.block_size) - have
        evictable_hits = sum(1 for b in cached if b.ref_count == 0)
        if need > self.pool.num_free - evictable_hits:
            return False
        for block in cached:
            self.pool.touch(block)
        request.block_ids.extend(b.block_id for b in cached)
        request.block_ids.extend(b.block_id for b in self.pool.take(max(need, 0)))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= request.num_published_blocks:
            return
        self._update_hashes(request, request.num_computed_tokens)
        for i in range(request.num_published_blocks, num_full):
            self.pool.publish(request.block_ids[i], request.block_hashes[i])
        request.num_published_blocks = num_full

    def free(self, request: Request) -> None:
        """Return all the request's blocks."""
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_published_blocks = 0
