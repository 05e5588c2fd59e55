"""Prometheus metrics for /metrics, on a private registry (so several servers in one process, as in
the tests, never collide in prometheus-client's global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds. TTFT includes queueing, so its buckets reach further than the per-token ones.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("forge_requests", "HTTP requests to the API, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.num_running = Gauge("forge_num_requests_running", "Sequences being generated", registry=r)
        self.num_waiting = Gauge("forge_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_cache_usage = Gauge("forge_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", registry=r)
        self.prefix_hit_rate = Gauge("forge_prefix_cache_hit_rate",
                                     "Fraction of prompt blocks found in the prefix cache (0-1)", registry=r)
        self.time_to_first_token = Histogram("forge_time_to_first_token_seconds",
                                             "From request arrival to its first generated token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("forge_inter_token_latency_seconds",
                                             "Time between consecutive generated tokens of a sequence",
                                             buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("forge_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("forge_generation_tokens", "Generated tokens", registry=r)

    def bind(self, async_engine) -> None:
        """Read the engine's gauges at scrape time from the snapshot its thread keeps fresh."""
        self.num_running.set_function(lambda: async_engine.snapshot.num_running)
        self.num_waiting.set_function(lambda: async_engine.snapshot.num_waiting)
        self.kv_cache_usage.set_function(lambda: async_engine.snapshot.kv_cache_usage)
        self.prefix_hit_rate.set_function(lambda: async_engine.snapshot.prefix_cache_hit_rate)

    def add_tokens(self, kind: str, count: int) -> None:
        (self.prompt_tokens if kind == "prompt_tokens" else self.generation_tokens).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
