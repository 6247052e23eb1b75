"""Prometheus metrics of the server, on a registry of its own (vLLM registers its own
collectors on the default one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vgs_requests", "HTTP requests by endpoint, search method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.generated = Counter("vgs_generated_tokens", "policy tokens generated (all candidates)",
                                 registry=self.registry)
        self.prefill = Counter("vgs_prefill_tokens", "prompt tokens the policy actually prefilled",
                               registry=self.registry)
        self.value_tokens = Counter("vgs_value_tokens", "tokens the value model computed", registry=self.registry)
        self.latency = Histogram("vgs_search_latency_seconds", "search latency by method", ["method"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
                                 registry=self.registry)
        self.in_flight = Gauge("vgs_sequences_in_flight", "live sequences admitted", registry=self.registry)
        self.queued = Gauge("vgs_queue_depth", "sequences waiting for admission", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
