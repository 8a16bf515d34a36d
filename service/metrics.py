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

        # Admission control and access (service/admission.py, service/access.py).
        self.queue_budget = Gauge(
            "stl_queue_budget_seconds", "STL_QUEUE_BUDGET_MS: the longest expected queue wait a scene is admitted to",
            registry=self.registry,
        )
        self.queue_depth = Gauge("stl_queue_depth", "Scenes queued or in a forward pass", registry=self.registry)
        self.seconds_per_crop = Gauge(
            "stl_seconds_per_crop", "Recently measured time per crop through the batch workers",
            registry=self.registry,
        )
        self.expected_wait = Gauge(
            "stl_queue_expected_wait_seconds", "Queue depth times the time per crop: what a new scene would wait",
            registry=self.registry,
        )
        self.shed = Counter(
            "stl_shed", "Requests refused with 503 before any work, by reason (overloaded, draining)", ["reason"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "stl_jobs_dropped", "Queued scenes dropped before their forward pass, by reason (expired, cancelled)",
            ["reason"], registry=self.registry,
        )
        self.abandoned = Counter(
            "stl_requests_abandoned", "Requests stopped before they answered, by reason (timeout, disconnect)",
            ["reason"], registry=self.registry,
        )
        self.draining = Gauge("stl_draining", "1 while the service drains before it exits", registry=self.registry)
        self.access = Counter(
            "stl_access", "Protected requests by key (a short hash, 'address' without keys) and outcome",
            ["key", "outcome"], registry=self.registry,
        )
        self.unauthorized = Counter(
            "stl_unauthorized", "Protected requests refused with 401, by reason (missing, wrong)", ["reason"],
            registry=self.registry,
        )

    def set_index(self, version: str | None, status: str) -> None:
        self.index_info.clear()
        self.index_info.labels(version=version or "none", status=status).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
