"""The server's Prometheus metrics (``GET /metrics``), in one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lora_assets.serving.cache import AdapterCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self, cache: AdapterCache, in_flight) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lora_serve_requests", "Chat completion requests by outcome",
                                ["model_kind", "status"], registry=r)
        self.prompt_tokens = Counter("lora_serve_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("lora_serve_completion_tokens", "Generated tokens", registry=r)
        self.retrieved = Counter("lora_serve_retrieved_examples", "The users' own past replies added to prompts",
                                 registry=r)
        self.latency = Histogram("lora_serve_request_seconds", "Time from request to its last token",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.first_token = Histogram("lora_serve_time_to_first_token_seconds", "Time to the first token",
                                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.batch_rows = Histogram("lora_serve_batch_rows", "Rows (requests) in each decoding pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.adapter_load = Histogram("lora_serve_adapter_load_seconds", "Cache miss: drive read, verify, load",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        r.register(_CacheCollector(cache, in_flight))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """Adapter cache counters, read from the cache when scraped."""

    def __init__(self, cache: AdapterCache, in_flight) -> None:
        self.cache = cache
        self.in_flight = in_flight

    def collect(self):
        c = self.cache
        for name, value, help_ in (("hits", c.hits, "Requests whose adapter was resident"),
                                   ("misses", c.misses, "Requests that loaded their adapter from the drive"),
                                   ("evictions", c.evictions, "Resident adapters evicted for another")):
            family = CounterMetricFamily(f"lora_serve_adapter_cache_{name}", help_)
            family.add_metric([], value)
            yield family
        for name, value, help_ in (("lora_serve_adapters_resident", c.resident, "Adapters in memory"),
                                   ("lora_serve_adapter_slots", c.capacity, "Adapter slots (--max-adapters)"),
                                   ("lora_serve_requests_in_flight", self.in_flight(), "Requests queued or decoding")):
            family = GaugeMetricFamily(name, help_)
            family.add_metric([], value)
            yield family
