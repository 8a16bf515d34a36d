"""Process tuning for the serving process, in one place: OpenMP spin, malloc thresholds, thread roles.

Every setting here was measured on our 2-core CPU machines (numbers beside each). Nothing heavy is
imported at module level: `python -m service` calls `default_openmp_spin()` before anything imports
torch, and libgomp reads GOMP_SPINCOUNT only once, when torch is first imported.

Thread roles. torch runs a CPU op on an OpenMP team owned by the calling thread, and the team lives
as long as that thread. Once the process holds more OpenMP threads than the machine has cores,
libgomp cuts its spin-waiting short for every team, and each of the forward pass's many parallel
regions then pays a sleep and a wake-up. Measured on 2 cores (efficientnet_lite0, one crop, batcher
thread): 9.7 ms when it owns the only team, 15.7 ms when a long-lived pool thread that once loaded
(traced and warmed up) the model keeps a second one. So: the batcher's primary thread is the one
long-lived thread with a full team; its helpers run single-threaded (a team of one starts no OpenMP
threads); loads run in a thread of their own (`run_in_own_thread`) whose team goes away when it ends;
faiss searches are held to a few threads around each call (`FaissThreads`).

glibc malloc. Every forward pass allocates and frees the same tens of megabytes of activations. With
glibc's defaults, blocks above the mmap threshold are mapped and unmapped on every pass, and freed
memory at the top of a thread's heap is handed back to the kernel, so the next pass page-faults all of
it in again. Whether a long-lived process ends up in that state depends on the order of its first
allocations (glibc moves the thresholds as it goes), so two starts of the same server differ: measured
on 2 cores at concurrency 32, some instances faulted ~2,560 pages per request and served 71-74 req/s,
others faulted none and served 93-96. Fixed thresholds (`retain_freed_memory`) make every start the
fast one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# After each parallel region OpenMP threads spin-wait, 300,000 rounds by default, which suits a tight loop
# of forward passes but in a server keeps a core busy after every batch while the same cores must decode
# uploads and answer HTTP. 20,000 still spans the gaps inside one forward pass. Measured on 2 cores, 4
# runs: concurrency 32 at 88-93 req/s vs 75-84 with the default.
GOMP_SPINCOUNT = "20000"

# mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The allocator's own environment variables; when an operator sets one, theirs wins.
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

MMAP_THRESHOLD = 64 * 1024 * 1024  # a batch of a few crops' activations stays on the heap
TRIM_THRESHOLD = 512 * 1024 * 1024  # free memory a heap may keep before giving it back


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when applied.

    A no-op (False) off Linux/glibc, and when MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_ is set.
    The cost is resident memory: a process keeps up to its peak working set instead of returning it.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not applied:
        LOG.warning("glibc refused malloc thresholds mmap=%d trim=%d", mmap_threshold, trim_threshold)
    return applied


def default_openmp_spin() -> None:
    """Set GOMP_SPINCOUNT (unless an operator did): call before anything imports torch, which reads it once."""
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


def set_torch_threads(threads: int) -> None:
    """torch's intra-op thread count for the threads that start after this call (0: keep torch's default)."""
    if threads > 0:
        import torch  # here, not at module level: this module is read before torch may be imported

        torch.set_num_threads(threads)


def torch_threads() -> int:
    """torch's intra-op thread count (imports torch: call only when torch runs the forward pass)."""
    import torch  # here, not at module level: a process serving an exported model never imports torch

    return torch.get_num_threads()


def set_thread_torch_threads(threads: int) -> None:
    """The calling thread's torch intra-op threads (the batcher's workers: see service/batching.py)."""
    import torch

    torch.set_num_threads(threads)


def start_own_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """Run `fn` in a new daemon thread that exits when it returns; a future of its result."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def run_in_own_thread(fn: Callable[[], T], name: str) -> T:
    """Await `fn` run in a thread of its own, whose OpenMP team ends with it; the event loop stays free."""
    return await asyncio.wrap_future(start_own_thread(fn, name))


class FaissThreads:
    """Runs a call with faiss held to `threads` OpenMP threads (0: faiss's default), restored afterwards.

    A search is one vector: parallelism comes from concurrent requests, and a thread that searched with
    an OpenMP team of its own would leave that team spinning on the cores the forward pass needs (seen
    as a native thread burning ~1 ms of CPU per request). Set and restored around each call, not once per
    thread: on the batcher's thread a lasting limit would also bind torch's forward pass wherever torch
    and faiss share one OpenMP runtime. The limit is per calling thread, so one instance serves them all.
    """

    def __init__(self, threads: int) -> None:
        import faiss  # here, not at module level: this module is read before torch may be imported

        self.threads = threads
        self._get, self._set = faiss.omp_get_max_threads, faiss.omp_set_num_threads

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.threads <= 0:
            return fn(*args)
        previous = self._get()
        self._set(self.threads)
        try:
            return fn(*args)
        finally:
            self._set(previous)
