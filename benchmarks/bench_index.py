"""Index benchmarks: build throughput vs the bare backbone, single-query latency, a 1M-vector category.

    .venv/bin/python benchmarks/bench_index.py [--products 1024] [--vectors 1000000] [--compare-hnsw 200000]

Prints each number and writes them all to benchmarks/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image, ImageDraw

from index.ann import RECALL_K, build_index, choose_spec, exact_neighbours, recall_at_k, tune_search_params
from index.artifact import CategoryIndex, open_artifact
from index.build import build
from training.model.arrays import load_array
from training.model.backbones import load_backbone
from training.model.batch_runtime import batch_runtime
from training.model.checkpoint import Checkpoint, load_embedder, save_checkpoint
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import Preprocess

LOG = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "index.json"
STL_LARGEST_CATEGORY = 11_780  # Apparel & Accessories|Shoes


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clustered(count: int, dim: int, clusters: int, seed: int, centres_seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres: what learned embeddings of a catalogue look like.

    The centres depend only on `centres_seed`, so another `seed` draws held-out queries of the same catalogue.
    """
    centres = np.random.default_rng(centres_seed).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # chunked: the float64 temporaries of 1M rows would double RSS
        end = min(count, start + 100_000)
        chunk = centres[rng.integers(0, clusters, end - start)]
        chunk += 0.6 * rng.standard_normal((end - start, dim)).astype(np.float32)
        vectors[start:end] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def single_query_ms(search, queries: np.ndarray, k: int) -> dict:
    for query in queries[:20]:
        search(query[None, :], k)  # warm-up
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query[None, :], k)
        times.append((time.perf_counter() - started) * 1e3)
    return {"mean_ms": float(np.mean(times)), "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99))}


def make_catalogue(root: Path, count: int, seed: int = 0) -> Path:
    """`count` 320x320 product JPEGs in 4 categories (decode cost close to real catalogue images)."""
    rng = np.random.default_rng(seed)
    categories = {}
    for i in range(count):
        pid = f"b{i:05d}"
        categories[pid] = f"Apparel & Accessories|Cat{i % 4}"
        image = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, 240, 2))
            draw.ellipse([x, y, x + int(rng.integers(20, 80)), y + int(rng.integers(20, 80))],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = root / "images" / "products" / f"{pid}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=90)
    (root / "categories.json").write_text(json.dumps(categories))
    (root / "pairs.jsonl").write_text("")
    (root / "images" / "scenes").mkdir(parents=True, exist_ok=True)
    return root


def bench_build(workdir: Path, products: int, batch_size: int, workers: int,
                runtimes: tuple[str, ...] = ("torch", "openvino")) -> dict:
    """Per runtime: its bare batched forward (backbone + head on pre-decoded arrays) and the build's embedding
    rate with it, in the same run (the build decodes in `workers` DataLoader processes meanwhile)."""
    data = make_catalogue(workdir / "data", products)
    backbone = load_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, hidden_dim=512, out_dim=128)).eval()
    checkpoint = workdir / "model.pt"
    save_checkpoint(checkpoint, Checkpoint(head.config, head.state_dict(), backbone.name, backbone.weights_sha256,
                                           Preprocess(backbone.image_size, backbone.mean, backbone.std, 0.1)))
    embedder = load_embedder(checkpoint, "auto")
    paths = sorted((data / "images" / "products").glob("*.jpg"))
    arrays = np.stack([load_array(path, None, embedder.preprocess) for path in paths])  # pre-decoded
    started = time.perf_counter()
    decoded = [load_array(path, None, embedder.preprocess) for path in paths]
    decode_rate = len(decoded) / (time.perf_counter() - started)
    del decoded
    results: dict = {"products": products, "batch_size": batch_size, "workers": workers,
                     "decode_one_core_products_per_s": round(decode_rate, 2), "target_embed_vs_bare": 0.8}
    for name in runtimes:
        with batch_runtime(embedder, name) as runtime:  # type: ignore[arg-type]
            runtime.vectors(arrays[:batch_size], "product")  # warm-up (oneDNN / OpenVINO primitive creation)
            started = time.perf_counter()
            for start in range(0, len(arrays), batch_size):
                runtime.vectors(arrays[start:start + batch_size], "product")
            bare = len(arrays) / (time.perf_counter() - started)
        root = workdir / f"artifacts-{name}"
        started = time.perf_counter()
        build(data, checkpoint, root, device="auto", batch_size=batch_size, workers=workers, progress=False,
              runtime=name)  # type: ignore[arg-type]
        total = time.perf_counter() - started
        provenance = open_artifact(root).manifest.provenance
        embed_rate = provenance.embed_products_per_second or float("nan")
        results[name] = {
            "device": provenance.device, "embed_runtime": provenance.embed_runtime,
            "bare_forward_products_per_s": round(bare, 2),
            "build_embed_products_per_s": embed_rate,
            "build_end_to_end_products_per_s": round(products / total, 2),  # export + checks included
            "embed_vs_bare": round(embed_rate / bare, 3),
        }
    if "torch" in results and "openvino" in results:
        results["openvino_vs_torch_build_embed"] = round(
            results["openvino"]["build_embed_products_per_s"] / results["torch"]["build_embed_products_per_s"], 3)
    return results


