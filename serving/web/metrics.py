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
        self.in_flight = Gauge("qwenvl_requests_in_flight",
                               "chat requests admitted (generating or waiting); MAX_QUEUE bounds it", registry=r)
        self.images = Counter("qwenvl_images_processed", "images decoded for requests, by source",
                              ["source"], registry=r)
        self.videos = Counter("qwenvl_videos_processed", "videos read for requests, by source "
                              "(data_url, base64, url, or frames: a list of images)", ["source"], registry=r)
        self.video_frames = Counter("qwenvl_video_frames", "video frames: decoded (all the decoder produced) and "
                                    "sampled (kept for the model)", ["kind"], registry=r)
        self.rejected = Counter("qwenvl_rejected_requests", "requests answered with an error, by reason",
                                ["reason"], registry=r)

    def watch(self, in_flight, engine) -> None:
        """Read at scrape time: `in_flight()` admitted requests, and `engine()` (or None while loading)'s stats."""
        self.in_flight.set_function(in_flight)
        self.registry.register(EngineCollector(engine))

    def render(self) -> tuple:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def image_loaded(self, source: str) -> None:
        self.images.labels(image_source(source)).inc()

    def video_loaded(self, source: str, clip) -> None:
        """`source`: the part's string, or "frames" for a list of images; `clip`: the serving.intake.video.Video."""
        self.videos.labels("frames" if source == "frames" else image_source(source)).inc()
        self.video_frames.labels("decoded").inc(clip.decoded_frames)
        self.video_frames.labels("sampled").inc(len(clip.frames))

    def first_text(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished_generation(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        if completion_tokens > 0 and seconds > 0:
            self.tokens_per_second.observe(completion_tokens / seconds)


# engine.stats() key -> (metric, help); keys an engine does not give are skipped
ENGINE_GAUGES = {
    "queue_depth": ("qwenvl_queue_depth", "chat requests waiting for the model"),
    "rows_running": ("qwenvl_rows_running", "sequences being decoded now"),
    "kv_tokens": ("qwenvl_kv_tokens", "KV cache slots the running batch holds now (rows x longest row)"),
}
ENGINE_COUNTERS = {
    "batches": ("qwenvl_batches", "batched generations run"),
    "batched_requests": ("qwenvl_batched_requests", "requests run in those batches"),
    "steps": ("qwenvl_decode_steps", "decoding steps run (each gives every running sequence one token)"),
    "step_seconds": ("qwenvl_decode_step_seconds", "time spent in decoding steps"),
    "prefill_tokens": ("qwenvl_prefill_tokens", "prompt tokens prefilled"),
    "joined": ("qwenvl_joined_requests", "requests admitted into a batch that was already decoding"),
    "preemptions": ("qwenvl_preemptions", "rows taken out of the batch for KV room, resumed later where they stopped"),
    "prefilled_side_by_side": ("qwenvl_prefilled_side_by_side",
                               "prompt prefill turns run beside another prompt's (CPU prefill lanes)"),
    # structured output (built-in engine): response_format, tools, logit_bias
    "constrained_rows": ("qwenvl_constrained_rows", "answers generated under a grammar or a logit_bias"),
    "grammar_compiles": ("qwenvl_grammar_compiles", "grammars compiled (JSON schemas, tool sets; cache misses)"),
    "grammar_compile_seconds": ("qwenvl_grammar_compile_seconds", "time spent compiling grammars"),
    "grammar_cache_hits": ("qwenvl_grammar_cache_hits", "grammars served from the compiled-grammar cache"),
    "grammar_masks": ("qwenvl_grammar_masks", "per-token masks computed for constrained rows"),
    "grammar_mask_seconds": ("qwenvl_grammar_mask_seconds",
                             "time spent computing and applying those masks (divide by the masks: per token)"),
}


class EngineCollector:
    """The engine's own numbers (engine.stats()), read at scrape time: queue, batching, image caches."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self.engine()
        stats = engine.stats() if engine is not None else {"queue_depth": 0}  # loading: chat answers 503
        for key, (name, text) in ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, text, value=stats[key])
        for key, (name, text) in ENGINE_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, text, value=stats[key])
        caches = stats.get("caches")
        if caches:
            lookups = CounterMetricFamily("qwenvl_image_cache_lookups", "image cache lookups by cache and result",
                                          labels=["cache", "result"])
            size = GaugeMetricFamily("qwenvl_image_cache_bytes", "bytes held by each image cache", labels=["cache"])
            for cache, s in caches.items():
                lookups.add_metric([cache, "hit"], s["hits"])
                lookups.add_metric([cache, "miss"], s["misses"])
                size.add_metric([cache], s["bytes"])
            yield lookups
            yield size
        prefix = stats.get("prefix_cache")
        if prefix:
            yield from prefix_cache_metrics(prefix)
        upstreams = stats.get("upstreams")
        if upstreams:
            yield from upstream_metrics(upstreams)


def prefix_cache_metrics(s: dict):
    """The built-in engine's prefix cache (serving.engines.builtin.prefix_cache): engine.stats()["prefix_cache"]."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    lookups = CounterMetricFamily("qwenvl_prefix_cache_lookups", "prompts looked up in the prefix cache, by result",
                                  labels=["result"])
    lookups.add_metric(["hit"], s["hits"])
    lookups.add_metric(["miss"], s["lookups"] - s["hits"])
    yield lookups
    yield CounterMetricFamily("qwenvl_prefix_cache_hit_tokens",
                              "prompt tokens whose KV came from the prefix cache (not prefilled)", value=s["hit_tokens"])
    yield CounterMetricFamily("qwenvl_prefix_cache_evictions", "prefix cache entries evicted for room (LRU)",
                              value=s["evictions"])
    yield GaugeMetricFamily("qwenvl_prefix_cache_bytes", "bytes of KV the prefix cache holds", value=s["bytes"])
    yield GaugeMetricFamily("qwenvl_prefix_cache_capacity_bytes", "the most bytes it may hold (PREFIX_CACHE_MB)",
                            value=s["max_bytes"])
    yield GaugeMetricFamily("qwenvl_prefix_cache_entries", "sequences (prompts, prompts with answers) it holds",
                            value=s["entries"])


def upstream_metrics(upstreams: dict):
    """Per upstream server (--backend openai / fastdeploy), labelled by its URL: engine.stats()["upstreams"]."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    healthy = GaugeMetricFamily("qwenvl_upstream_healthy", "1 while the upstream passes its health checks",
                                labels=["upstream"])
    in_flight = GaugeMetricFamily("qwenvl_upstream_in_flight", "requests in flight to the upstream",
                                  labels=["upstream"])
    requests = CounterMetricFamily("qwenvl_upstream_requests", "requests sent to the upstream", labels=["upstream"])
    failures = CounterMetricFamily("qwenvl_upstream_failures",
                                   "requests the upstream failed (unreachable, its 5xx, an answer cut off)",
                                   labels=["upstream"])
    retried = CounterMetricFamily("qwenvl_upstream_retried",
                                  "requests that failed on the upstream before answering and went to another one",
                                  labels=["upstream"])
    checks = CounterMetricFamily("qwenvl_upstream_failed_checks", "health checks the upstream failed",
                                 labels=["upstream"])
    for url, u in upstreams.items():
        healthy.add_metric([url], 1 if u["healthy"] else 0)
        in_flight.add_metric([url], u["in_flight"])
        requests.add_metric([url], u["requests"])
        failures.add_metric([url], u["failures"])
        retried.add_metric([url], u["retried"])
        checks.add_metric([url], u["checks_failed"])
    yield from (healthy, in_flight, requests, failures, retried, checks)


def image_source(source: str) -> str:
    head = source[:8].lower()
    if head.startswith("data:"):
        return "data_url"
    if head.startswith(("http://", "https://")):
        return "url"
    return "base64"
