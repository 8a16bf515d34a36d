"""Dynamic batching: the per-request stages of concurrent requests, their forward passes shared.

The batcher drives a model's three stages (michaelfeil/infinity's shape): `encode_pre(item)` makes
one request's [3, S, S] float32 crop (decode + crop; numpy, no torch), `encode_core(batch)` embeds a
stack of crops in one forward pass, `encode_post(item, vector)` finishes one request (the index
search). A caller awaits `run(model, item)` and gets `encode_post`'s result, or the exception one of
its stages raised; a failing `encode_pre` or `encode_post` fails only its own job, a failing
`encode_core` every job of that pass.

Where `encode_pre` and `encode_post` run is the deployment's choice, made once when the batcher is
built. Without a pool the worker runs all three in one go: each handoff between threads costs latency
(measured on 2 cores with torch: p50 at concurrency 1 went from 1.42x to 1.27x the bare embedder). With a
pool (on a GPU) they run in the pool, so decoding overlaps the GPU's forward pass. With a pool and
`inline_when_idle` (OpenVINO or ONNX Runtime on a CPU) a request that finds the batcher idle is run by the
worker in one go, the quickest answer to a lone request, and under load the pool decodes and searches
while the worker's forward pass runs: on 2 cores the one-threaded decode then no longer leaves a core idle
between passes (measured, OpenVINO, concurrency 32: 144-145 req/s against 133-135 with every stage on the
worker; at concurrency 1, 7.9-8.3 ms against 8.7-9.3 with every request through the pool).

`run_stack(model, crops)` embeds the several crops of one request (the items of one photo, /shop) in one
forward pass and returns their vectors; it has no pre or post step.

A primary worker thread takes every job from the queue. Under load, requests pile up while a batch
runs and the next batch takes all of them at once; `max_wait_s` additionally waits a little for
stragglers, but only once traffic is concurrent, so a lone request pays no waiting time.

On a CPU with torch the batcher can have helper workers (`workers` > 1). A lone request is embedded by the
primary with all of torch's intra-op threads, which is the fastest way to answer it. When more jobs
wait than the primary's batch takes, helpers take batches from the queue too, and the primary runs
its own on a single thread until traffic is light again: N independent single-threaded forward passes
keep N cores busy with no OpenMP barriers between them, where one pass split over N threads stalls
whenever the event loop preempts one of its threads (and a small model scales poorly over threads).
Measured on 2 cores, efficientnet_lite0 in batches of 4: two single-threaded workers 112-125
crops/s, one two-threaded 98-100. Helpers never create OpenMP teams of their own, so the process
still has one team (see service/process.py). The batcher sets those thread counts through `set_threads`
(torch's, given by the engine). OpenVINO is the other way round: its own thread pool runs one pass over
all cores without OpenMP barriers, and the engine gives it one worker with every thread. (Two single-threaded
workers on one compile ran 152-170 crops/s against 322-325, batches of 4 on 2 cores: one stream runs its
requests one at a time. Compiled into 2 streams, two workers side by side were tried in the service and
gave no more at concurrency 32, 158 vs 164 req/s, for 150 MiB more RSS.) On a GPU there is one worker: the
GPU is the bottleneck.

Admission control (service/admission.py) reads the batcher's load: `outstanding` jobs (queued or in a
pass) times `seconds_per_crop`, a moving average of how long a crop takes through the workers. While a
backlog lasts it is the time between the ends of passes over their crops: the throughput actually
delivered, whatever shares the cores (passes "side by side" on a busy machine are not twice as fast: the
per-pass figure read 17.7 ms a crop where 26 were delivered). Without a backlog it is a pass's time over
its size and over the passes running beside it. A job may carry a deadline: one whose deadline
has passed when a worker takes it is dropped before its forward pass (`JobExpired`), as is one whose caller
went away (its future cancelled); `on_drop(reason)` counts both.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

LOG = logging.getLogger(__name__)


class Stages(Protocol):
    """What the batcher drives; jobs of one model object share forward passes."""

    def encode_pre(self, item: Any) -> np.ndarray:
        """One request's [3, S, S] float32 crop."""
        ...

    def encode_core(self, batch: np.ndarray) -> np.ndarray:
        """[B, dim] vectors of a [B, 3, S, S] stack of crops."""
        ...

    def encode_post(self, item: Any, vector: np.ndarray) -> Any:
        """One request's answer from its vector."""
        ...


