"""The replica router's choices: prefix affinity by the prefix cache's block hashes, balanced against load;
round-robin; replicas down."""

from __future__ import annotations

import random

import pytest

from tokenloom.distributed.router import ReplicaRouter, ReplicaUnavailable, prefix_hashes
from tokenloom.engine.kv_cache import KVCacheManager
from tokenloom.engine.request import Request
from tokenloom.sampling_params import SamplingParams


def _prompt(prefix: int, length: int = 80, seed: int = 0) -> list[int]:
    """A prompt that starts with shared prefix number `prefix` (48 tokens: three blocks) and goes on at random."""
    rng = random.Random(seed)
    return [1000 + prefix] * 48 + [rng.randrange(5, 999) for _ in range(length - 48)]


def test_prefix_hashes_are_the_prefix_caches_own():
    tokens = _prompt(3)
    manager = KVCacheManager(num_blocks=16, block_size=16)
    request = Request("r", tokens, SamplingParams(max_tokens=1))
    manager.find_cached_prefix(request)
    assert request.block_hashes and prefix_hashes(tokens, 16, 32)[:len(request.block_hashes)] == request.block_hashes


def test_requests_sharing_a_prefix_go_to_one_replica_and_other_prefixes_spread():
    router = ReplicaRouter(4, seed=0)
    owners = {}
    for prefix in range(8):
        chosen = {router.choose(_prompt(prefix, seed=s)) for s in range(5)}
        assert len(chosen) == 1, "a shared prefix split across replicas"
        owners[prefix] = chosen.pop()
    assert len(set(owners.values())) >= 3, owners
    assert sum(router.stats.affinity_hits) == 8 * 4


def test_a_busy_owner_is_passed_over_for_a_less_loaded_replica():
    router = ReplicaRouter(2, slack=2, seed=0)
    owner = router.choose(_prompt(0))
    for _ in range(3):
        router.begin(owner)
    assert router.choose(_prompt(0, seed=1)) != owner
    for _ in range(3):
        router.end(owner)
    assert router.in_flight == [0, 0]


def test_without_a_prompt_the_less_loaded_of_two_is_chosen():
    router = ReplicaRouter(2, seed=0)
    router.begin(0)
    assert all(router.choose(None) == 1 for _ in range(10))


def test_round_robin_spreads_a_shared_prefix():
    router = ReplicaRouter(3, policy="round_robin")
    assert [router.choose(_prompt(0, seed=s)) for s in range(6)] == [0, 1, 2, 0, 1, 2]
    assert sum(router.stats.affinity_hits) == 0


def test_a_replica_down_gets_nothing_and_loses_its_prefixes():
    router = ReplicaRouter(2, seed=0)
    owner = router.choose(_prompt(0))
    router.mark_down(owner)
    assert all(router.choose(_prompt(0, seed=s)) != owner for s in range(5))
    router.mark_up(owner)
    assert router.choose(_prompt(0, seed=9)) != owner  # its prefixes went with its cache
    assert router.choose(None, exclude=frozenset({0})) == 1
    router.mark_down(0)
    with pytest.raises(ReplicaUnavailable, match="no replica is up"):
        router.choose(None, exclude=frozenset({1}))


def test_bad_router_settings_are_refused():
    with pytest.raises(ValueError, match="routing must be one of prefix, round_robin"):
        ReplicaRouter(2, policy="random")
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ReplicaRouter(0)


def test_a_prefix_that_overflowed_has_two_holders_and_goes_to_the_less_loaded():
    router = ReplicaRouter(3, slack=2, seed=0)
    owner = router.choose(_prompt(0))
    for _ in range(3):
        router.begin(owner)
    second = router.choose(_prompt(0, seed=1))
    assert second != owner and router.stats.affinity_hits[second] == 0
    for _ in range(2):
        router.begin(second)
    # now both hold it: the less loaded holder takes it as a hit, never the third replica
    third = ({0, 1, 2} - {owner, second}).pop()
    assert router.choose(_prompt(0, seed=2)) == second and router.stats.affinity_hits[second] == 1
    assert router.stats.routed[third] == 0
