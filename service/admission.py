"""Who gets in, and for how long: the queue's latency budget, request deadlines and the drain at shutdown.

Past capacity an unbounded queue makes every request wait behind every other: clients give up, and the
server keeps embedding requests nobody waits for (measured before this module: after a 30 s storm at
twice capacity the service needed 37 s before it answered anyone). So a scene is admitted only while its
expected wait, the batcher's queue depth (and its own batch) times its recently measured time per crop,
fits STL_QUEUE_BUDGET_MS; otherwise it gets 503 with Retry-After at once, before its body is read. The depth
counts every scene admitted and not yet answered, not only the jobs already queued: in a storm hundreds of
admitted requests can sit between the door and the queue (reading their bodies, decoding) where the batcher
does not see them, and each of them would have passed the check (measured: with the queue alone, admitted
answers took 0.9 s at p50 against a 0.5 s budget). Every API
request has a deadline (STL_REQUEST_TIMEOUT_MS, or the shorter `X-Request-Timeout-Ms` a client sends);
the batcher drops a job whose deadline passed while it was queued, and the gate (service/middleware.py)
answers 503 when the deadline passes before an answer started. On SIGTERM the service drains
(service/server.py): it refuses new API requests with 503, `/readyz` says "draining", and the process
exits once what it admitted has been answered (or STL_DRAIN_S has passed).

Everything here runs on the event loop (plain attribute updates); the batcher's numbers are read without
locks, a moment's staleness being harmless to an estimate.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

from service.metrics import Metrics
from service.settings import Settings

LOG = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout-ms"


class Load(Protocol):
    """What admission reads of the batcher (service/batching.py)."""

    @property
    def outstanding(self) -> int: ...

    @property
    def seconds_per_crop(self) -> float | None: ...

    def expected_wait_s(self) -> float: ...


class Unavailable(Exception):
    """503 with Retry-After: overloaded, draining, or the request's deadline passed."""

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class BadTimeout(ValueError):
    """The client's `X-Request-Timeout-Ms` is not a positive number of milliseconds."""


class Admission:
    """The budget, the deadlines and the drain state of one app; counted in its metrics."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.budget_s = settings.queue_budget_ms / 1000.0
        self.timeout_s = settings.request_timeout_ms / 1000.0
        self.drain_s = settings.drain_s
        self.batch_max_size = settings.batch_max_size
        self.metrics = metrics
        self.load: Load | None = None  # the batcher, once the engine has started
        self.in_flight = 0  # API requests being answered (the drain waits for them)
        self.scenes_in_flight = 0  # of those, scenes admitted by `check_scene`: each is at least one crop to come
        self.last_activity = time.monotonic()  # when an API request last started or ended
        self.draining_since: float | None = None
        metrics.queue_budget.set(self.budget_s)

    def attach(self, load: Load) -> None:
        """Measure the queue of this batcher (called when the engine starts)."""
        self.load = load
        self.metrics.queue_depth.set_function(lambda: load.outstanding)
        self.metrics.seconds_per_crop.set_function(lambda: load.seconds_per_crop or 0.0)
        self.metrics.expected_wait.set_function(self.expected_wait_s)

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def start_drain(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.metrics.draining.set(1)
            LOG.info("draining: new API requests get 503; waiting up to %.0f s for %d in flight",
                     self.drain_s, self.in_flight)

    def drained(self, quiet_s: float) -> bool:
        """Whether the drain is over: nothing admitted in flight and no API request for `quiet_s`, or
        STL_DRAIN_S spent."""
        if self.draining_since is None:
            return False
        now = time.monotonic()
        if now - self.draining_since >= self.drain_s:
            if self.in_flight:
                LOG.warning("drain time STL_DRAIN_S = %.0f s is over with %d requests in flight",
                            self.drain_s, self.in_flight)
            return True
        return self.in_flight == 0 and now - self.last_activity >= quiet_s

    def drain_left_s(self) -> float:
        if self.draining_since is None:
            return self.drain_s
        return max(0.0, self.drain_s - (time.monotonic() - self.draining_since))

    def deadline(self, header: bytes | None, now: float) -> float:
        """The request's deadline (a time.monotonic()): the server's timeout, or the client's if shorter."""
        timeout = self.timeout_s
        if header is not None:
            try:
                asked = float(header) / 1000.0
            except ValueError:
                asked = math.nan
            if not asked > 0 or math.isinf(asked):
                raise BadTimeout(f"X-Request-Timeout-Ms must be a positive number of milliseconds, "
                                 f"got {header.decode(errors='replace')[:40]!r}")
            timeout = min(timeout, asked)
        return now + timeout

    def check_scene(self, deadline: float, now: float) -> None:
        """Unavailable when a scene sent now would wait longer than the budget (or its own deadline)."""
        if self.load is None:
            return
        wait = self.expected_wait_s()
        if wait > self.budget_s or now + wait > deadline:
            self.metrics.shed.labels(reason="overloaded").inc()
            limit = "STL_QUEUE_BUDGET_MS" if wait > self.budget_s else "the request's timeout"
            raise Unavailable(f"overloaded: a scene would wait about {wait * 1000:.0f} ms, more than {limit} "
                              f"allows ({min(self.budget_s, deadline - now) * 1000:.0f} ms); retry later",
                              retry_after_s=max(1, math.ceil(wait - self.budget_s)))

    def expected_wait_s(self) -> float:
        """How long a scene admitted now would wait for its answer: the crops ahead of it (the batcher's
        outstanding crops, or the admitted scenes if more) and its own batch, which under load is a full one
        (STL_BATCH_MAX_SIZE), times the time per crop. Counting only the crops ahead, the admitted answers sat
        at the budget and their p99 went past the budget plus a batch (measured at twice capacity: p50 500 ms,
        p99 549-570 against 546). Nothing ahead of it: 0, whatever the time per crop. Refused at rest, a scene
        would wait no less, and a server that refuses at rest runs no pass to correct a figure one slow pass (a
        12 MP photo decoded on the batcher's thread) put past the budget: it refused every scene for good."""
        if self.load is None or not self.load.seconds_per_crop:
            return 0.0
        depth = max(self.load.outstanding, self.scenes_in_flight)
        if depth == 0:
            return 0.0
        return (depth + self.batch_max_size) * self.load.seconds_per_crop

    def refuse_draining(self) -> Unavailable:
        self.metrics.shed.labels(reason="draining").inc()
        return Unavailable("the service is shutting down; retry on another instance", retry_after_s=1)

    def begin(self, scene: bool = False) -> None:
        """An admitted API request starts; a scene counts toward the wait until `scene_answered`."""
        self.in_flight += 1
        self.scenes_in_flight += scene
        self.last_activity = time.monotonic()

    def scene_answered(self) -> None:
        """A scene's answer is out. Counted then, not when its request ends: a client's next scene can reach
        the door before the loop has finished the last one, and would be refused for the scene ahead of it
        that is already answered (at one request at a time, after a slow pass had raised the time per crop)."""
        self.scenes_in_flight -= 1

    def end(self) -> None:
        """An admitted API request ends (the drain waits for every one)."""
        self.in_flight -= 1
        self.last_activity = time.monotonic()
