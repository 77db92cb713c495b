"""Which replica serves a request: the one that already holds its prompt's first KV blocks, balanced against
load (power of two choices on requests in flight), or plain round-robin for comparison.

The keys are the prefix cache's own chained block hashes (`engine/kv_cache.hash_block`), so "holds the prefix"
means what the replica's cache means by it. The router remembers which replicas it sent each hash to (an LRU
of `capacity` hashes, each with a bit per replica): it never asks the replicas, and a replica that restarted is
forgotten with its cache. A hot prefix that overflows its replica gains a second holder, and from then on goes
to the less loaded of its holders: affinity without piling a popular prefix onto one replica.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

from tokenloom.engine.kv_cache import hash_block

ROUTING_POLICIES = ("prefix", "round_robin")


def prefix_hashes(token_ids: list[int], block_size: int, max_blocks: int) -> list[int]:
    """The chained hashes of the prompt's first full blocks (up to `max_blocks`), as the prefix cache computes
    them for a request without an adapter."""
    hashes: list[int] = []
    parent = None
    for start in range(0, min(len(token_ids) // block_size, max_blocks) * block_size, block_size):
        parent = hash_block(parent, tuple(token_ids[start:start + block_size]))
        hashes.append(parent)
    return hashes


@dataclass(slots=True)
class RouterStats:
    """Counts per replica: requests routed, and those routed to a replica that held their prefix."""

    routed: list[int]
    affinity_hits: list[int]


@dataclass
class ReplicaRouter:
    """Picks a replica per request and tracks each one's requests in flight (`begin` / `end`).

    `prefix`: of the healthy replicas that were sent the longest of the prompt's leading block hashes, the least
    loaded, unless it has more than `slack` requests in flight above the least loaded replica; otherwise (and for
    a prefix nobody holds) the less loaded of two replicas drawn at random. `round_robin`: the next healthy
    replica in turn.
    """

    num_replicas: int
    policy: str = "prefix"
    block_size: int = 16
    max_blocks: int = 32
    slack: int = 4
    capacity: int = 1 << 16
    seed: int | None = None
    in_flight: list[int] = field(init=False)
    healthy: list[bool] = field(init=False)
    stats: RouterStats = field(init=False)
    _holders: OrderedDict[int, int] = field(init=False, default_factory=OrderedDict)  # block hash → replica bits
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}; got {self.policy!r}")
        if self.num_replicas < 1:
            raise ValueError(f"replicas must be >= 1; got {self.num_replicas}")
        self.in_flight = [0] * self.num_replicas
        self.healthy = [True] * self.num_replicas
        self.stats = RouterStats([0] * self.num_replicas, [0] * self.num_replicas)
        self._rng = random.Random(self.seed)

    def choose(self, token_ids: list[int] | None = None, exclude: frozenset[int] = frozenset()) -> int:
        """A replica for a prompt (None: no prompt to route by, such as an embeddings batch), never one in
        `exclude` (replicas that already failed this request). ReplicaUnavailable when none is left."""
        up = [i for i in range(self.num_replicas) if self.healthy[i] and i not in exclude]
        if not up:
            raise ReplicaUnavailable("no replica is up to serve the request")
        if self.policy == "round_robin":
            choice = min(up, key=lambda i: (i - self._next) % self.num_replicas)
            self._next = (choice + 1) % self.num_replicas
            return self._routed(choice, hit=False)
        hashes = prefix_hashes(token_ids or [], self.block_size, self.max_blocks)
        holders = self._holders_of(hashes, up)
        least = min(self.in_flight[i] for i in up)
        best = min(holders, key=lambda i: self.in_flight[i]) if holders else None
        if best is not None and self.in_flight[best] <= least + self.slack:
            choice, hit = best, True
        else:
            # ties go to the replica routed fewer requests so far: new prefixes spread evenly from the start
            pair = self._rng.sample(up, 2) if len(up) > 1 else up
            choice, hit = min(pair, key=lambda i: (self.in_flight[i], self.stats.routed[i])), False
        for h in hashes:
            self._holders[h] = self._holders.get(h, 0) | 1 << choice
            self._holders.move_to_end(h)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)
        return self._routed(choice, hit)

    def begin(self, replica: int) -> None:
        """A request started on `replica`."""
        self.in_flight[replica] += 1

    def end(self, replica: int) -> None:
        """A request on `replica` ended (finished, failed or abandoned)."""
        self.in_flight[replica] = max(0, self.in_flight[replica] - 1)

    def mark_down(self, replica: int) -> None:
        """Route nothing to `replica` until `mark_up`; forget the prefixes sent to it (a restart empties its
        cache)."""
        self.healthy[replica] = False
        bit = 1 << replica
        for h in [h for h, mask in self._holders.items() if mask & bit]:
            if self._holders[h] == bit:
                del self._holders[h]
            else:
                self._holders[h] &= ~bit

    def mark_up(self, replica: int) -> None:
        """`replica` serves again."""
        self.healthy[replica] = True

    def _holders_of(self, hashes: list[int], up: list[int]) -> list[int]:
        """The healthy replicas sent the longest of `hashes` (none when no replica was sent even the first)."""
        for h in reversed(hashes):
            mask = self._holders.get(h, 0)
            holders = [i for i in up if mask >> i & 1]
            if holders:
                return holders
        return []

    def _routed(self, replica: int, hit: bool) -> int:
        self.stats.routed[replica] += 1
        self.stats.affinity_hits[replica] += hit
        return replica


class ReplicaUnavailable(RuntimeError):
    """Every replica that could take the request is down."""
