"""Replicas follow the index: with STL_RELOAD_POLL_S > 0 each process looks at the artifact root's `current`
link every so often and, when it has moved, switches to the version it names with the swap of
`POST /admin/reload` (`Engine.reload`: loaded fully in a thread of its own, swapped in one assignment, every
request served meanwhile). N replicas sharing one read-only artifact volume then all move to a newly
published version without anyone calling each.

The follower acts on moves of `current`, not on every difference from the served version: a version chosen
with `/admin/reload?version=` stays until `current` moves again, and a version whose reload failed is not
retried until then (a corrupt version would otherwise be loaded again at every look, each time reading it
from disk beside the served one in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from prometheus_client import Counter, Gauge

from service.admission import Admission
from service.engine import Engine
from service.metrics import Metrics
from service.versions import ReloadRefused

LOG = logging.getLogger(__name__)

# Each wait is this range times STL_RELOAD_POLL_S, drawn anew: replicas started together drift apart, so
# they do not all load a new version (disk reads on a shared volume, CPU) at the same instant.
JITTER = (0.5, 1.5)


class FollowMetrics:
    """On /metrics: whether the follower is on, that it is alive, and what `current` named at its last look."""

    def __init__(self, metrics: Metrics, poll_s: float) -> None:
        self.poll_s = Gauge("stl_reload_poll_seconds", "STL_RELOAD_POLL_S: how often `current` is looked at; 0: off",
                            registry=metrics.registry)
        self.looks = Counter("stl_reload_poll_looks", "Looks at the `current` link", registry=metrics.registry)
        self.seen = Gauge("stl_reload_poll_seen_info", "1 for the version `current` named at the last look",
                          ["version"], registry=metrics.registry)
        self.poll_s.set(poll_s)

    def saw(self, version: str | None) -> None:
        self.looks.inc()
        self.seen.clear()
        self.seen.labels(version=version or "none").set(1)


class Follower:
    """The poll task of one app: `start()` in its lifespan, `await stop()` before the engine closes."""

    def __init__(self, engine: Engine, admission: Admission, poll_s: float, metrics: FollowMetrics,
                 rng: random.Random | None = None) -> None:
        self.engine = engine
        self.admission = admission
        self.poll_s = poll_s
        self.metrics = metrics
        self.rng = rng if rng is not None else random.Random()
        # What `current` named at the last look. None at first, so the first look compares with the served
        # version: a publish during the start-up load is followed too.
        self.seen: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._reloading = False
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        LOG.info("following %s/current about every %.3g s", self.engine.holder.artifacts, self.poll_s)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stl-follow")

    async def stop(self) -> None:
        """Stop looking. A reload under way is let finish: its load thread cannot be cancelled, and the
        engine must not close under it."""
        self._stopping = True
        if self._task is None:
            return
        if not self._reloading:
            self._task.cancel()  # asleep or reading the link: nothing to finish
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while not self._stopping:  # set while a reload ran: stop without sleeping again
            await asyncio.sleep(self.poll_s * self.rng.uniform(*JITTER))
            if self.admission.draining:  # a drain ends in an exit: loading a version now is waste
                LOG.info("draining: no longer following %s/current", self.engine.holder.artifacts)
                return
            await self.look()

    async def look(self) -> None:
        """One look at `current`; a reload when it moved to a version that is not served."""
        holder = self.engine.holder
        if holder.loading:
            return  # the start-up load reads `current` itself
        try:
            # Off the loop: on a network volume even a readlink can hang, and requests must not wait on it.
            published = await asyncio.to_thread(holder.published_version)
        except OSError as exc:
            LOG.warning("cannot read %s/current, still serving what is loaded: %s", holder.artifacts, exc)
            return
        self.metrics.saw(published)
        moved, self.seen = published != self.seen, published
        served = holder.current
        if published is None or not moved or (served is not None and served.version == published):
            return
        self._reloading = True
        try:
            await self.engine.reload(published)
        except ReloadRefused as exc:  # counted by the holder; the served version stays
            LOG.error("current moved to %s but it cannot be served (%s); retried only when current moves again",
                      published, exc)
        except Exception:  # a bug rather than a bad version: counted, and the follower keeps following
            self.engine.metrics.reloads.labels(outcome="failed").inc()
            LOG.exception("reloading version %s failed; retried only when current moves again", published)
        finally:
            self._reloading = False
