"""What each runtime and precision costs in quality: HR@K on the synthetic catalogue's test split, with the
same trained head, the same decoded crops and the same ranking code (`training.eval.rankers`), and how close
its vectors and top-10 lists come to torch's; beside it each runtime's forward time at batch 1 and 8.

    .venv/bin/python benchmarks/bench_precision.py --data data/synth --model runs/head [--threads 2]

Runtimes: torch (the reference), ONNX Runtime f32, OpenVINO f32 and, where the CPU has AVX-512 BF16 or AMX,
OpenVINO bf16 (`STL_PRECISION=bf16`). Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.data.split import split_by_scene
from training.data.stl import Pair, STLDataset
from training.eval.rankers import evaluate_models
from training.model.arrays import load_array
from training.model.checkpoint import load_embedder
from training.model.export import export_embedder
from training.model.runtimes import Runtime, load_runtime
from training.model.runtimes.base import RuntimeUnavailable
from training.model.runtimes.openvino_runtime import cpu_supports_bf16

LOG = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "precision.json"
KS = (1, 5, 10, 20, 50)


class VectorRanker:
    """Scores from vectors computed beforehand: a scene crop's row against each candidate product's row."""

    def __init__(self, name: str, scenes: dict[Pair, np.ndarray], products: dict[str, np.ndarray]) -> None:
        self.name = name
        self.scenes, self.products = scenes, products

    def score(self, queries: Sequence[Pair], candidates: Sequence[str]) -> np.ndarray:
        query = np.stack([self.scenes[pair] for pair in queries])
        return query @ np.stack([self.products[pid] for pid in candidates]).T


def embed(runtime: Runtime, arrays: np.ndarray, kind: str, batch: int = 32) -> np.ndarray:
    return np.concatenate([runtime.vectors(arrays[i:i + batch], kind) for i in range(0, len(arrays), batch)])


def forward_ms(runtime: Runtime, arrays: np.ndarray, batch: int, repeats: int) -> float:
    chunk = arrays[:batch]
    runtime.vectors(chunk, "product")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime.vectors(chunk, "product")
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="STL dataset dir (the synthetic catalogue)")
    parser.add_argument("--model", type=Path, required=True, help="trained head dir (head.pt) or the head.pt")
    parser.add_argument("--split-seed", type=int, default=0, help="the split the head was trained with")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=30, help="timed forward passes per batch size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    checkpoint = args.model / "head.pt" if args.model.is_dir() else args.model
    embedder = load_embedder(checkpoint, "cpu")
    dataset = STLDataset.open(args.data)
    split = split_by_scene(dataset.pairs, seed=args.split_seed)
    products = dataset.catalogue()
    catalogued = set(products)
    queries = [pair for pair in split.test if pair.product_id in catalogued]
    started = time.perf_counter()
    preprocess = embedder.preprocess
    scene_arrays = np.stack([load_array(dataset.scene_path(p.scene_id), p.bbox, preprocess) for p in queries])
    product_arrays = np.stack([load_array(dataset.product_path(pid), None, preprocess) for pid in products])
    print(f"{len(queries)} test crops, {len(products)} products decoded in {time.perf_counter() - started:.0f} s")

    runs: dict[str, Runtime] = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as export_dir:
        export_embedder(embedder, export_dir)
        runs["torch"] = load_runtime("torch", embedder=embedder, threads=args.threads)
        for name, precision in (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "bf16")):
            if precision == "bf16" and not cpu_supports_bf16():
                print("bf16: this CPU has neither AVX-512 BF16 nor AMX; skipped")
                continue
            try:
                runs[f"{name}-{precision}"] = load_runtime(name, export_dir, precision=precision,  # type: ignore[arg-type]
                                                           threads=args.threads)
            except RuntimeUnavailable as exc:
                print(f"{name} {precision}: {exc}")
        vectors = {label: (embed(rt, scene_arrays, "scene"), embed(rt, product_arrays, "product"))
                   for label, rt in runs.items()}
        latency = {label: {f"batch_{b}_ms": round(forward_ms(rt, product_arrays, b, args.repeats), 2) for b in (1, 8)}
                   for label, rt in runs.items()}
    rankers = [VectorRanker(label, dict(zip(queries, scenes, strict=True)), dict(zip(products, prods, strict=True)))
               for label, (scenes, prods) in vectors.items()]
    evaluation = evaluate_models(dataset, split, rankers, ks=KS, part="test", keep=set(queries).__contains__)

    reference_scenes, reference_products = vectors["torch"]
    rows = {}
    for label, (scenes, prods) in vectors.items():
        cosine = np.concatenate([np.sum(scenes * reference_scenes, axis=1), np.sum(prods * reference_products, axis=1)])
        # The top-10 products of each test crop among all products, against torch's.
        mine = np.argsort(-(scenes @ prods.T), axis=1, kind="stable")[:, :10]
        theirs = np.argsort(-(reference_scenes @ reference_products.T), axis=1, kind="stable")[:, :10]
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(mine, theirs, strict=True)])
        hr = evaluation["models"][label]["hr"]
        rows[label] = {
            "hr": {str(k): round(v, 4) for k, v in hr.items()},
            "hr10_vs_torch": round(hr[10] / evaluation["models"]["torch"]["hr"][10], 4),
            "cosine_to_torch_min": round(float(cosine.min()), 6),
            "cosine_to_torch_mean": round(float(cosine.mean()), 6),
            "top10_overlap_with_torch": round(float(overlap), 4),
            "top10_identical_share": round(float(np.mean(np.all(mine == theirs, axis=1))), 4),
            **latency[label],
        }
    result = {
        "data": str(args.data), "model": str(checkpoint), "test_crops": len(queries), "products": len(products),
        "threads": args.threads, "cpu_bf16": cpu_supports_bf16(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "runtimes": rows,
    }
    print(f"{'runtime':<18} {'HR@10':>7} {'vs torch':>9} {'cos min':>9} {'top10 overlap':>14} "
          f"{'b1 ms':>7} {'b8 ms':>7}")
    for label, row in rows.items():
        print(f"{label:<18} {row['hr']['10']:>7.4f} {row['hr10_vs_torch']:>9.4f} {row['cosine_to_torch_min']:>9.5f} "
              f"{row['top10_overlap_with_torch']:>14.4f} {row['batch_1_ms']:>7.2f} {row['batch_8_ms']:>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
