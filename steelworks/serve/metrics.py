"""Prometheus metrics of the serving app (``GET /metrics``, text exposition format).

Names follow vLLM's where they mean the same thing, so existing dashboards read them:
request counts by route and status, prompt/generated token counters, request latency and
time to first token, and, read from the engine at scrape time, the number of requests
waiting and running. Each app owns its registry (several apps in one process, as in tests,
must not collide in the global one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Reads the engine's queue and batch sizes when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model: str) -> None:
        self.stats, self.model = stats, model

    def collect(self):
        s = self.stats()
        for name, key, doc in (("steelworks_num_requests_waiting", "waiting", "requests queued"),
                               ("steelworks_num_requests_running", "running", "requests in the batch")):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model], float(s.get(key, 0)))
            yield g


class ServeMetrics:
    def __init__(self, model: str, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("steelworks_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("steelworks_prompt_tokens", "prompt tokens processed",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("steelworks_generation_tokens", "tokens generated",
                                         ["model_name"], registry=r)
        self.latency = Histogram("steelworks_request_latency_seconds", "request latency (until the "
                                 "last byte of a stream)", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("steelworks_time_to_first_token_seconds", "time to the first generated "
                              "text", ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("steelworks_http_requests_in_flight", "HTTP requests being served",
                              registry=r)
        r.register(_EngineCollector(engine_stats, model))

    def observe_request(self, route: str, status: int, started: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def observe_generation(self, prompt_tokens: int, completion_tokens: int,
                           first_token_s: float | None) -> None:
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(completion_tokens)
        if first_token_s is not None:
            self.ttft.labels(self.model).observe(first_token_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
