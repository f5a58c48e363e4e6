"""Prometheus metrics of one server app (its own ``CollectorRegistry``, so several apps can live in one process):
the engine's counters and gauges read from ``engine.stats()`` at scrape time, and the latency histograms the
server observes per request."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (engine.stats() key, metric name without the _total suffix, help)
_COUNTERS = (
    ("prefix_cache_queries_total", "nemojax:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits_total", "nemojax:prefix_cache_hits", "Prompt tokens restored from the prefix cache."),
    ("prompt_tokens_total", "nemojax:prompt_tokens", "Prompt tokens of the requests taken."),
    ("generation_tokens_total", "nemojax:generation_tokens", "Tokens generated."),
)
_GAUGES = (
    ("running", "nemojax:num_requests_running", "Requests in the running batch."),
    ("waiting", "nemojax:num_requests_waiting", "Requests waiting for a slot."),
)
_EXPERT_KEYS = ("expert_cache_hit_rate", "expert_hit_rate")


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, name, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        for key, name, doc in _GAUGES:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(stats.get(key, 0)))
            yield g
        rate = next((stats[k] for k in _EXPERT_KEYS if stats.get(k) is not None), None)
        if rate is not None:  # only when the routed experts are offloaded
            g = GaugeMetricFamily("nemojax:expert_cache_hit_rate", "Routed-expert device cache hit rate.")
            g.add_metric([], float(rate))
            yield g


class ServerMetrics:
    """``ttft`` / ``tpot`` histograms (seconds) plus the engine's stats; :meth:`render` is the /metrics body."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("nemojax:time_to_first_token_seconds", "Time from request arrival to first token.",
                              registry=self.registry,
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                                       7.5, 10.0, 20.0, 40.0, 80.0))
        self.tpot = Histogram("nemojax:time_per_output_token_seconds", "Time per output token after the first.",
                              registry=self.registry,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                                       0.5, 0.75, 1.0, 2.5))

    def render(self) -> bytes:
        return generate_latest(self.registry)
