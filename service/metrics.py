"""Prometheus metrics on a per-app registry (so two apps in one process, as in tests, never collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stl_requests", "HTTP requests by route, status and recommendation source",
            ["route", "status", "source"], registry=self.registry,
        )
        self.latency = Histogram(
            "stl_request_latency_seconds", "Request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "stl_batch_size", "Crops embedded per forward pass", buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.fallbacks = Counter(
            "stl_fallbacks", "Recommendations served by popularity, by reason", ["reason"], registry=self.registry,
        )
        self.searches = Counter(
            "stl_searches", "Recommend and similar requests by endpoint, whether filtered and whether deduplicated",
            ["endpoint", "filtered", "dedup"], registry=self.registry,
        )
        self.reloads = Counter(
            "stl_reloads", "Index reloads by outcome", ["outcome"], registry=self.registry,
        )
        self.index_info = Gauge(
            "stl_index_info", "1 for the index version being served", ["version", "status"], registry=self.registry,
        )

    def set_index(self, version: str | None, status: str) -> None:
        self.index_info.clear()
        self.index_info.labels(version=version or "none", status=status).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
