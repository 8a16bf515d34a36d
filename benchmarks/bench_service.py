"""Service benchmark: real uvicorn in a subprocess, an httpx async load generator, the bare embedder beside it.

    .venv/bin/python benchmarks/bench_service.py [--requests 400] [--seconds 90] [--threads 2]

Builds an efficientnet_lite0 + head artifact whose 38,111 products (the real catalogue's size and
category mix) have random unit vectors, measures the bare embedder (one crop; best batched
throughput), then serves the artifact and measures latency/throughput at concurrency 1, 8 and 32
and the server's resident memory. Prints each number and writes them to benchmarks/results/service.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from index.publish import publish, staging_dir
from index.writer import CategoryData, new_version, write_version
from service.settings import Settings
from training.backbones import load_backbone
from training.checkpoint import Checkpoint, save_checkpoint
from training.embedder import Embedder, Preprocess
from training.head import CompatibilityHead, HeadConfig
from training.popularity import Popularity
from training.stl import CategoryMap
from training.synth import FALLBACK_CATEGORIES

LOG = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "service.json"
# The real STL fashion catalogue (../shared/stl/fashion-cat.json): 38,111 products in these categories.
STL_CATEGORY_MIX = dict(FALLBACK_CATEGORIES)
CONCURRENCY = (1, 8, 32)
BBOXES = ("0.30,0.55,0.60,0.95", "0.10,0.10,0.70,0.60", "0.40,0.20,0.90,0.80", "0.05,0.40,0.45,0.95")


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    backbone = load_backbone("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, hidden_dim=512, out_dim=128)).eval()
    save_checkpoint(path, Checkpoint(
        head_config=head.config, state_dict=head.state_dict(), backbone_name=backbone.name,
        backbone_weights_sha256=backbone.weights_sha256,
        preprocess=Preprocess(backbone.image_size, backbone.mean, backbone.std, 0.1),
    ))
    return path


def make_artifact(root: Path, checkpoint: Path, embedder: Embedder, seed: int = 0) -> str:
    """Publish a version with random unit vectors for the STL catalogue's category mix (no images needed)."""
    rng = np.random.default_rng(seed)
    categories, products, product_to_path = [], [], {}
    for c, (path, count) in enumerate(STL_CATEGORY_MIX.items()):
        ids = [f"c{c:02d}p{i:05d}" for i in range(count)]
        vectors = rng.standard_normal((count, embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        categories.append(CategoryData(path, ids, vectors))
        products += [{"id": pid, "category": path, "image": f"images/products/{pid}.jpg"} for pid in ids]
        product_to_path.update(dict.fromkeys(ids, path))
    counts = {pid: int(n) for pid, n in zip(product_to_path, rng.poisson(0.5, len(product_to_path)), strict=True)}
    popularity = Popularity(counts, CategoryMap(product_to_path))
    version = new_version("bench-service")
    staging = staging_dir(root, version)
    write_version(staging, version, categories, embedder.fingerprint(), checkpoint, popularity, products,
                  {"operation": "bench"})
    publish(root, staging)
    return version


def scene_images(count: int, seed: int = 0, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """Photo-sized JPEG scenes (the STL scenes are Pinterest images of about this size)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        pen = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
            pen.ellipse([x0, y0, x0 + int(rng.integers(20, 300)), y0 + int(rng.integers(20, 300))],
                        fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=88)
        images.append(buffer.getvalue())
    return images


def bare_embedder(embedder: Embedder, image: bytes, repeats: int, min_seconds: float) -> dict:
    """Forward time of one crop, and crops/s of batched forwards, with no HTTP, decoding or queueing."""
    crop = embedder.transform(embedder.load_image(image), None)
    for _ in range(5):
        embedder.embed_batch(crop[None], "scene")
    single = []
    for _ in range(repeats):
        started = time.perf_counter()
        embedder.embed_batch(crop[None], "scene")
        single.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(repeats):
        box = (0.1, 0.1, 0.7, 0.9)
        embedder.embed_batch(embedder.transform(embedder.load_image(image, box), box)[None], "scene")
    with_preprocess = (time.perf_counter() - started) / repeats
    batched = {}
    for size in (1, 4, 8, 16, 32):
        batch = crop[None].expand(size, -1, -1, -1).contiguous()
        embedder.embed_batch(batch, "scene")
        times, begun = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - begun < min_seconds:
            started = time.perf_counter()
            embedder.embed_batch(batch, "scene")
            times.append(time.perf_counter() - started)
        batched[size] = size / statistics.median(times)
    best = max(batched, key=batched.get)
    return {
        "forward_one_crop_ms": statistics.median(single) * 1000,
        "decode_crop_forward_one_ms": with_preprocess * 1000,
        "batched_crops_per_s": {str(k): round(v, 2) for k, v in batched.items()},
        "best_batch_size": best,
        "best_batched_crops_per_s": batched[best],
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def batch_totals(url: str) -> tuple[float, float]:
    totals = {"stl_batch_size_sum": 0.0, "stl_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] = sample.value
    return totals["stl_batch_size_sum"], totals["stl_batch_size_count"]


async def load(url: str, images: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` clients sending back-to-back requests until `requests` are done or `seconds` pass."""
    latencies: list[float] = []
    errors: list[str] = []
    categories = list(STL_CATEGORY_MIX)
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            for n in counter:
                if time.perf_counter() > deadline:
                    return
                data = {"category": categories[n % len(categories)], "bbox": BBOXES[n % len(BBOXES)], "k": "10"}
                files = {"image": ("scene.jpg", images[n % len(images)], "image/jpeg")}
                started = time.perf_counter()
                try:
                    response = await client.post("/recommend", data=data, files=files)
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                elapsed = time.perf_counter() - started
                body = response.json() if response.status_code == 200 else {}
                if response.status_code != 200 or body.get("source") != "embedding" or len(body["items"]) != 10:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                latencies.append(elapsed)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_examples": errors[:3],
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "throughput_rps": len(latencies) / wall,
        "wall_s": wall,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level (c=1: a tenth)")
    parser.add_argument("--seconds", type=float, default=90.0, help="time limit per concurrency level")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--batch-max-size", type=int, default=Settings.model_fields["batch_max_size"].default,
                        help="STL_BATCH_MAX_SIZE (default: the service's default)")
    parser.add_argument("--batch-max-wait-ms", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=None, help="keep the artifact here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = make_checkpoint(work / "head.pt")
        embedder = Embedder.from_checkpoint(checkpoint, "cpu")
        root = work / "artifacts"
        started = time.perf_counter()
        version = make_artifact(root, checkpoint, embedder)
        print(f"artifact {version}: {sum(STL_CATEGORY_MIX.values())} products in {len(STL_CATEGORY_MIX)} categories "
              f"({time.perf_counter() - started:.1f} s)")
        images = scene_images(8)
        bare = bare_embedder(embedder, images[0], repeats=30, min_seconds=2.0)
        print(f"bare embedder: one crop {bare['forward_one_crop_ms']:.1f} ms "
              f"(decode+crop+forward {bare['decode_crop_forward_one_ms']:.1f} ms); best batched "
              f"{bare['best_batched_crops_per_s']:.1f} crops/s at batch {bare['best_batch_size']}")

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "STL_ARTIFACTS": str(root), "STL_DEVICE": "cpu", "STL_LOG_LEVEL": "WARNING",
               "STL_TORCH_THREADS": str(args.threads), "STL_BATCH_MAX_SIZE": str(args.batch_max_size),
               "STL_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms)}
        env.pop("STL_ADMIN_TOKEN", None)
        server = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env)
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with {server.returncode} during start-up")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready within 180 s")
                time.sleep(0.25)
            ready = httpx.get(f"{url}/readyz").json()
            assert ready["status"] == "ready", ready
            idle = memory_kib(server.pid)
            asyncio.run(load(url, images, 4, 16, 30))  # warm-up: first requests pay lazy initialisation
            levels = []
            for concurrency in CONCURRENCY:
                requests = max(20, args.requests // 10) if concurrency == 1 else args.requests
                before = batch_totals(url)
                level = asyncio.run(load(url, images, concurrency, requests, args.seconds))
                after = batch_totals(url)
                level["mean_batch_size"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                levels.append(level)
                print(f"c={concurrency:>2}: {level['requests']} requests, {level['errors']} errors, "
                      f"p50 {level['p50_ms']:.1f} ms, p95 {level['p95_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, "
                      f"{level['throughput_rps']:.1f} req/s, mean batch {level['mean_batch_size']:.1f}")
            loaded = memory_kib(server.pid)
            load_average = os.getloadavg()
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        # Again once the server is gone: on a shared machine the CPU left to us drifts during the run.
        bare_after = bare_embedder(embedder, images[0], repeats=15, min_seconds=1.0)
        print(f"bare embedder after: one crop {bare_after['forward_one_crop_ms']:.1f} ms; best batched "
              f"{bare_after['best_batched_crops_per_s']:.1f} crops/s")

    by_c = {level["concurrency"]: level for level in levels}
    forward_ms = (bare["forward_one_crop_ms"] + bare_after["forward_one_crop_ms"]) / 2
    batched = (bare["best_batched_crops_per_s"] + bare_after["best_batched_crops_per_s"]) / 2
    rss_mib = {"idle": idle["VmRSS"] / 1024, "after_load": loaded["VmRSS"] / 1024, "peak": loaded["VmHWM"] / 1024}
    targets = {
        "bare_forward_one_crop_ms_mean_of_runs": forward_ms,
        "bare_best_batched_crops_per_s_mean_of_runs": batched,
        "p50_c1_over_bare_forward": by_c[1]["p50_ms"] / forward_ms,
        "p50_c1_target_max": 1.2,
        "throughput_c32_over_bare_batched": by_c[32]["throughput_rps"] / batched,
        "throughput_c32_target_min": 0.85,
        "peak_rss_mib": rss_mib["peak"],
        "peak_rss_target_max_mib": 1536,
        "errors": sum(level["errors"] for level in levels),
    }
    targets["met"] = bool(targets["p50_c1_over_bare_forward"] <= 1.2 and targets["throughput_c32_over_bare_batched"]
                          >= 0.85 and rss_mib["peak"] <= 1536 and targets["errors"] == 0)
    print(f"server RSS: idle {rss_mib['idle']:.0f} MiB, after load {rss_mib['after_load']:.0f} MiB, "
          f"peak {rss_mib['peak']:.0f} MiB")
    print(f"p50(c=1) / bare forward = {targets['p50_c1_over_bare_forward']:.2f} (target <= 1.2); "
          f"throughput(c=32) / bare batched = {targets['throughput_c32_over_bare_batched']:.2f} (target >= 0.85)")
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "load_average_at_end": load_average,
                    "torch": torch.__version__, "gpu": torch.cuda.is_available()},
        "setup": {"backbone": "efficientnet_lite0", "head": "1280-512-128", "products": sum(STL_CATEGORY_MIX.values()),
                  "categories": len(STL_CATEGORY_MIX), "scene_size": [640, 480], "k": 10,
                  "batch_max_size": args.batch_max_size, "batch_max_wait_ms": args.batch_max_wait_ms},
        "bare_embedder": bare,
        "bare_embedder_after": bare_after,
        "levels": levels,
        "server_rss_mib": rss_mib,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
