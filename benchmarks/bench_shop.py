"""Shop the whole look: `/shop` (one detector pass + one batched embedding of every item) against `/recommend`
(one item) at concurrency 1, on the same server, in alternating rounds; and the detector alone per image.

    .venv/bin/python benchmarks/bench_shop.py [--work /tmp/stl-bench-shop] [--scenes 150] [--rounds 5]
        [--requests 20] [--threads 2]

Builds a small synthetic catalogue with `python -m index pipeline` (efficientnet_lite0 head, 1 epoch; the
item detector at its default 320 px, the pipeline's 4 epochs), serves it with `python -m service` (OpenVINO,
no torch), and
posts the catalogue's 640x480 scenes holding 3-5 items: `/recommend` with one of its items' box and category,
`/shop` with the photo alone. Target: p50(/shop) <= 3x p50(/recommend). The detector's own time is the
exported graph in the server's runtime on one photo (decode excluded; decoding + numpy post-processing
included in `detect_ms_with_post`). Writes benchmarks/results/shop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

from index import pipeline
from index.artifact import open_artifact
from service.launch import wait_until_ready
from training.data.stl import STLDataset
from training.model.arrays import load_image
from training.model.detect_post import DetectorGraph
from training.model.runtimes import load_runtime

RESULTS = Path(__file__).resolve().parent / "results" / "shop.json"
TARGET_RATIO = 3.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/stl-bench-shop"))
    parser.add_argument("--scenes", type=int, default=400, help="the compose indexer's catalogue size")
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--detector-epochs", type=int, default=pipeline.DETECTOR_EPOCHS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20, help="requests per endpoint per round")
    parser.add_argument("--threads", type=int, default=2, help="STL_RUNTIME_THREADS of the server")
    return parser


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * (len(ordered) - 1) + 0.5))]


def detector_ms(artifacts: Path, photos: list[bytes], threads: int) -> dict[str, float]:
    graph = DetectorGraph(open_artifact(artifacts).detector_dir, "auto", threads)
    pictures = [load_image(photo) for photo in photos]
    batch = [graph.to_array(picture)[None] for picture in pictures]
    graph.raw(batch[0])  # compile / warm up
    raw, full = [], []
    for picture, array in zip(pictures, batch, strict=True):
        started = time.perf_counter()
        graph.raw(array)
        raw.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        graph.detect([picture])
        full.append((time.perf_counter() - started) * 1000)
    return {"runtime": graph.name, "image_size": graph.image_size, "graph_ms_p50": statistics.median(raw),
            "detect_ms_with_post_p50": statistics.median(full), "images": len(raw)}


def embed_ms(artifacts: Path, threads: int, sizes: tuple[int, ...] = (1, 3, 4, 5)) -> dict[str, float]:
    """The scene embedding alone (the server's runtime) for one crop and for one photo's batch of crops."""
    artifact = open_artifact(artifacts)
    runtime = load_runtime("auto", artifact.export_dir, "f32", threads)
    size = int(runtime.fingerprint["preprocess"]["image_size"])
    measured = {}
    for count in sizes:
        crops = np.random.default_rng(0).uniform(-1, 1, (count, 3, size, size)).astype(np.float32)
        runtime.vectors(crops, "scene")
        times = []
        for _ in range(15):
            started = time.perf_counter()
            runtime.vectors(crops, "scene")
            times.append((time.perf_counter() - started) * 1000)
        measured[f"batch_{count}_ms"] = statistics.median(times)
    return measured


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    data, work, artifacts = args.work / "data", args.work / "work", args.work / "artifacts"
    started = time.perf_counter()
    if pipeline.main(["--data", str(data), "--work", str(work), "--artifacts", str(artifacts), "--scenes",
                      str(args.scenes), "--products", str(args.products), "--epochs", "1",
                      "--detector-epochs", str(args.detector_epochs),
                      "--device", "cpu"]):
        return 1
    prepared_s = time.perf_counter() - started
    dataset = STLDataset.open(data, on_error="skip")
    by_scene = defaultdict(list)
    for pair in dataset.pairs:
        by_scene[pair.scene_id].append(pair)
    scenes = sorted(scene for scene, pairs in by_scene.items() if 3 <= len(pairs) <= 5)[:20]
    photos = {scene: dataset.scene_path(scene).read_bytes() for scene in scenes}

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STL_ARTIFACTS": str(artifacts), "STL_DEVICE": "cpu", "STL_RUNTIME": "auto",
           "STL_RUNTIME_THREADS": str(args.threads), "STL_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    latencies: dict[str, list[float]] = {"recommend": [], "shop": []}
    shop_items: list[int] = []
    try:
        wait_until_ready(url, server, timeout_s=180)
        with httpx.Client(base_url=url, timeout=60) as client:
            ready = client.get("/readyz").json()
            assert ready["detector"] is not None, ready

            def recommend(scene: str, position: int) -> None:
                pair = by_scene[scene][position % len(by_scene[scene])]
                started = time.perf_counter()
                response = client.post("/recommend", files={"image": ("s.jpg", photos[scene], "image/jpeg")},
                                       data={"category": dataset.categories.of(pair.product_id), "k": "10",
                                             "bbox": ",".join(f"{v:.5f}" for v in pair.bbox)})
                latencies["recommend"].append((time.perf_counter() - started) * 1000)
                response.raise_for_status()

            def shop(scene: str) -> None:
                started = time.perf_counter()
                response = client.post("/shop", files={"image": ("s.jpg", photos[scene], "image/jpeg")},
                                       data={"k": "10"})
                latencies["shop"].append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                shop_items.append(len(response.json()["items"]))

            for scene in scenes[:3]:  # warm-up
                recommend(scene, 0)
                shop(scene)
            latencies = {"recommend": [], "shop": []}
            shop_items.clear()
            for round_ in range(args.rounds):
                for n in range(args.requests):
                    scene = scenes[(round_ * args.requests + n) % len(scenes)]
                    recommend(scene, n)
                for n in range(args.requests):
                    shop(scenes[(round_ * args.requests + n) % len(scenes)])
    finally:
        server.terminate()
        server.wait(timeout=30)

    detector = detector_ms(artifacts, list(photos.values()), args.threads)
    embedding = embed_ms(artifacts, args.threads)
    fitted = json.loads((work / "detector" / "detector_log.json").read_text())["metrics"]
    recommend_p50 = statistics.median(latencies["recommend"])
    shop_p50 = statistics.median(latencies["shop"])
    result = {
        "recommend_ms": {"p50": recommend_p50, "p90": _percentile(latencies["recommend"], 0.9),
                         "requests": len(latencies["recommend"])},
        "shop_ms": {"p50": shop_p50, "p90": _percentile(latencies["shop"], 0.9), "requests": len(latencies["shop"])},
        "shop_items_mean": float(np.mean(shop_items)) if shop_items else 0.0,
        "shop_items_range": [min(shop_items, default=0), max(shop_items, default=0)],
        "ratio_p50": shop_p50 / recommend_p50, "target_ratio": TARGET_RATIO,
        "pass": shop_p50 / recommend_p50 <= TARGET_RATIO,
        "detector": detector, "embedding": embedding,
        "detector_val_map_50": fitted.get("val", {}).get("map_50"),
        "scenes": len(scenes), "prepare_seconds": prepared_s, "threads": args.threads,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
        "note": "a shared 2-core machine: other processes ran beside the benchmark",
    }
    print(f"/recommend p50 {recommend_p50:.1f} ms   /shop p50 {shop_p50:.1f} ms "
          f"({result['shop_items_mean']:.1f} items on average)   ratio {result['ratio_p50']:.2f} "
          f"(target <= {TARGET_RATIO})")
    print(f"detector ({detector['runtime']}, {detector['image_size']} px): graph {detector['graph_ms_p50']:.1f} ms, "
          f"with decoding {detector['detect_ms_with_post_p50']:.1f} ms per image")
    print("scene embedding alone: " + ", ".join(f"{name} {value:.1f}" for name, value in embedding.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
