"""Paged KV cache bookkeeping: a pool of fixed-size blocks with ref counts and a prefix-cache map.

A full block is identified by a hash chained from its parent's hash and its own tokens, so equal
prefixes map to equal hash chains. Freed blocks keep their hash (and contents) and wait in an LRU
free list: a later request with the same prefix takes them back before they are reused for others.

A request's last, partly filled block is kept the same way when the request ends, under a key of its
parent's hash and the tokens it holds. A later request that continues exactly that sequence (a beam's
child, a conversation's next turn sent whole) gets a fresh block and a copy of those slots instead of
recomputing them: copy-on-write, since the partial block itself is never shared.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenloom import faults
from tokenloom.engine.request import Request


@dataclass(slots=True)
class Block:
    """One block of `block_size` token slots."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    partial_key: int | None = None  # a freed, partly filled last block's key (see partial_key)


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
        self.partial: dict[int, int] = {}  # partial key -> block id (free blocks only)

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
            if block.partial_key is not None:
                self.partial.pop(block.partial_key, None)
                block.partial_key = None
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

    def publish_partial(self, block_id: int, key: int) -> None:
        """Record that a freed, partly filled block holds the slots keyed `key` (until it is taken)."""
        block = self.blocks[block_id]
        if block.ref_count == 0 and block.partial_key is None and key not in self.partial:
            block.partial_key = key
            self.partial[key] = block_id

    def lookup_partial(self, key: int) -> int | None:
        """The free block holding the partial slots keyed `key`, if any."""
        return self.partial.get(key)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after weights change)."""
        for block in self.blocks:
            block.block_hash = block.partial_key = None
        self.cached.clear()
        self.partial.clear()


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The chained hash of a full block."""
    return hash((parent_hash, token_ids))


def partial_key(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The key of a partly filled block: its parent's chained hash and the tokens in its filled slots."""
    return hash(("partial", parent_hash, token_ids))


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
        return 1.0 - self.pool.num_free / self.num_blocks if self.num_blocks else 0.0

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

    def find_cached_partial(self, request: Request, num_full_hits: int) -> tuple[int, int] | None:
        """(block id, slots) of a freed partial block holding the request's tokens right after its
        `num_full_hits` cached full blocks, up to (not including) its last token; None if there is none."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return None
        bs, last = self.block_size, request.num_tokens - 1
        if num_full_hits != last // bs or last % bs == 0:
            return None
        block_id = self.pool.lookup_partial(self._partial_key_of(request, last))
        return None if block_id is None else (block_id, last % bs)

    def allocate(self, request: Request, num_new_tokens: int, cached: list[Block] = (),
                 num_copied: int = 0) -> bool:
        """Give `request` blocks for `num_new_tokens` more tokens (after `cached` prefix blocks and
        `num_copied` slots the caller copies into its first new block).

        Returns False, changing nothing, when the pool is too small."""
        faults.hit("kv_allocate", (request.prompt_token_ids,))
        num_computed = request.num_computed_tokens + len(cached) * self.block_size + num_copied
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
        """Return all the request's blocks; its partly filled last block stays findable until reused."""
        partial = self._partial_of(request)
        self.pool.release(request.block_ids)
        if partial is not None:
            self.pool.publish_partial(*partial)
        request.block_ids = []
        request.num_published_blocks = 0

    def _partial_of(self, request: Request) -> tuple[int, int] | None:
        """(block id, key) of the request's computed but partly filled last block, if caching is on."""
        bs, computed = self.block_size, request.num_computed_tokens
        i = computed // bs
        if not self.enable_prefix_caching or computed % bs == 0 or i >= len(request.block_ids):
            return None
        return request.block_ids[i], self._partial_key_of(request, computed)

    def _partial_key_of(self, request: Request, end: int) -> int:
        """The partial key of the request's block holding token `end - 1`, filled up to `end`."""
        i = end // self.block_size
        self._update_hashes(request, i * self.block_size)
        parent = request.block_hashes[i - 1] if i else request.cache_salt
        return partial_key(parent, tuple(request.token_slice(i * self.block_size, end)))