def bench_latency(dim: int = 128, k: int = RECALL_K) -> dict:
    vectors = clustered(STL_LARGEST_CATEGORY, dim, clusters=200, seed=1)
    queries = clustered(1000, dim, clusters=200, seed=2)
    spec = choose_spec(len(vectors))
    index = build_index(vectors, spec)
    category = CategoryIndex("shoes", index, [f"p{i}" for i in range(len(vectors))])
    faiss.omp_set_num_threads(1)
    try:
        raw = single_query_ms(index.search, queries, k)
        loader = single_query_ms(category.search, queries, k)
    finally:
        faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    return {"vectors": len(vectors), "dim": dim, "k": k, "factory": spec.factory, "faiss_threads": 1,
            "faiss_search": raw, "category_index_search": loader, "target_ms": 1.0}


def bench_large(count: int, dim: int, approximate: str, k: int = RECALL_K, queries: int = 500) -> dict:
    rss_before = rss_mib()
    vectors = clustered(count, dim, clusters=max(64, count // 500), seed=3)
    probe = clustered(queries, dim, clusters=max(64, count // 500), seed=3 + 1)  # held out: not in the index
    rss_data = rss_mib()
    spec = choose_spec(count, exact_threshold=0, approximate=approximate)  # type: ignore[arg-type]
    started = time.perf_counter()
    index = build_index(vectors, spec, progress=False)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    params, tuned = tune_search_params(index, vectors, spec, k=k)
    tune_s = time.perf_counter() - started
    rss_index = rss_mib()
    truth = exact_neighbours(vectors, probe, k)
    found = index.search(probe, k)[1]
    recall = recall_at_k(found, truth)
    faiss.omp_set_num_threads(1)
    try:
        latency = single_query_ms(index.search, probe, k)
    finally:
        faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    return {
        "vectors": count, "dim": dim, "factory": spec.factory, "search_params": params,
        "build_s": round(build_s, 2), "tune_s": round(tune_s, 2), "tuning_recall": round(tuned, 4),
        f"recall_at_{k}_held_out": round(recall, 4), "single_query": latency,
        "index_mib": round(len(faiss.serialize_index(index)) / 2**20),
        "rss_mib": {"before": round(rss_before), "with_vectors": round(rss_data), "with_index": round(rss_index),
                    "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "targets": {"recall": 0.95, "query_ms": 5.0},
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 1024: with 256 (8 batches) the first batch's decode, before any forward pass, was a tenth of the time.
    parser.add_argument("--products", type=int, default=1024, help="images for the build-throughput part")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "openvino"],
                        choices=["torch", "openvino", "onnxruntime"], help="runtimes the build part compares")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="size of the large synthetic category")
    parser.add_argument("--approximate", choices=["ivf", "hnsw"], default="ivf")
    parser.add_argument("--compare-hnsw", type=int, default=0,
                        help="also build HNSW at this size (and IVF at the same size) for comparison; 0 = skip")
    parser.add_argument("--skip", nargs="*", default=[], choices=["build", "latency", "large"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Merge into earlier results so parts can be re-run alone (--skip).
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results |= {"machine": {"cpus": faiss.omp_get_max_threads(), "platform": platform.platform(),
                                 "faiss": faiss.__version__, "torch": torch.__version__,
                                 "cuda": torch.cuda.is_available()}}
    if "build" not in args.skip:
        with tempfile.TemporaryDirectory() as workdir:
            results["build"] = bench_build(Path(workdir), args.products, args.batch_size, args.workers,
                                           tuple(args.runtimes))
        print("build:", json.dumps(results["build"]), flush=True)
    if "latency" not in args.skip:
        results["latency"] = bench_latency()
        print("latency:", json.dumps(results["latency"]), flush=True)
    if "large" not in args.skip:
        results["large"] = bench_large(args.vectors, 128, args.approximate)
        print("large:", json.dumps(results["large"]), flush=True)
    if args.compare_hnsw:
        results["compare"] = {family: bench_large(args.compare_hnsw, 128, family) for family in ("ivf", "hnsw")}
        print("compare:", json.dumps(results["compare"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