class BatcherClosed(RuntimeError):
    pass


class JobExpired(RuntimeError):
    """The job's deadline passed while it waited in the queue: it was dropped, never embedded."""


# Weight of the newest pass in the moving average of the time per crop: about the last 10 passes count. Until
# 10 passes are timed it is their plain mean (weight 1/n). Started from the first pass alone, the average
# carried a fresh process's first pass (a lone request's cold decode, search and forward: 44 ms against ~6
# after) for dozens of passes, and admission multiplies it by the queue: at concurrency 32 a fresh server
# refused ~92 % of requests for ~10 s, its refusals leaving too few passes to bring the figure down.
_SPEED_WEIGHT = 0.1


@dataclass
class _Job:
    model: Stages
    item: Any
    crop: np.ndarray | None = None  # made already (in the pool); None: the worker runs encode_pre
    stacked: bool = False  # `crop` is a [N, 3, S, S] stack of one request's crops, embedded in the same pass
    finish: bool = True  # the worker runs encode_post; False: the job's result is the vector
    deadline: float | None = None  # time.monotonic() after which the job is dropped unembedded
    future: Future = field(default_factory=Future)
    settled: bool = False  # counted out of the outstanding crops (Batcher._settle), under the batcher's lock


class Batcher:
    """Queue of jobs -> worker threads -> `model.encode_core(stack)`, each job's pre and post steps around it."""

    def __init__(
        self,
        max_size: int = 32,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        name: str = "stl-batcher",
        workers: int = 1,
        threads: int = 1,
        pool: Executor | None = None,
        set_threads: Callable[[int], None] | None = None,
        inline_when_idle: bool = False,
    ) -> None:
        """`workers` > 1 adds single-threaded helpers for concurrent load (CPU only); `threads` is the
        primary's intra-op thread count when it runs alone, and `set_threads(n)` sets the calling thread's
        (torch's `set_num_threads`; None: the runtime keeps its own threads); `pool`
        runs `run`'s pre and post steps (None: the worker runs them, just before and after the pass), but
        with `inline_when_idle` only while other jobs are outstanding (an idle batcher's worker runs them);
        `on_drop("expired" | "cancelled")` is told of each job dropped before its pass."""
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._on_batch = on_batch
        self._on_drop = on_drop
        self.pool = pool
        self.inline_when_idle = inline_when_idle and pool is not None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._threads = max(1, threads)
        self._set_threads = set_threads
        # Set while jobs queue up faster than the primary takes them: helpers take batches only then, so
        # a lone request is never left to a single-threaded helper.
        self._concurrent = threading.Event()
        self._helpers_busy = 0
        self._outstanding = 0  # jobs put and not yet finished (or dropped); changed under _lock
        self._passes = 0  # workers inside _process now
        self._seconds_per_crop: float | None = None  # None until the first pass is timed
        self._passes_timed = 0
        self._last_done: float | None = None  # when the last pass ended, if it left work queued behind it
        self._helpers = [threading.Thread(target=self._help, name=f"{name}-{n}", daemon=True)
                         for n in range(1, workers)]
        for helper in self._helpers:
            helper.start()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def outstanding(self) -> int:
        """Jobs queued or in a forward pass now."""
        return self._outstanding

    @property
    def seconds_per_crop(self) -> float | None:
        """Recent time per crop through all workers together (None before the first pass)."""
        return self._seconds_per_crop

    def expected_wait_s(self) -> float:
        """How long a job put now would wait for the jobs ahead of it (0 before the first pass is timed)."""
        return self._outstanding * (self._seconds_per_crop or 0.0)

    def submit(self, model: Stages, item: Any, deadline: float | None = None) -> Future:
        """Future of `model.encode_post(item, vector)`, all three stages run by the worker; or of the
        exception one of them raised (JobExpired when `deadline`, a time.monotonic(), passed in the queue)."""
        return self._put(_Job(model, item, deadline=deadline))

    async def run(self, model: Stages, item: Any, deadline: float | None = None) -> Any:
        """`item`'s answer through the three stages, the pre and post steps wherever this batcher runs them."""
        # wrap_future: the event loop waits without blocking; cancelling the request cancels the job.
        if self.pool is None or (self.inline_when_idle and self._outstanding == 0):
            return await asyncio.wrap_future(self.submit(model, item, deadline))
        loop = asyncio.get_running_loop()
        crop = await loop.run_in_executor(self.pool, model.encode_pre, item)
        vector = await asyncio.wrap_future(self._put(_Job(model, item, crop, finish=False, deadline=deadline)))
        return await loop.run_in_executor(self.pool, model.encode_post, item, vector)

    async def run_stack(self, model: Stages, crops: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """[N, dim] vectors of one request's [N, 3, S, S] crops (the items of one photo), embedded in one pass
        (with whatever other jobs share it); no pre or post step."""
        job = _Job(model, None, np.ascontiguousarray(crops), finish=False, deadline=deadline, stacked=True)
        return await asyncio.wrap_future(self._put(job))

    def _put(self, job: _Job) -> Future:
        with self._lock:  # so that no job slips in behind the stop sentinel
            if self._closed:
                raise BatcherClosed("the batcher is shut down")
            self._outstanding += _crops(job)
            self._queue.put(job)
        return job.future

    def _settle(self, job: _Job) -> None:
        """Count the job out of the outstanding crops before its caller hears back. Counted at the end of the
        pass instead, a client's next request (one at a time) could find the batcher still counting the job it
        was just answered for: sent to the pool instead of the idle worker, or refused by admission."""
        with self._lock:
            self._count_out(job)

    def _count_out(self, job: _Job) -> None:
        """`_settle`'s bookkeeping; the caller holds the lock."""
        if not job.settled:
            job.settled = True
            self._outstanding -= _crops(job)

    def _drop(self, job: _Job, reason: str) -> None:
        self._settle(job)
        if reason == "expired":
            job.future.set_exception(JobExpired("the request's deadline passed while it waited in the queue"))
        if self._on_drop is not None:
            self._on_drop(reason)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then stop the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self, first: _Job, concurrent_traffic: bool) -> tuple[list[_Job], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + (self.max_wait_s if concurrent_traffic else 0.0)
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _run(self) -> None:
        """The primary worker: every job when traffic is light, its share of them under load."""
        last_size, threads = 1, 0
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch, stop = self._collect(first, concurrent_traffic=last_size > 1)
                last_size = len(batch)
                if self._helpers:
                    if not self._queue.empty():
                        self._concurrent.set()
                    elif len(batch) == 1:  # light traffic again (a batch of one, nothing behind it)
                        self._concurrent.clear()
                    # While helpers run, one thread here as well: more threads than cores would stall this
                    # pass's OpenMP barriers. Alone, all of them: the quickest answer to a lone request.
                    wanted = 1 if self._concurrent.is_set() or self._helpers_busy else self._threads
                    if wanted != threads and self._set_threads is not None:
                        self._set_threads(wanted)
                        threads = wanted
                self._process(batch)
                if stop:
                    return
        finally:
            self._concurrent.set()  # wake idle helpers so that they see the batcher is closed
            for helper in self._helpers:
                helper.join(10.0)
            self._drain()

    def _drain(self) -> None:
        """Embed what is still queued after the stop sentinel (jobs a helper handed back as it closed)."""
        leftovers = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftovers.append(job)
        for start in range(0, len(leftovers), self.max_size):
            self._process(leftovers[start:start + self.max_size])

    def _help(self) -> None:
        """A helper worker: single-threaded, takes batches only while the primary has a backlog."""
        single = False
        while True:
            self._concurrent.wait()
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if first is None:
                self._queue.put(None)  # the stop sentinel is the primary's: it ends last
                return
            if not self._concurrent.is_set():
                # Traffic turned light while this helper waited: a lone request is the primary's to answer
                # with all its threads. (Handed back behind a stop sentinel, the primary drains it.)
                self._queue.put(first)
                continue
            batch, stop = self._collect(first, concurrent_traffic=False)  # what is queued, no waiting
            if len(batch) == 1 and self._queue.empty():
                self._concurrent.clear()  # light traffic again: the next lone request is the primary's
            if not single and self._set_threads is not None:  # a team of one: OpenMP starts no threads for it
                self._set_threads(1)
                single = True
            with self._lock:
                self._helpers_busy += 1
            try:
                self._process(batch)
            finally:
                with self._lock:
                    self._helpers_busy -= 1
            if stop:
                self._queue.put(None)
                return

    def _process(self, batch: list[_Job]) -> None:
        with self._lock:
            self._passes += 1
            beside = self._passes  # passes running at once share the cores: each crop's share of the time
        started = time.perf_counter()
        embedded = 0
        try:
            embedded = self._embed(batch)
        except Exception as exc:  # a bug in the bookkeeping must fail these jobs, not kill the worker and hang them
            LOG.exception("a batch of %d jobs failed outside its stages", len(batch))
            for job in batch:
                if not job.future.done():
                    self._settle(job)
                    job.future.set_exception(exc)
        finally:
            ended = time.perf_counter()
            with self._lock:
                self._passes -= 1
                for job in batch:  # those no stage answered (a bug's way out); the rest are counted out already
                    self._count_out(job)
                if embedded:
                    # Busy since the last pass ended: the workers delivered `embedded` crops in that interval.
                    sample = ((ended - self._last_done) if self._last_done is not None
                              else (ended - started) / beside) / embedded
                    self._passes_timed += 1
                    weight = max(_SPEED_WEIGHT, 1.0 / self._passes_timed)
                    last = self._seconds_per_crop
                    self._seconds_per_crop = sample if last is None else last + weight * (sample - last)
                self._last_done = ended if self._outstanding > 0 else None

    def _embed(self, batch: list[_Job]) -> int:
        """Run the batch's stages; the number of crops that went through a forward pass."""
        # After a hot reload, jobs for the old and the new model can share a batch: one pass each.
        groups: dict[int, list[tuple[_Job, np.ndarray]]] = {}
        now = time.monotonic()
        embedded = 0
        for job in batch:
            # Jobs whose request went away, or whose deadline passed, are dropped before paying for their pass.
            if not job.future.set_running_or_notify_cancel():
                self._drop(job, "cancelled")
                continue
            if job.deadline is not None and now > job.deadline:
                self._drop(job, "expired")
                continue
            try:
                crop = job.model.encode_pre(job.item) if job.crop is None else job.crop
            except Exception as exc:  # that caller's bad image (a 4xx for it), not the batch's problem
                self._settle(job)
                job.future.set_exception(exc)
                continue
            groups.setdefault(id(job.model), []).append((job, crop))
        for group in groups.values():
            jobs = [job for job, _ in group]
            counts = [_crops(job) for job in jobs]
            try:
                stack = (np.stack([crop for _, crop in group]) if not any(job.stacked for job in jobs)
                         else np.concatenate([crop if job.stacked else crop[None] for job, crop in group]))
                vectors = jobs[0].model.encode_core(stack)
            except Exception as exc:  # handed to each caller, who falls back; the worker keeps going
                LOG.exception("embedding a batch of %d crops failed", len(jobs))
                for job in jobs:
                    self._settle(job)
                    job.future.set_exception(exc)
                continue
            embedded += len(stack)
            if self._on_batch is not None:
                self._on_batch(len(stack))
            starts = np.cumsum([0, *counts[:-1]])
            for job, start, count in zip(jobs, starts, counts, strict=True):
                if job.stacked:
                    self._settle(job)
                    job.future.set_result(vectors[start:start + count])
                    continue
                vector = vectors[start]
                try:
                    result = job.model.encode_post(job.item, vector) if job.finish else vector
                except Exception as exc:  # that caller's search failed: its own fallback, not the batch's
                    self._settle(job)
                    job.future.set_exception(exc)
                else:
                    self._settle(job)
                    job.future.set_result(result)
        return embedded


def _crops(job: _Job) -> int:
    """How many crops a job puts through the forward pass."""
    return len(job.crop) if job.stacked and job.crop is not None else 1
