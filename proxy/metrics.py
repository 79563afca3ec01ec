"""Prometheus metrics, one registry per app (so several apps in one process never clash).

Names follow prometheus_client's conventions: counters end in `_total`, durations are
histograms in `_seconds`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("siren_proxy_requests_total", "Requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.decisions = Counter("siren_proxy_guard_decisions_total", "Guard decisions, by stage and action.",
                                 ["stage", "action"], registry=r)
        self.guard_latency = Histogram("siren_proxy_guard_latency_seconds",
                                       "Time to a guard verdict (a prompt, a stream check, a whole response).",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_scored = Counter("siren_proxy_tokens_scored_total",
                                     "Streamed response tokens (upstream deltas) scored by the guard.", registry=r)
        self.tokens_leaked = Counter("siren_proxy_tokens_released_after_crossing_total",
                                     "Tokens released to clients past the last check under the threshold "
                                     "of a stream that was then cut (0 with holdback >= check_every).",
                                     registry=r)
        self.upstream_latency = Histogram("siren_proxy_upstream_latency_seconds",
                                          "Upstream time to response headers.", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.upstream_ttft = Histogram("siren_proxy_upstream_time_to_first_token_seconds",
                                       "Upstream time to the first streamed event carrying text.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.active_streams = Gauge("siren_proxy_active_streams", "Responses being streamed now.", registry=r)
        self.open_connections = Gauge("siren_proxy_open_connections", "Client connections open now (`serve`).",
                                      registry=r)
        self.front_refusals = Counter("siren_proxy_front_door_refusals_total",
                                      "Connections answered and closed by the front door, by error code "
                                      "(a head too large or too slow, too many connections).", ["code"], registry=r)
        self.batch_size = Histogram("siren_proxy_guard_batch_size", "Items per guard forward pass.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.stream_batch_size = Histogram("siren_proxy_guard_stream_batch_size",
                                           "Streaming checks per packed guard step.",
                                           buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("siren_proxy_guard_queue_depth", "Guard work items waiting.", registry=r)
        self.memory_bytes = Gauge("siren_proxy_responses_memory_bytes",
                                  "Bytes of Responses turns remembered for requests that chain from them.",
                                  registry=r)
        self._prefixes = _PrefixCacheCollector()
        r.register(self._prefixes)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def watch_memory(self, memory) -> None:
        """Report a `proxy.memory.ResponsesMemory`'s size (read at each scrape)."""
        self.memory_bytes.set_function(lambda: memory.nbytes)

    def watch_prefixes(self, cache) -> None:
        """Report a `guard.prefixes.PrefixCache` (its counts are read at each scrape)."""
        self._prefixes.cache = cache

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCollector:
    """The guard's prefix cache, read when scraped (its counts live on the worker thread)."""

    def __init__(self) -> None:
        self.cache = None

    def collect(self):
        cache = self.cache
        if cache is None:
            return
        yield CounterMetricFamily("siren_proxy_guard_prefix_cache_hits",
                                  "Stream sessions that continued from a cached prefix.", value=cache.hits)
        yield CounterMetricFamily("siren_proxy_guard_prefix_cache_misses",
                                  "Stream sessions that found no cached prefix worth taking.", value=cache.misses)
        yield CounterMetricFamily("siren_proxy_guard_prefix_tokens_reused",
                                  "Tokens the guard did not run again thanks to cached prefixes.",
                                  value=cache.tokens_reused)
        yield GaugeMetricFamily("siren_proxy_guard_prefix_cache_bytes", "Bytes held by the prefix cache.",
                                value=cache.nbytes)
