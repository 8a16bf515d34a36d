"""Duplicate detection: precision and recall of the vector rule of `index.dedup.group_duplicates` by threshold.

    .venv/bin/python benchmarks/bench_dedup.py [--products 600] [--checkpoint head.pt] [--thresholds 0.95 0.97]

Generates a synthetic catalogue (whose duplicate listings are byte-identical copies, listed in duplicates.json),
adds re-uploaded copies of those same products (re-encoded, resized, slightly cropped: what the digest rule
cannot see), embeds every product picture with the default backbone (raw normalised features) or a head
checkpoint, and groups each category by vector alone. Pairs of listings of one product are the positives; a
pair of two distinct drawn products in one group is a false merge. Prints the table and writes
benchmarks/results/dedup.json.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from index.dedup import DEFAULT_DUPLICATE_THRESHOLD, group_duplicates
from training.data.stl import STLDataset
from training.data.synth.plan import SynthConfig, generate, read_duplicates
from training.model.backbones import load_backbone
from training.model.checkpoint import load_embedder
from training.model.embedder import Embedder

LOG = logging.getLogger(__name__)
DEFAULT_OUT = Path(__file__).parent / "results" / "dedup.json"
THRESHOLDS = (0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995)
BATCH = 32


def reuploads(image: Image.Image) -> dict[str, Image.Image]:
    """The picture as another shop would re-upload it: the digest rule misses all of these."""
    width, height = image.size
    dx, dy = round(0.04 * width), round(0.04 * height)
    return {
        "reencoded": _jpeg(image, 70),
        "resized": _jpeg(image.resize((round(0.75 * width), round(0.75 * height)), Image.Resampling.BICUBIC), 85),
        "cropped": _jpeg(image.crop((dx, dy, width - dx // 2, height - dy // 2)).resize((width, height)), 85),
    }


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def embed_all(embedder: Embedder, images: list[Image.Image]) -> np.ndarray:
    return np.concatenate([embedder.embed(images[start:start + BATCH], None, "product")
                           for start in range(0, len(images), BATCH)])


def pairs_of(group_of: dict[str, str]) -> set[tuple[str, str]]:
    members: dict[str, list[str]] = defaultdict(list)
    for listing, group in group_of.items():
        members[group].append(listing)
    return {pair for group in members.values() for pair in combinations(sorted(group), 2)}


def evaluate(ids: list[str], vectors: np.ndarray, category_of: dict[str, str], product_of: dict[str, str],
             kind_of: dict[str, str], thresholds: list[float]) -> list[dict]:
    """Pair precision / recall of the vector rule per threshold over the categories of `ids`."""
    truth = pairs_of(product_of)
    rows = []
    for threshold in thresholds:
        predicted: set[tuple[str, str]] = set()
        for category_ids, category_vectors in _by_category(ids, vectors, category_of):
            predicted |= pairs_of(group_duplicates(category_ids, category_vectors, None, threshold, {}))
        hits = predicted & truth
        by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for pair in truth:  # recall per kind of copy: a pair is as hard as its harder member
            kind = "identical" if all(kind_of[p] in ("original", "identical") for p in pair) else \
                next(kind_of[p] for p in pair if kind_of[p] not in ("original", "identical"))
            by_kind[kind][0] += pair in hits
            by_kind[kind][1] += 1
        false_merges = predicted - truth
        rows.append({
            "threshold": threshold,
            "precision": round(len(hits) / len(predicted), 4) if predicted else 1.0,
            "recall": round(len(hits) / len(truth), 4),
            "recall_by_copy": {kind: round(found / total, 4) for kind, (found, total) in sorted(by_kind.items())},
            "false_merged_pairs": len(false_merges),
            "distinct_products_merged": len({product_of[p] for pair in false_merges for p in pair}),
        })
    return rows


def _by_category(ids: list[str], vectors: np.ndarray, category_of: dict[str, str]
                 ) -> Iterator[tuple[list[str], np.ndarray]]:
    rows: dict[str, list[int]] = defaultdict(list)
    for row, listing in enumerate(ids):
        rows[category_of[listing]].append(row)
    for category_rows in rows.values():
        yield [ids[row] for row in category_rows], vectors[category_rows]


def similarity_summary(ids: list[str], vectors: np.ndarray, category_of: dict[str, str],
                       product_of: dict[str, str], kind_of: dict[str, str]) -> dict:
    """How close distinct products of one category come, against how far copies of one product drift."""
    row_of = {listing: row for row, listing in enumerate(ids)}
    to_original: dict[str, list[float]] = defaultdict(list)
    for listing, kind in kind_of.items():
        if kind != "original":
            to_original[kind].append(float(vectors[row_of[listing]] @ vectors[row_of[product_of[listing]]]))
    distinct_max, copies_min = [], []
    for category_ids, category_vectors in _by_category(ids, vectors, category_of):
        scores = category_vectors @ category_vectors.T
        same = np.array([[product_of[a] == product_of[b] for b in category_ids] for a in category_ids])
        np.fill_diagonal(same, True)
        distinct = np.where(same, -np.inf, scores)
        distinct_max.extend(distinct.max(axis=1)[np.isfinite(distinct.max(axis=1))].tolist())
        np.fill_diagonal(same, False)
        if same.any():
            copies_min.append(float(scores[same].min()))
    distinct_max = np.asarray(distinct_max)
    return {
        "distinct_nearest_neighbour_ip": {f"p{q}": round(float(np.percentile(distinct_max, q)), 4)
                                          for q in (50, 90, 99, 100)},
        "copy_pair_ip_min": round(min(copies_min), 4) if copies_min else None,
        "copy_to_original_ip": {kind: {"min": round(min(values), 4), "median": round(float(np.median(values)), 4)}
                                for kind, values in sorted(to_original.items())},
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--duplicate-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="a head checkpoint (default: raw efficientnet_lite0)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = SynthConfig(scenes=4, products=args.products, seed=args.seed, duplicate_rate=args.duplicate_rate)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        generate(root, config, workers=args.threads)
        dataset = STLDataset.open(root)
        duplicates = read_duplicates(root)
        ids, images = [], []
        category_of, product_of, kind_of = {}, {}, {}
        for listing in dataset.catalogue():
            with Image.open(dataset.product_path(listing)) as image:
                images.append(image.convert("RGB"))
            ids.append(listing)
            product_of[listing] = duplicates.get(listing, listing)
            kind_of[listing] = "identical" if listing in duplicates else "original"
            category_of[listing] = dataset.categories.of(listing)
        for original in sorted(set(duplicates.values())):
            with Image.open(dataset.product_path(original)) as image:
                copies = reuploads(image.convert("RGB"))
            for kind, copy in copies.items():
                listing = f"{original}-{kind}"
                ids.append(listing)
                images.append(copy)
                product_of[listing], kind_of[listing] = original, kind
                category_of[listing] = dataset.categories.of(original)
        reupload_listings = len(ids) - len(dataset.catalogue())
    generated = time.perf_counter() - started

    embedder = (load_embedder(args.checkpoint, device="cpu") if args.checkpoint is not None
                else Embedder(load_backbone("efficientnet_lite0"), None, device="cpu"))
    embed_started = time.perf_counter()
    vectors = embed_all(embedder, images)
    embedded = time.perf_counter() - embed_started

    rows = evaluate(ids, vectors, category_of, product_of, kind_of, args.thresholds)
    result = {
        "embedder": {"backbone": embedder.backbone.name, "head_sha256": embedder.head_sha256, "dim": embedder.dim},
        "products": args.products,
        "duplicate_listings": len(duplicates),
        "reupload_listings": reupload_listings,
        "listings": len(ids),
        "default_threshold": DEFAULT_DUPLICATE_THRESHOLD,
        "similarity": similarity_summary(ids, vectors, category_of, product_of, kind_of),
        "by_threshold": rows,
        "seconds": {"generate": round(generated, 1), "embed": round(embedded, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "machine": {"platform": platform.platform(), "threads": args.threads},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(ids)} listings ({len(duplicates)} identical copies, {result['reupload_listings']} re-uploads), "
          f"{embedder.backbone.name} head={embedder.head_sha256 is not None}")
    similarity = result["similarity"]
    print(f"distinct products, nearest neighbour's inner product: {similarity['distinct_nearest_neighbour_ip']}")
    print(f"copies to their original: {similarity['copy_to_original_ip']}")
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7}  recall by copy kind / false merges")
    for row in rows:
        print(f"{row['threshold']:>9} {row['precision']:>9.3f} {row['recall']:>7.3f}  {row['recall_by_copy']} "
              f"/ {row['false_merged_pairs']} pairs, {row['distinct_products_merged']} products")
    print(f"wrote {args.out} in {result['seconds']['total']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
