"""Feature-extraction throughput: the cached pipeline (decode + crop + resize in workers, backbone, memmap
writes) against the runtime's bare backbone forward on pre-decoded arrays, same images and batch size, same
run, for torch and the exported runtime (OpenVINO) side by side.

    python benchmarks/bench_features.py                       # 512 generated 256x320 JPEGs
    python benchmarks/bench_features.py --data DIR --workers 0 1 2 --threads 2

Writes benchmarks/results/features.json. A ratio near 1 means decoding is hidden behind the forward pass.
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
import torch
from PIL import Image

from training.data.stl import CategoryMap, Pair, STLDataset, product_path, scene_path, write_pairs
from training.fit.features import cache_features
from training.model.backbones import available, load_backbone
from training.model.batch_runtime import batch_runtime
from training.model.embedder import Embedder
from training.model.export import export_embedder
from training.model.preprocess import load_array
from training.model.runtimes import Runtime

LOG = logging.getLogger(__name__)
DEFAULT_OUT = Path(__file__).parent / "results" / "features.json"


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: decodes like a photo, unlike pure noise (which is far slower)."""
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def make_dataset(root: Path, images: int, width: int, height: int, seed: int = 0) -> STLDataset:
    """Half scenes (one pair each, random bbox), half products, as JPEG quality 90."""
    rng = np.random.default_rng(seed)
    scenes, products = images // 2, images - images // 2
    pairs, categories = [], {}
    for number in range(products):
        product_id = f"p{number:05d}"
        path = product_path(root, product_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo_like(rng, width, height).save(path, quality=90)
        categories[product_id] = f"Fashion|Category{number % 8}"
    for number in range(scenes):
        scene_id = f"s{number:05d}"
        path = scene_path(root, scene_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo_like(rng, width, height).save(path, quality=90)
        left, top = rng.uniform(0.0, 0.5, 2)
        right, bottom = left + rng.uniform(0.3, 0.5), top + rng.uniform(0.3, 0.5)
        pairs.append(Pair(scene_id, f"p{number % products:05d}", (left, top, right, bottom)))
    CategoryMap(categories).write(root / "categories.json")
    write_pairs(root / "pairs.jsonl", pairs)
    return STLDataset.open(root)


def decoded_batches(embedder: Embedder, dataset: STLDataset, batch_size: int) -> list[np.ndarray]:
    preprocess = embedder.preprocess
    arrays = [load_array(dataset.scene_path(p.scene_id), p.bbox, preprocess) for p in dataset.pairs]
    arrays += [load_array(dataset.product_path(pid), None, preprocess) for pid in dataset.catalogue()]
    return [np.stack(arrays[i : i + batch_size]) for i in range(0, len(arrays), batch_size)]


def bare_forward(runtime: Runtime, batches: list[np.ndarray]) -> tuple[float, int]:
    """Images/s of the runtime's backbone alone on arrays decoded beforehand (the ceiling for the pipeline)."""
    start = time.perf_counter()
    for batch in batches:
        runtime.backbone_features(batch)
    images = sum(len(batch) for batch in batches)
    return images / (time.perf_counter() - start), images


def pipeline(embedder: Embedder, dataset: STLDataset, batch_size: int, workers: int, runtime: str,
             export_dir: Path) -> tuple[float, int]:
    """Images/s of cache_features into a fresh cache (worker start-up, the runtime's compile and the memmap
    writes included; the one-off export is not: `export_dir` holds it)."""
    with tempfile.TemporaryDirectory(prefix="bench-features-cache-") as cache:
        start = time.perf_counter()
        cached = cache_features(dataset, embedder, Path(cache), batch_size=batch_size, workers=workers,
                                progress=False, runtime=runtime, export_dir=export_dir)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
    return cached.computed / seconds, cached.computed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="STL dataset dir (default: generate one)")
    parser.add_argument("--images", type=int, default=512, help="generated images (half scenes, half products)")
    parser.add_argument("--image-size", default="256x320", help="generated images' WIDTHxHEIGHT")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=available())
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts to try")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--jpeg-draft", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "openvino"],
                        choices=["torch", "openvino", "onnxruntime"], help="runtimes to compare, same run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    width, height = (int(value) for value in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-features-data-") as scratch:
        dataset = (STLDataset.open(args.data) if args.data is not None
                   else make_dataset(Path(scratch), args.images, width, height))
        embedder = Embedder(load_backbone(args.backbone), device=args.device, context=0.1,
                            channels_last=not args.no_channels_last, jpeg_draft=args.jpeg_draft)
        batches = decoded_batches(embedder, dataset, args.batch_size)
        started = time.perf_counter()
        decoded_batches(embedder, dataset, args.batch_size)
        decode_rate = sum(len(batch) for batch in batches) / (time.perf_counter() - started)
        export_dir = Path(scratch) / "export"
        export_embedder(embedder, export_dir)
        per_runtime: dict[str, dict] = {}
        for name in args.runtimes:
            with batch_runtime(embedder, name, export_dir) as runtime:  # type: ignore[arg-type]
                runtime.backbone_features(batches[0])  # first call pays one-off primitive set-up
                # Interleaved (bare, pipeline per worker count) rounds, each ratio against its own round's
                # bare number: on a shared machine the load drifts between measurements minutes apart.
                bares: list[float] = []
                rounds: dict[int, list[float]] = {workers: [] for workers in args.workers}
                for _ in range(args.repeats):
                    # Bare forward before and after the pipelines (mean of both), so a load trend during the
                    # round does not favour whichever side runs first.
                    before, images = bare_forward(runtime, batches)
                    rates = {workers: pipeline(embedder, dataset, args.batch_size, workers, name, export_dir)[0]
                             for workers in args.workers}
                    after, _ = bare_forward(runtime, batches)
                    bare = (before + after) / 2
                    bares.append(bare)
                    for workers, rate in rates.items():
                        rounds[workers].append(rate)
                        print(f"{name} workers={workers}: pipeline {rate:.1f} img/s, bare forward {bare:.1f} img/s "
                              f"(before {before:.1f}, after {after:.1f}), ratio {rate / bare:.3f}", flush=True)
            ratios = {workers: float(np.median(np.asarray(rates) / np.asarray(bares)))
                      for workers, rates in rounds.items()}
            runs = {workers: float(np.median(rates)) for workers, rates in rounds.items()}
            best_workers = max(ratios, key=ratios.get)
            per_runtime[name] = {
                "bare_forward_images_per_s": round(float(np.median(bares)), 2),  # medians over the rounds
                "pipeline_images_per_s": {str(workers): round(rate, 2) for workers, rate in runs.items()},
                "ratio_by_workers": {str(workers): round(ratio, 3) for workers, ratio in ratios.items()},
                "best_workers": best_workers,
                "pipeline_best_images_per_s": round(runs[best_workers], 2),
                "ratio": round(ratios[best_workers], 3),  # median of per-round pipeline / bare
            }
    result = {
        "backbone": args.backbone,
        "images": images,
        "image_size": None if args.data is not None else [width, height],
        "data": str(args.data) if args.data is not None else "generated",
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "channels_last": not args.no_channels_last,
        "jpeg_draft": args.jpeg_draft,
        "device": str(embedder.device),
        "machine": {"cpus": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "repeats": args.repeats,
        "decode_one_core_images_per_s": round(decode_rate, 2),
        "runtimes": per_runtime,
        "target_ratio": 0.8,
    }
    if "torch" in per_runtime and "openvino" in per_runtime:
        result["openvino_vs_torch_pipeline"] = round(per_runtime["openvino"]["pipeline_best_images_per_s"]
                                                     / per_runtime["torch"]["pipeline_best_images_per_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
