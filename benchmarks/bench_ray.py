"""The Ray engine against the local one on the same machine: throughput, overhead ratio, per-actor rate, and a
projection (on paper) of a 10M-image catalogue on N GPUs from the measured per-actor figure.

    .venv/bin/python benchmarks/bench_ray.py [--images 768] [--backbone efficientnet_lite0] [--batch-size 64]

Both engines run the same job (`training.exec`: backbone features of 320x320 product JPEGs, runtime auto =
OpenVINO on a CPU) through `map_embed`, over half the images and then all of them: "marginal" is the extra
images over the extra seconds, so fixed costs (model load, export, compile, Ray's actor start) cancel out;
"end_to_end" includes them (Ray's own start is reported apart). Ray Data hands results over in bursts, so a
rate timed from the first chunk would flatter it.
Prints each number and writes benchmarks/results/ray.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_index import make_catalogue

from training.data.stl import STLDataset
from training.exec.executor import EmbedJob, ImageItem, LocalExecutor
from training.exec.ray_executor import RayExecutor
from training.fit.features import backbone_loader

RESULTS = Path(__file__).parent / "results" / "ray.json"
CATALOGUE = 10_000_000


def run(executor, job: EmbedJob, items: list[ImageItem]) -> tuple[float, np.ndarray]:
    """(seconds, values in item order) of one map_embed over `items`."""
    started = time.perf_counter()
    values: np.ndarray | None = None
    done = 0
    for chunk in executor.map_embed(job, items):
        if values is None:
            values = np.zeros((len(items), chunk.values.shape[1]), dtype=np.float32)
        values[chunk.positions] = chunk.values
        done += len(chunk.positions)
    assert done == len(items) and values is not None, f"{done} of {len(items)} embedded"
    return time.perf_counter() - started, values


def engine_rates(executor, job: EmbedJob, items: list[ImageItem]) -> tuple[dict, np.ndarray]:
    half = len(items) // 2
    half_seconds, _ = run(executor, job, items[:half])
    seconds, values = run(executor, job, items)
    return {"images_per_second_marginal": round((len(items) - half) / max(seconds - half_seconds, 1e-9), 2),
            "images_per_second_end_to_end": round(len(items) / seconds, 2),
            "seconds_half": round(half_seconds, 2), "seconds_all": round(seconds, 2)}, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="local engine's decoding processes")
    parser.add_argument("--gpus", default="1,8,64", help="GPU counts to project the 10M catalogue on")
    parser.add_argument("--gpu-speedup", type=float, default=None,
                        help="measured GPU actor / CPU actor ratio, if you have one; without it no GPU time is "
                             "projected, only the CPU-actor figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load = backbone_loader(args.backbone)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = STLDataset.open(make_catalogue(Path(scratch) / "data", args.images))
        items = [ImageItem(dataset.product_location(pid)) for pid in dataset.catalogue()]
        job = EmbedJob("features", load, "auto", args.batch_size, loaded=load("cpu"))
        local, local_values = engine_rates(LocalExecutor(args.workers), job, items)
        ray_started = time.perf_counter()
        with RayExecutor() as executor:
            ray_init = time.perf_counter() - ray_started
            pool = executor.pool()
            ray, ray_values = engine_rates(executor, job, items)
    difference = float(np.max(np.abs(local_values - ray_values)))
    per_actor = ray["images_per_second_marginal"] / pool["actors"]
    projection = {
        "basis": "on paper, not measured: images / (actors x measured per-actor rate); decode, storage and "
                 "network assumed to keep up",
        "cpu_actor_images_per_second": round(per_actor, 2),
        "hours_on_one_cpu_actor": round(CATALOGUE / per_actor / 3600, 1),
    }
    if args.gpu_speedup:
        for gpus in (int(n) for n in args.gpus.split(",")):
            projection[f"hours_on_{gpus}_gpus"] = round(CATALOGUE / (per_actor * args.gpu_speedup * gpus) / 3600, 2)
    result = {
        "images": args.images, "backbone": args.backbone, "batch_size": args.batch_size,
        "local": local, "ray": {**ray, "init_seconds": round(ray_init, 2), "pool": pool},
        "overhead_ratio_marginal": round(ray["images_per_second_marginal"] / local["images_per_second_marginal"], 3),
        "overhead_ratio_end_to_end": round(ray["images_per_second_end_to_end"] / local["images_per_second_end_to_end"],
                                           3),
        "max_abs_difference": difference,
        "per_actor_images_per_second": round(per_actor, 2),
        "projection_10M": projection,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
