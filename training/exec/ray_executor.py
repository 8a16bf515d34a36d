"""The Ray executor: Ray Data streams the image list through an actor pool that holds one model per actor.

Joins the cluster at `address` (or RAY_ADDRESS); without one it starts a local Ray for the job and stops it
afterwards. Nothing connects before the first job (`connect`). On a cluster with GPUs each actor takes one GPU
and runs torch there, decoding with as many threads as its node has CPUs per GPU; on CPUs the pool leaves one
CPU for the driver (an actor pool that takes every CPU deadlocks the job on a 2-core machine) and each actor
decodes with a few threads, then runs the batch job's runtime (OpenVINO over its own export, see
`training.model.batch_runtime`). An actor that dies is restarted and its batch retried (`max_restarts`,
`max_task_retries`), so a lost worker costs time, not results.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from training.data.stl import is_uri
from training.errors import Unavailable
from training.exec.executor import (
    EmbedChunk,
    EmbedJob,
    ImageItem,
    compute,
    decode_item,
    decoded_rows,
    empty_batch,
)
from training.model.batch_runtime import batch_runtime

LOG = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRIES = 3
CALLS_PER_ACTOR = 2  # batches one actor works on at once: one decoding while the other is in the model


def _ray():
    try:
        import ray  # optional: only the ray engine needs it (`pip install .[ray]`)
        import ray.data  # noqa: F401  (imports pandas/pyarrow: part of the ray extra)
    except ImportError as exc:
        raise Unavailable("the ray engine needs ray[data] (pip install 'ray[data]'); use --engine local") from exc
    return ray


class _EmbedActor:
    """One model per actor: built in __init__ (once, or again after a restart), used for every batch.

    Ray Data may run `CALLS_PER_ACTOR` calls of one actor at once (threads of the actor process): one call's
    images decode while another's batch is in the model, as the local executor's decode workers do beside its
    model. With one call at a time the actor alternated decode and compute, and the job ran at 0.59x the local
    engine's rate on the same 2 cores (benchmarks/bench_ray.py). The model itself runs in one thread of its own
    whichever call it serves: one torch OpenMP team, one OpenVINO infer request, batches one after another.
    """

    def __init__(self, job: EmbedJob, threads: int | None) -> None:
        ray = _ray()
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.job = job
        self.embedder = job.load(device)  # type: ignore[misc]  (shippable() checked it)
        self._stack = contextlib.ExitStack()
        self.runtime = self._stack.enter_context(batch_runtime(self.embedder, job.runtime, None, threads=threads))
        # PIL and numpy release the GIL while decoding and resizing, so threads keep the actor's cores busy.
        self.decoders = ThreadPoolExecutor(max(1, threads or 1), thread_name_prefix="stl-decode")
        self.model = ThreadPoolExecutor(1, thread_name_prefix="stl-model")
        self.decode = partial(decode_item, preprocess=self.embedder.preprocess)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [ImageItem(str(location), None if np.isnan(box[0]) else tuple(float(v) for v in box))
                 for location, box in zip(batch["location"], batch["bbox"], strict=True)]
        rows = empty_batch(len(items), self.embedder.preprocess)
        decoded = list(self.decoders.map(lambda row: self.decode(items[row], out=rows[row]), range(len(items))))
        good, stacked = decoded_rows(rows, decoded)
        values = None
        if stacked is not None:
            computed = self.model.submit(compute, self.runtime, stacked, self.job.output).result()
            values = np.zeros((len(items), computed.shape[1]), dtype=np.float32)
            values[good] = computed
        return {
            "position": np.asarray(batch["position"], dtype=np.int64),
            "values": values if values is not None else np.zeros((len(items), 1), dtype=np.float32),
            "ok": np.asarray([array is not None for array, _, _ in decoded]),
            "error": np.asarray([error or "" for _, error, _ in decoded], dtype=object),
            "transient": np.asarray([transient for _, _, transient in decoded]),
        }


_TEMP: tempfile.TemporaryDirectory | None = None


def _process_temp_dir() -> str:
    """One short temp dir for every local Ray this process starts, removed when the process exits.

    Short: Ray's unix sockets live under it and their paths must fit in 107 bytes. One per process, not per
    job: Ray Data keeps logging to its first session's log file, so that file must outlive the session.
    """
    global _TEMP
    if _TEMP is None:
        _TEMP = tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp")
    return _TEMP.name


def _cpus_per_gpu() -> int:
    """The fewest CPUs per GPU on any live node with GPUs (each GPU actor decodes with that many threads)."""
    ratios = [int(node["Resources"].get("CPU", 1)) // int(node["Resources"]["GPU"]) for node in _ray().nodes()
              if node.get("Alive") and node.get("Resources", {}).get("GPU")]
    return max(1, min(ratios, default=1))


class RayExecutor:
    """Use as a context manager: connects (or starts a local Ray) when the first job needs it, and disconnects
    (stops the local Ray it started) on exit."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, actors: int | None = None,
                 max_retries: int = DEFAULT_RETRIES, actor_class: type = _EmbedActor,
                 calls_per_actor: int = CALLS_PER_ACTOR) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self.actors = actors
        self.calls_per_actor = calls_per_actor
        self.max_retries = max_retries
        self.actor_class = actor_class
        self._started = False

    def __enter__(self) -> RayExecutor:
        # Nothing connects yet: a job whose steps are all done (a rerun of the pipeline, a head that is up to
        # date) never waits for a cluster, or starts a local Ray, that it does not use.
        return self

    def connect(self) -> None:
        """Join the cluster (or start a local Ray) unless this process is connected already; idempotent."""
        ray = _ray()
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a batch job
        try:
            if self.address:
                LOG.info("joining the Ray cluster at %s", self.address)
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                         _temp_dir=_process_temp_dir(), _node_ip_address="127.0.0.1")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise Unavailable(f"cannot start or join {where}: {exc}") from exc
        self._started = True
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            _ray().shutdown()
            self._started = False

    def pool(self) -> dict[str, Any]:
        """Actors, and per actor: GPUs, CPUs and decode/runtime threads, from the cluster's resources."""
        self.connect()
        resources = _ray().cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if gpus:
            # Decode threads: the CPUs beside each GPU (a GPU actor with one decoding thread waits on it).
            return {"actors": self.actors or gpus, "num_gpus": 1, "num_cpus": 1, "threads": _cpus_per_gpu()}
        actors = self.actors or max(1, cpus - 1)
        return {"actors": actors, "num_gpus": 0, "num_cpus": 1, "threads": max(1, cpus // actors)}

    def map_embed(self, job: EmbedJob, items: Sequence[ImageItem]) -> Iterator[EmbedChunk]:
        if not items:
            return
        ray = _ray()
        shipped, pool = job.shippable(), self.pool()
        LOG.info("ray: %d items through %d actor(s) (%s)", len(items), pool["actors"], pool)
        # Absolute paths: a worker's working directory is not the driver's (another machine, or Ray's own).
        rows = [{"position": position, "location": item.location if is_uri(item.location) else
                 os.path.abspath(item.location),
                 "bbox": np.asarray(item.bbox if item.bbox is not None else (np.nan,) * 4, dtype=np.float64)}
                for position, item in enumerate(items)]
        blocks = max(1, min(math.ceil(len(items) / job.batch_size), 4096))
        with warnings.catch_warnings():
            # Ray Data's own default is to restart actors and retry their batches forever, which turns a
            # deterministic crash (a poisoned image that segfaults the decoder) into a hang: we bound both,
            # through the remote args Ray 2.60 still takes (it warns that 2.64 drops them).
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                self.actor_class,
                fn_constructor_args=(shipped, pool["threads"]),
                batch_size=job.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool["actors"],
                                                   max_concurrent_calls_per_actor=self.calls_per_actor,
                                                   enable_true_multi_threading=self.calls_per_actor > 1),
                num_cpus=pool["num_cpus"],
                num_gpus=pool["num_gpus"] or None,
                max_restarts=self.max_retries,
                max_task_retries=self.max_retries,
            )
        for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            ok = out["ok"].astype(bool)
            errors = [(int(position), str(error), bool(transient)) for position, error, transient, good
                      in zip(out["position"], out["error"], out["transient"], ok, strict=True) if not good]
            yield EmbedChunk(out["position"][ok], np.asarray(out["values"][ok], dtype=np.float32), errors)

    def map_tasks(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]]) -> list[T]:
        self.connect()
        ray = _ray()
        remote = ray.remote(max_retries=self.max_retries, num_cpus=1)(fn)
        return ray.get([remote.remote(*call) for call in args])
