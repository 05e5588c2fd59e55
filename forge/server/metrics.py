"""Prometheus metrics for /metrics, with vLLM's meanings and names in the `forge:` namespace, so a router
or dashboard built for vLLM (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, ...) reads forge
after renaming the prefix (README, "Tools and reasoning" has the table). Histogram buckets are vLLM's.

They live on a private registry (so several servers in one process, as in the tests, never collide in
prometheus-client's global one). Gauges and the engine's counters are read at scrape time from the
snapshot the engine thread refreshes every loop (forge.server.async_engine.EngineSnapshot); the
latency histograms and request_success are observed by the engine thread as outputs come out.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily

# Seconds, as vLLM's (vllm/v1/metrics/loggers.py): equal buckets keep recording rules and SLO queries valid.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# Counters the engine keeps (cumulative since it started): EngineSnapshot field -> (name, help).
ENGINE_COUNTERS = {
    "prompt_tokens": ("forge:prompt_tokens", "Prompt tokens of the requests the engine accepted"),
    "generation_tokens": ("forge:generation_tokens", "Generated tokens"),
    "prefix_cache_queries": ("forge:prefix_cache_queries",
                             "Prompt tokens looked up in the prefix cache (each request once, when first scheduled)"),
    "prefix_cache_hits": ("forge:prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    "num_preemptions": ("forge:num_preemptions",
                        "Sequences preempted (KV blocks freed, recomputed later) since the engine started"),
    "spec_decode_num_drafts": ("forge:spec_decode_num_drafts",
                               "Speculative decoding: verify steps of a sequence that carried draft tokens"),
    "spec_decode_num_draft_tokens": ("forge:spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified"),
    "spec_decode_num_accepted_tokens": ("forge:spec_decode_num_accepted_tokens",
                                        "Speculative decoding: draft tokens accepted"),
}


class _EngineCounters:
    """A collector: the engine's cumulative counts, read from the snapshot at scrape time."""

    def __init__(self, metrics: "ServerMetrics"):
        self.metrics = metrics

    def collect(self):
        engine = self.metrics.async_engine
        for field, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(engine.snapshot, field) if engine is not None else 0)
        per_pos = engine.snapshot.spec_decode_accepted_per_pos if engine is not None else ()
        if per_pos:
            family = CounterMetricFamily("forge:spec_decode_num_accepted_tokens_per_pos",
                                         "Speculative decoding: draft tokens accepted, by their position in the draft "
                                         "(0 = first)", labels=["position"])
            for pos, count in enumerate(per_pos):
                family.add_metric([str(pos)], count)
            yield family


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("forge:http_requests", "HTTP requests to /v1, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.num_running = Gauge("forge:num_requests_running", "Sequences in the running batch", registry=r)
        self.num_waiting = Gauge("forge:num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_cache_usage = Gauge("forge:kv_cache_usage_perc",
                                    "Fraction of KV-cache blocks held by sequences (0-1; 1 = full)", registry=r)
        self.time_to_first_token = Histogram("forge:time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("forge:inter_token_latency_seconds",
                                             "Time between consecutive generated tokens of a sequence",
                                             buckets=ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("forge:e2e_request_latency_seconds",
                                             "From a request's arrival to its last token",
                                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram("forge:request_queue_time_seconds",
                                            "From a request's arrival to its first scheduled step",
                                            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_success = Counter("forge:request_success", "Finished sequences, by why they finished "
                                       "(stop, length, abort: the client left, error)", ["finished_reason"], registry=r)
        self.async_engine = None
        r.register(_EngineCounters(self))

    def bind(self, async_engine) -> None:
        """Read the engine's gauges and counters at scrape time from the snapshot its thread keeps fresh."""
        self.async_engine = async_engine
        self.num_running.set_function(lambda: async_engine.snapshot.num_running)
        self.num_waiting.set_function(lambda: async_engine.snapshot.num_waiting)
        self.kv_cache_usage.set_function(lambda: async_engine.snapshot.kv_cache_usage)

    def finished(self, reason: str, count: int = 1) -> None:
        self.request_success.labels(reason).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
