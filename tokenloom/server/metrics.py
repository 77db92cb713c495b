"""Prometheus metrics, in a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenloom.engine.async_engine import RequestTimings
from tokenloom.manager import ModelManager, ModelState

if TYPE_CHECKING:
    from tokenloom.server.model_leases import ServedModel

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)


class _ModelCollector(Collector):
    """Per-model gauges and counters, read at scrape time from the manager and each loaded engine's stats."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        label = ["model_name"]
        families = {
            "running": GaugeMetricFamily("tokenloom:num_requests_running", "Requests being generated.", labels=label),
            "waiting": GaugeMetricFamily("tokenloom:num_requests_waiting", "Requests waiting to be scheduled.",
                                         labels=label),
            "usage": GaugeMetricFamily("tokenloom:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                                       labels=label),
            "blocks": GaugeMetricFamily("tokenloom:kv_cache_num_blocks", "KV cache blocks in total.", labels=label),
            "queries": CounterMetricFamily("tokenloom:prefix_cache_queries",
                                           "Prompt tokens looked up in the prefix cache.", labels=label),
            "hits": CounterMetricFamily("tokenloom:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                        labels=label),
            "preemptions": CounterMetricFamily("tokenloom:num_preemptions", "Requests preempted to free KV cache.",
                                               labels=label),
        }
        spec_label = ["model_name", "method"]
        speculative = {
            "drafts": CounterMetricFamily("tokenloom:spec_decode_num_drafts",
                                          "Request steps that verified speculative guesses.", labels=spec_label),
            "draft_tokens": CounterMetricFamily("tokenloom:spec_decode_num_draft_tokens",
                                                "Speculative guesses verified.", labels=spec_label),
            "accepted_tokens": CounterMetricFamily("tokenloom:spec_decode_num_accepted_tokens",
                                                   "Speculative guesses accepted.", labels=spec_label),
        }
        for name, served in self.manager.loaded().items():
            if served.kind == "encoder":  # no generation queue or KV cache
                continue
            s = served.engine.stats()
            for key, value in (("running", s.num_running), ("waiting", s.num_waiting), ("usage", s.kv_cache_usage),
                               ("blocks", s.num_blocks), ("queries", s.prefix_cache_queries),
                               ("hits", s.prefix_cache_hits), ("preemptions", s.num_preemptions)):
                families[key].add_metric([name], value)
            if s.speculative is not None:
                sp = s.speculative
                for key, value in (("drafts", sp.num_drafts), ("draft_tokens", sp.num_draft_tokens),
                                   ("accepted_tokens", sp.num_accepted_tokens)):
                    speculative[key].add_metric([name, sp.method], value)
        yield from families.values()
        yield from speculative.values()
        loaded = GaugeMetricFamily("tokenloom:model_loaded", "1 while the model is in memory.", labels=label)
        memory = GaugeMetricFamily("tokenloom:model_memory_bytes", "Weights plus KV cache of a loaded model.",
                                   labels=label)
        loads = CounterMetricFamily("tokenloom:model_loads", "Model loads started (failed ones included).",
                                    labels=label)
        for info in self.manager.list():
            loaded.add_metric([info.name], 1.0 if info.state is ModelState.LOADED else 0.0)
            memory.add_metric([info.name], info.bytes_used)
            loads.add_metric([info.name], info.num_loads)
        yield from (loaded, memory, loads)


class ServerMetrics:
    """Every metric the server exports, labelled by model; request timings arrive from each model's engine
    thread as its requests end (`attach` subscribes a newly loaded model)."""

    def __init__(self, manager: ModelManager) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ModelCollector(manager))
        r, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter("tokenloom:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("tokenloom:generation_tokens", "Tokens generated.", label, registry=r)
        self.requests = Counter("tokenloom:request_success", "Requests ended, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("tokenloom:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tokenloom:inter_token_latency_seconds", "Time between successive tokens.", label,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tokenloom:e2e_request_latency_seconds", "Arrival to last output.", label,
                             buckets=E2E_BUCKETS, registry=r)
        self.http_errors = Counter("tokenloom:http_errors", "Responses with an error status, by status.",
                                   ["status"], registry=r)

    def attach(self, served: ServedModel) -> None:
        """Record the requests of a newly loaded generative model."""
        if served.kind != "encoder":
            served.engine.listeners.append(functools.partial(self.observe, served.name))

    def observe(self, model_name: str, t: RequestTimings) -> None:
        """Record one finished (or aborted) request of a model."""
        self.prompt_tokens.labels(model_name).inc(t.num_prompt_tokens)
        self.generation_tokens.labels(model_name).inc(t.num_output_tokens)
        self.requests.labels(model_name, t.finish_reason or "abort").inc()
        if t.first_token is not None:
            self.ttft.labels(model_name).observe(t.first_token - t.arrival)
        itl = self.itl.labels(model_name)
        for gap in t.inter_token_latencies:
            itl.observe(gap)
        if t.finished is not None:
            self.e2e.labels(model_name).observe(t.finished - t.arrival)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class ErrorCounter:
    """ASGI middleware: count every response whose status is 4xx or 5xx in `metrics.http_errors`."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.http_errors.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
