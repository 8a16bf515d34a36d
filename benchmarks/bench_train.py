"""Head training time per epoch on cached features, at the STL-Fashion scale (72k pairs, 1280-d features).

Features are random (timing does not depend on their values): 72,198 pairs over 38,111 products in 10
categories, as in STL-Fashion. Prints a table and writes benchmarks/results/bench_train.json.
TARGET: <= 10 s per epoch on CPU with the default training configuration.

    .venv/bin/python benchmarks/bench_train.py [--pairs 72198] [--device cpu] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.fit.trainer import PairFeatures, Products, TrainConfig, train_head
from training.model.device import resolve_device
from training.model.head import HeadConfig

LOG = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS = 10.0
STL_FASHION_PAIRS = 72_198
STL_FASHION_PRODUCTS = 38_111


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=STL_FASHION_PAIRS)
    parser.add_argument("--products", type=int, default=STL_FASHION_PRODUCTS)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1280, help="backbone feature dimension (1280: Lite0)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (the first also warms up)")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--variants", nargs="+", default=["default", "hard-pool"],
                        choices=["default", "hard-pool", "separate"], help="training configurations to time")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_train.json")
    return parser


def synthetic(pairs: int, products: int, categories: int, dim: int, seed: int = 0) -> tuple[PairFeatures, Products]:
    rng = np.random.default_rng(seed)
    category = rng.integers(0, categories, size=products)
    product_features = np.abs(rng.normal(size=(products, dim))).astype(np.float32)  # post-ReLU-like pooled features
    positives = rng.integers(0, products, size=pairs)
    scene_features = np.abs(product_features[positives] + rng.normal(size=(pairs, dim)).astype(np.float32))
    return PairFeatures(scene_features, positives.astype(np.int64)), Products(product_features, category)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    pairs, products = synthetic(args.pairs, args.products, args.categories, args.dim)
    defaults = TrainConfig(epochs=args.epochs)
    variants = {
        "default": (defaults, False),
        "hard-pool": (replace(defaults, hard_pool=20), False),
        "separate": (defaults, True),
    }
    rows = []
    for name in args.variants:
        config, separate = variants[name]
        head_config = HeadConfig(in_dim=args.dim, separate=separate)
        started = time.perf_counter()
        result = train_head(pairs, products, head_config, config, val=None, device=device, progress=False)
        total = time.perf_counter() - started
        epoch_seconds = [record["seconds"] for record in result.history]
        # The last epoch is the steady state (the first pays one-off warm-up; hard-pool refreshes from epoch 2).
        steady = epoch_seconds[-1]
        scaled = steady * STL_FASHION_PAIRS / args.pairs
        rows.append({"variant": name, "epoch_seconds": epoch_seconds, "steady_epoch_seconds": round(steady, 3),
                     "epoch_seconds_at_72k_pairs": round(scaled, 3), "pairs_per_second": round(args.pairs / steady),
                     "total_seconds": round(total, 3), "meets_target": scaled <= TARGET_SECONDS,
                     "config": config.to_dict(), "separate_heads": separate})
        print(f"{name:<10} epoch {steady:6.2f} s ({args.pairs} pairs) -> {scaled:6.2f} s at {STL_FASHION_PAIRS} pairs "
              f"[target <= {TARGET_SECONDS:.0f} s: {'met' if scaled <= TARGET_SECONDS else 'MISSED'}]")
    report = {
        "benchmark": "head training time per epoch on cached features",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "pairs": args.pairs, "products": args.products, "categories": args.categories, "dim": args.dim,
        "target_seconds": TARGET_SECONDS,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
