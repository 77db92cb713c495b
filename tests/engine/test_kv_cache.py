"""Block pool and KV cache manager: allocation, ref counts, prefix hits, LRU eviction."""

from tokenloom.engine.kv_cache import KVCacheManager
from tokenloom.engine.request import Request
from tokenloom.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params))


def compute_all(kv: KVCacheManager, r: Request) -> None:
    """Pretend the model ran over every token of r."""
    assert kv.allocate(r, r.num_tokens - r.num_computed_tokens)
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = make_request("a", list(range(9)))
    assert kv.allocate(r, 9)
    assert len(r.block_ids) == 3 and kv.pool.num_free == 7
    r.num_computed_tokens = 9
    assert kv.allocate(r, 3)  # fills block 3's last slots, then needs a 4th block
    assert len(r.block_ids) == 3
    assert kv.allocate(r, 4)
    assert len(r.block_ids) == 4
    kv.free(r)
    assert kv.pool.num_free == 10 and r.block_ids == []


def test_allocate_fails_without_side_effects_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make_request("a", list(range(12)))
    assert not kv.allocate(r, 12)
    assert r.block_ids == [] and kv.pool.num_free == 2


def test_shared_prefix_hits_and_ref_counts():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(10)))
    compute_all(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits = kv.find_cached_prefix(b)
    assert [h.block_id for h in hits] == a.block_ids[:2]
    assert kv.allocate(b, b.num_tokens - 8, hits)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert kv.pool.blocks[a.block_ids[0]].ref_count == 2
    kv.free(a)
    assert kv.pool.blocks[b.block_ids[0]].ref_count == 1


def test_full_prompt_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(8)))
    compute_all(kv, a)
    b = make_request("b", list(range(8)))
    assert len(kv.find_cached_prefix(b)) == 1  # 7 tokens may be reused: one block


def test_freed_cached_blocks_are_reused_by_prefix_then_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(9)))
    compute_all(kv, a)
    kv.free(a)
    assert kv.pool.num_free == 4 and len(kv.pool.cached) == 2
    b = make_request("b", list(range(9)))
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2 and kv.allocate(b, 1, hits)
    kv.free(b)
    c = make_request("c", [50 + i for i in range(16)])  # needs all four blocks: evicts the cached ones
    assert kv.allocate(c, 16)
    assert kv.pool.cached == {}
    assert kv.find_cached_prefix(make_request("d", list(range(9)))) == []


def test_prefix_hash_depends_on_whole_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute_all(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first
    assert kv.find_cached_prefix(other) == []


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute_all(kv, make_request("a", list(range(10))))
    assert kv.find_cached_prefix(make_request("b", list(range(10)), prompt_logprobs=1)) == []


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    compute_all(kv, make_request("a", list(range(10))))
    assert kv.find_cached_prefix(make_request("b", list(range(10)))) == []


def test_a_freed_partial_block_is_copied_into_the_continuing_request():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 slots of a third
    compute_all(kv, a)
    partial_block = a.block_ids[2]
    kv.free(a)
    b = make_request("b", list(range(10)) + [77])  # a's tokens, then one more: only token 77 to compute
    full = kv.find_cached_prefix(b)
    assert len(full) == 2
    assert kv.find_cached_partial(b, len(full)) == (partial_block, 2)
    assert kv.allocate(b, 1, full, num_copied=2) and len(b.block_ids) == 3
    # A different last block's tokens, or a gap in the full blocks, find nothing.
    assert kv.find_cached_partial(make_request("c", list(range(9)) + [5, 77]), 2) is None
    assert kv.find_cached_partial(b, 1) is None


def test_a_partial_block_taken_by_another_request_is_forgotten():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", list(range(6)))
    compute_all(kv, a)
    kv.free(a)
    compute_all(kv, make_request("x", list(range(100, 112))))  # takes every block, the partial one too
    b = make_request("b", list(range(6)) + [9])
    assert kv.find_cached_partial(b, len(kv.find_cached_prefix(b))) is None
