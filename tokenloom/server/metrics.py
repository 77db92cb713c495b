"""Prometheus metrics, in a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenloom.engine.async_engine import AsyncEngine, RequestTimings

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's latest stats at scrape time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        yield GaugeMetricFamily("tokenloom:num_requests_running", "Requests being generated.", s.num_running)
        yield GaugeMetricFamily("tokenloom:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield GaugeMetricFamily("tokenloom:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                                s.kv_cache_usage)
        yield GaugeMetricFamily("tokenloom:kv_cache_num_blocks", "KV cache blocks in total.", s.num_blocks)
        yield CounterMetricFamily("tokenloom:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  s.prefix_cache_queries)
        yield CounterMetricFamily("tokenloom:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  s.prefix_cache_hits)
        yield CounterMetricFamily("tokenloom:num_preemptions", "Requests preempted to free KV cache.",
                                  s.num_preemptions)


class ServerMetrics:
    """Every metric the server exports; request timings arrive from the engine thread as requests end."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        r = self.registry
        self.prompt_tokens = Counter("tokenloom:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tokenloom:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("tokenloom:request_success", "Requests ended, by finish reason.",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("tokenloom:time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tokenloom:inter_token_latency_seconds", "Time between successive tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tokenloom:e2e_request_latency_seconds", "Arrival to last output.",
                             buckets=E2E_BUCKETS, registry=r)
        engine.listeners.append(self.observe)

    def observe(self, t: RequestTimings) -> None:
        """Record one finished (or aborted) request."""
        self.prompt_tokens.inc(t.num_prompt_tokens)
        self.generation_tokens.inc(t.num_output_tokens)
        self.requests.labels(t.finish_reason or "abort").inc()
        if t.first_token is not None:
            self.ttft.observe(t.first_token - t.arrival)
        for gap in t.inter_token_latencies:
            self.itl.observe(gap)
        if t.finished is not None:
            self.e2e.observe(t.finished - t.arrival)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
