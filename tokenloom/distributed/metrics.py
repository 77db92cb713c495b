"""The front's `/metrics`: every replica's metrics with a `replica` label added (one family per metric name,
so the exposition stays valid), and the router's own counts per replica."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tokenloom.distributed.router import ReplicaRouter


def merged_metrics(router: ReplicaRouter, replica_texts: list[str]) -> bytes:
    """The text exposition of the router's metrics and each replica's (`replica_texts[i]`, "" when it did not
    answer), labelled by replica."""
    registry = CollectorRegistry()
    registry.register(_Merged(router, replica_texts))
    return generate_latest(registry)


class _Merged(Collector):
    def __init__(self, router: ReplicaRouter, replica_texts: list[str]) -> None:
        self.router, self.texts = router, replica_texts

    def collect(self) -> Iterator[Metric]:
        yield from _router_families(self.router)
        families: dict[str, Metric] = {}
        for replica, text in enumerate(self.texts):
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "replica": str(replica)}, s.value, s.timestamp, s.exemplar)
        yield from families.values()


def _router_families(router: ReplicaRouter) -> Iterator[Metric]:
    label = ["replica"]
    routed = CounterMetricFamily("tokenloom:replica_requests", "Requests routed to each replica.", labels=label)
    hits = CounterMetricFamily("tokenloom:replica_affinity_hits",
                               "Requests routed to the replica that was sent their prompt's leading blocks before.",
                               labels=label)
    up = GaugeMetricFamily("tokenloom:replica_up", "1 while the replica takes requests.", labels=label)
    in_flight = GaugeMetricFamily("tokenloom:replica_in_flight", "Requests the front has open on the replica.",
                                  labels=label)
    for i in range(router.num_replicas):
        routed.add_metric([str(i)], router.stats.routed[i])
        hits.add_metric([str(i)], router.stats.affinity_hits[i])
        up.add_metric([str(i)], float(router.healthy[i]))
        in_flight.add_metric([str(i)], router.in_flight[i])
    yield from (routed, hits, up, in_flight)
