"""Prometheus metrics for one app, in its own registry (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               ProcessCollector, generate_latest)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, open fds
        self.requests = Counter("qwenvl_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("qwenvl_request_duration_seconds", "time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qwenvl_time_to_first_token_seconds",
                              "time from a chat request's arrival to its first generated text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("qwenvl_generated_tokens", "completion tokens generated", registry=r)
        self.prompt_tokens = Counter("qwenvl_prompt_tokens", "prompt tokens processed", registry=r)
        self.tokens_per_second = Histogram("qwenvl_tokens_per_second",
                                           "completion tokens per second of generation, per request",
                                           buckets=RATE_BUCKETS, registry=r)
        self.queue_depth = Gauge("qwenvl_queue_depth", "chat requests waiting for the model", registry=r)
        self.in_flight = Gauge("qwenvl_requests_in_flight",
                               "chat requests admitted (generating or waiting); MAX_QUEUE bounds it", registry=r)
        self.images = Counter("qwenvl_images_processed", "images decoded for requests, by source",
                              ["source"], registry=r)
        self.rejected = Counter("qwenvl_rejected_requests", "requests answered with an error, by reason",
                                ["reason"], registry=r)

    def watch(self, queue_depth, in_flight, engine=None) -> None:
        """Gauges read at scrape time from callables; `engine()` gives the engine (or None)."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        if engine is not None:
            self.registry.register(EngineCollector(engine))

    def render(self) -> tuple:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def finished_generation(self, completion_tokens: int, seconds: float) -> None:
        self.generated_tokens.inc(completion_tokens)
        if completion_tokens > 0 and seconds > 0:
            self.tokens_per_second.observe(completion_tokens / seconds)


class EngineCollector:
    """The engine's own counters, read at scrape time: image caches and batching."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self.engine()
        stats = getattr(engine, "cache_stats", None)
        if stats is None:
            return
        lookups = CounterMetricFamily("qwenvl_image_cache_lookups", "image cache lookups by cache and result",
                                      labels=["cache", "result"])
        size = GaugeMetricFamily("qwenvl_image_cache_bytes", "bytes held by each image cache", labels=["cache"])
        for name, s in stats().items():
            lookups.add_metric([name, "hit"], s["hits"])
            lookups.add_metric([name, "miss"], s["misses"])
            size.add_metric([name], s["bytes"])
        yield lookups
        yield size
        yield CounterMetricFamily("qwenvl_batches", "batched generations run", value=engine.batches_run)
        yield CounterMetricFamily("qwenvl_batched_requests", "requests run in those batches",
                                  value=engine.batched_jobs)


def image_source(source: str) -> str:
    head = source[:8].lower()
    if head.startswith("data:"):
        return "data_url"
    if head.startswith(("http://", "https://")):
        return "url"
    return "base64"
