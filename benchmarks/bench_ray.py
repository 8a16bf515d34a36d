"""The Ray engine against the local one on the same machine: throughput, overhead ratio, per-actor rate, and a
projection (on paper) of a 10M-image catalogue on N GPUs from the measured figures.

    .venv/bin/python benchmarks/bench_ray.py [--images 1536] [--rounds 3] [--backbone efficientnet_lite0]

Every engine runs the same job (`training.exec`: backbone features of 320x320 product JPEGs, runtime auto =
OpenVINO on a CPU) through `map_embed`, over half the images and then all of them: "marginal" is the extra
images over the extra seconds, so fixed costs (model load, export, compile, Ray's actor start) cancel out;
"end_to_end" includes them (Ray's own start is reported apart). Ray Data hands results over in bursts, so a
rate timed from the first chunk would flatter it; "steady" is timed from the chunk that crosses a quarter of
the images to the last one, of the run over all of them. "cpu_ms_per_image_marginal" is the CPU time of this
process and every descendant (decode workers; a local Ray's daemons and workers) per extra image: what an
engine costs whatever share of the cores other processes leave it, so its ratio holds on a loaded machine.

The engines take turns, round after round (local, Ray with one call per actor at a time: the old actor, Ray
with `CALLS_PER_ACTOR` calls: decode beside compute), so load from other processes lands on all of them alike;
ratios are per round, and the median is reported with the load average each measurement saw.
Prints each number and writes benchmarks/results/ray.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from bench_index import make_catalogue

from training.data.stl import STLDataset
from training.exec.executor import EmbedJob, ImageItem, LocalExecutor, decode_item
from training.exec.ray_executor import CALLS_PER_ACTOR, RayExecutor
from training.fit.features import backbone_loader

RESULTS = Path(__file__).parent / "results" / "ray.json"
CATALOGUE = 10_000_000
KINDS = ("marginal", "steady", "end_to_end")
IDLE_SECONDS = 5.0


class CpuMeter:
    """CPU seconds (user + system) of this process and its descendants (decode workers; a local Ray's daemons and
    worker processes, all started from here) while the block runs, sampled every `interval` s from /proc.

    Sampled, not read once at the end: Ray's actor processes exit when a dataset finishes and nobody's cutime
    gets their time. A process that exits loses at most its last interval."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.seconds = 0.0
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()

    def _sample(self) -> dict[int, float]:
        parents, times = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # exited meanwhile
                parents[int(entry)] = int(fields[1])
                times[int(entry)] = (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime
        mine, found = os.getpid(), {}
        for pid, seconds in times.items():
            ancestor = pid
            while ancestor > 1 and ancestor != mine:
                ancestor = parents.get(ancestor, 0)
            if ancestor == mine:
                found[pid] = seconds
        return found

    def _watch(self) -> None:
        start = self._sample()
        last = dict(start)
        while not self._stop.wait(self.interval):
            last.update(self._sample())
        last.update(self._sample())
        self.seconds = sum(seconds - start.get(pid, 0.0) for pid, seconds in last.items())

    def __enter__(self) -> CpuMeter:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        time.sleep(self.interval)  # the first sample is taken before the work starts
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def run(executor, job: EmbedJob, items: list[ImageItem]) -> tuple[float, float, float, np.ndarray]:
    """(seconds, CPU seconds, steady images/s, values in item order) of one map_embed over `items`.

    Steady: images from the chunk that crosses a quarter of them to the last, over that time; the model's
    load and compile (and Ray's actor start) lie before it."""
    with CpuMeter() as meter:
        seconds, steady, values = _timed(executor, job, items)
    return seconds, meter.seconds, steady, values


def _timed(executor, job: EmbedJob, items: list[ImageItem]) -> tuple[float, float, np.ndarray]:
    started = time.perf_counter()
    values: np.ndarray | None = None
    done, quarter = 0, None
    for chunk in executor.map_embed(job, items):
        if values is None:
            values = np.zeros((len(items), chunk.values.shape[1]), dtype=np.float32)
        values[chunk.positions] = chunk.values
        done += len(chunk.positions)
        if quarter is None and done >= len(items) // 4:
            quarter = (done, time.perf_counter())
    assert done == len(items) and values is not None and quarter is not None, f"{done} of {len(items)} embedded"
    finished = time.perf_counter()
    steady = (done - quarter[0]) / max(finished - quarter[1], 1e-9)
    return finished - started, steady, values


def engine_rates(executor, job: EmbedJob, items: list[ImageItem]) -> tuple[dict, np.ndarray]:
    load_before = os.getloadavg()[0]
    half = len(items) // 2
    half_seconds, half_cpu, _, _ = run(executor, job, items[:half])
    seconds, cpu, steady, values = run(executor, job, items)
    return {"images_per_second_marginal": round((len(items) - half) / max(seconds - half_seconds, 1e-9), 2),
            "images_per_second_steady": round(steady, 2),
            "images_per_second_end_to_end": round(len(items) / seconds, 2),
            # CPU per image over the extra images: the engine's cost whatever share of the cores it got.
            "cpu_ms_per_image_marginal": round(1000 * (cpu - half_cpu) / (len(items) - half), 3),
            "seconds_half": round(half_seconds, 2), "seconds_all": round(seconds, 2),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}, values


def decode_rate(items: list[ImageItem], job: EmbedJob, threads: int) -> float:
    """Images per second decoded + cropped + normalised by `threads` threads of one process (no model)."""
    decode = partial(decode_item, preprocess=job.loaded.preprocess)  # type: ignore[union-attr]
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(decode, items))
        return len(items) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="local engine's decoding workers")
    parser.add_argument("--gpus", default="1,8,64", help="GPU counts to project the 10M catalogue on")
    parser.add_argument("--cpus-per-gpu", type=int, default=8,
                        help="CPUs beside each GPU in the projection (a GPU actor's decode threads)")
    parser.add_argument("--gpu-speedup", type=float, default=None,
                        help="measured GPU actor / CPU actor ratio, if you have one; without it only the "
                             "decode-bound ceiling of a GPU actor is projected")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load = backbone_loader(args.backbone)
    variants = {"ray_one_call": 1, "ray": CALLS_PER_ACTOR}
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        dataset = STLDataset.open(make_catalogue(Path(scratch) / "data", args.images))
        items = [ImageItem(dataset.product_location(pid)) for pid in dataset.catalogue()]
        job = EmbedJob("features", load, "auto", args.batch_size, loaded=load("cpu"))
        decode_one_thread = decode_rate(items, job, 1)
        ray_started = time.perf_counter()
        with RayExecutor() as session:
            session.connect()
            ray_init = time.perf_counter() - ray_started
            pool = session.pool()
            with CpuMeter() as idle:  # what a connected, idle local Ray costs (its daemons), per second
                time.sleep(IDLE_SECONDS)
            ray_idle_cpu = idle.seconds / IDLE_SECONDS
            for number in range(args.rounds):
                result, reference = engine_rates(LocalExecutor(args.workers), job, items)
                measured = {"local": result}
                for name, calls in variants.items():
                    with RayExecutor(calls_per_actor=calls) as executor:  # joins the session above
                        measured[name], values = engine_rates(executor, job, items)
                    measured[name]["max_abs_difference"] = float(np.max(np.abs(values - reference)))
                for name in variants:
                    for kind in KINDS:
                        key = f"images_per_second_{kind}"
                        measured[f"ratio_{name}_{kind}"] = round(measured[name][key] / measured["local"][key], 3)
                    # >1: Ray spends less CPU per image than the local engine.
                    measured[f"ratio_{name}_cpu_efficiency"] = round(
                        measured["local"]["cpu_ms_per_image_marginal"] / measured[name]["cpu_ms_per_image_marginal"],
                        3)
                print(json.dumps({"round": number + 1, **measured}))
                rounds.append(measured)

    def median(key: str, name: str | None = None) -> float:
        return round(statistics.median(r[name][key] if name else r[key] for r in rounds), 3)

    per_actor = median("images_per_second_steady", "ray") / pool["actors"]
    decode_ceiling = decode_one_thread * args.cpus_per_gpu
    projection: dict = {
        "basis": "on paper, not measured: images / (actors x per-actor rate); storage and network assumed to "
                 "keep up. A GPU actor is also bounded by its decode threads: cpus_per_gpu x the measured "
                 "one-thread decode rate (threads of one process share the GIL, so this bound is optimistic)",
        "cpu_actor_images_per_second": round(per_actor, 2),
        "hours_on_one_cpu_actor": round(CATALOGUE / per_actor / 3600, 1),
        "decode_images_per_second_per_thread": round(decode_one_thread, 1),
        "cpus_per_gpu": args.cpus_per_gpu,
        "gpu_actor_decode_ceiling_images_per_second": round(decode_ceiling, 1),
    }
    for gpus in (int(n) for n in args.gpus.split(",")):
        rate = decode_ceiling if not args.gpu_speedup else min(decode_ceiling, per_actor * args.gpu_speedup)
        projection[f"hours_on_{gpus}_gpus_at_least"] = round(CATALOGUE / (rate * gpus) / 3600, 2)
    result = {
        "images": args.images, "backbone": args.backbone, "batch_size": args.batch_size, "rounds": rounds,
        "median": {f"ratio_{name}_{kind}": median(f"ratio_{name}_{kind}") for name in variants
                   for kind in (*KINDS, "cpu_efficiency")}
        | {f"{name}_{key}": median(key, name) for name in ("local", *variants)
           for key in ("images_per_second_marginal", "images_per_second_steady", "cpu_ms_per_image_marginal")},
        "ray_init_seconds": round(ray_init, 2), "ray_idle_cpu_cores": round(ray_idle_cpu, 3), "pool": pool,
        "calls_per_actor": CALLS_PER_ACTOR,
        "per_actor_images_per_second": round(per_actor, 2),
        "projection_10M": projection,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
    }
    print(json.dumps({key: value for key, value in result.items() if key != "rounds"}, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
