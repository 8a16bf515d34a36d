"""Dynamic batching: crops of concurrent requests are embedded together in one forward pass.

One worker thread runs every forward pass, so the model (on the GPU when present) is only ever used
by one thread, and torch's intra-op threads are not split between competing requests. Callers get a
future. Under load, requests pile up while a batch runs and the next batch takes all of them at once;
`max_wait_s` additionally waits a little for stragglers, but only once traffic is concurrent, so a
lone request pays no waiting time.

A job's crop is either a ready tensor or a function that makes one (decode + crop), which the worker
then runs just before the forward pass. The service passes functions on a CPU: the forward pass
already uses every core, so decoding beside it in other threads only preempts its OpenMP threads,
and each handoff between threads costs latency (measured on 2 cores: p50 at concurrency 1 went from
1.42x to 1.27x the bare embedder, and concurrency 32 from ~83 to ~90 req/s). On a GPU the crops are
made in a thread pool instead, so decoding overlaps the GPU's forward pass. For the same reason a job
can carry a `finish` step (the index search) that the worker runs on its vector.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.embedder import Embedder

LOG = logging.getLogger(__name__)

# A [3, S, S] tensor from `embedder.transform`, or a function the worker calls to make it.
Crop = torch.Tensor | Callable[[], torch.Tensor]


class BatcherClosed(RuntimeError):
    pass


@dataclass
class _Job:
    embedder: Embedder
    crop: Crop
    finish: Callable[[np.ndarray], Any] | None = None  # run on the vector in the worker; its result is the job's
    future: Future = field(default_factory=Future)


class Batcher:
    """Queue of scene crops -> one worker thread -> `embedder.embed_batch(stack, "scene")`."""

    def __init__(
        self,
        max_size: int = 32,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
        name: str = "stl-batcher",
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, embedder: Embedder, crop: Crop, finish: Callable[[np.ndarray], Any] | None = None) -> Future:
        """Future of the crop's [dim] float32 unit vector, or of `finish(vector)` (run in the worker) when given;
        or of the exception that making the crop, embedding or finishing raised."""
        job = _Job(embedder, crop, finish)
        with self._lock:  # so that no job slips in behind the stop sentinel
            if self._closed:
                raise BatcherClosed("the batcher is shut down")
            self._queue.put(job)
        return job.future

    async def embed(self, embedder: Embedder, crop: Crop, finish: Callable[[np.ndarray], Any] | None = None) -> Any:
        # wrap_future: the event loop waits without blocking; cancelling the request cancels the job.
        return await asyncio.wrap_future(self.submit(embedder, crop, finish))

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then stop the worker."""
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
        last_size = 1
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first, concurrent_traffic=last_size > 1)
            last_size = len(batch)
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        # After a hot reload, jobs for the old and the new embedder can share a batch: one pass each.
        groups: dict[int, list[tuple[_Job, torch.Tensor]]] = {}
        for job in batch:
            # Jobs whose request went away are dropped before paying for their forward pass.
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                crop = job.crop() if callable(job.crop) else job.crop
            except Exception as exc:  # that caller's bad image (a 4xx for it), not the batch's problem
                job.future.set_exception(exc)
                continue
            groups.setdefault(id(job.embedder), []).append((job, crop))
        for group in groups.values():
            jobs = [job for job, _ in group]
            try:
                vectors = jobs[0].embedder.embed_batch(torch.stack([crop for _, crop in group]), "scene")
            except Exception as exc:  # handed to each caller, who falls back; the worker keeps going
                LOG.exception("embedding a batch of %d crops failed", len(jobs))
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(jobs))
            for job, vector in zip(jobs, vectors, strict=True):
                try:
                    job.future.set_result(vector if job.finish is None else job.finish(vector))
                except Exception as exc:  # that caller's search failed: its own fallback, not the batch's
                    job.future.set_exception(exc)
