"""Compressed indexes for huge categories (--memory-budget) at 1M and 10M products: memory per product,
recall@50 with and without re-ranking, single-query latency, build time.

    .venv/bin/python benchmarks/bench_compressed.py [--vectors 1000000] [--dim 128] [--queries 200]
    nohup .venv/bin/python benchmarks/bench_compressed.py --vectors 10000000 --max-minutes 150 > 10m.log 2>&1 &

Synthetic clustered unit vectors (bench_index.clustered's distribution, written a chunk at a time into a .npy in
--scratch and read back memory-mapped, so 10M x 128 floats (5 GB) never sit in RAM); held-out queries of the
same catalogue; recall@50 against exact search (index.ann.exact_neighbours, which scans a memory map in chunks).

Every index kind of one size shares one coarse quantizer: it is trained once on the build's sample (64 rows a
list) and every row is assigned to its list once; each kind then trains only its codes (on the build's own
sample, index.ann.training_sample) and adds the rows in chunks with their lists. On 2 busy cores training it and
assigning the rows took 37 min at 10M (16,384 lists), so this is what makes the 10M run fit; both are kept in
--scratch and reused by the next run of the same vectors (its JSON then reports the first run's seconds).
`build_seconds` is a kind's own part; `standalone_build_seconds` adds the shared part: what
`python -m index build` pays for that kind.
Tuning is the build's (index.ann.tune_search_params: compressed kinds tuned for their re-ranked recall).

"+rerank" is what the service serves (service/search.py): the best index.ann.rerank_pool(50) = 200 rows by code,
re-scored from the stored float vectors, memory-mapped (index.ann.rerank). "filtered" is the service's filtered
search with 0.1%, 1% and 5% of the rows allowed (index.selection.FilteredIndex; compressed kinds re-ranked, or
scored from the float vectors alone when few rows are allowed: service.search.DIRECT_FRACTION). Single
queries, one thread (a server runs many requests side by side). Each size is one run; its result replaces that
size's entry in benchmarks/results/compressed.json, written again after every index kind (a run stopped by
--max-minutes keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from bench_index import clustered, single_query_ms
from faiss.contrib.ivf_tools import add_preassigned, replace_ivf_quantizer

from index.ann import (
    ADD_CHUNK,
    RECALL_K,
    RERANK_CANDIDATES,
    IndexSpec,
    compressed_specs,
    exact_neighbours,
    index_bytes,
    is_compressed,
    ivf_nlist,
    recall_at_k,
    rerank,
    rerank_pool,
    training_sample,
    tune_search_params,
)
from index.selection import FilteredIndex
from service.search import DIRECT_FRACTION

LOG = logging.getLogger("bench_compressed")

RESULTS = Path(__file__).parent / "results" / "compressed.json"
FILTER_FRACTIONS = (0.001, 0.01, 0.05)
GENERATE_CHUNK = 100_000  # bench_index.clustered's chunk: the same rows come out
# IVF-Flat holds the float vectors in RAM (5.2 GB at 10M): the kind a budget rules out, measured up to here.
FLOAT_UP_TO = 2_000_000
SWEEP_NPROBE = (8, 16, 32, 64)
SWEEP_CANDIDATES = (200, 500, 1000, 2000)


def write_clustered(path: Path, count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """bench_index.clustered(count, dim, clusters, seed) written into a .npy a chunk at a time; a memory map of it.

    A finished file (its `.done` marker beside it) is reused: 10M rows take minutes to draw."""
    done = path.with_suffix(".done")
    if path.is_file() and done.is_file():
        stored = np.load(path, mmap_mode="r")
        if stored.shape == (count, dim):
            return stored
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, GENERATE_CHUNK):
        end = min(count, start + GENERATE_CHUNK)
        chunk = centres[rng.integers(0, clusters, end - start)]
        chunk += 0.6 * rng.standard_normal((end - start, dim)).astype(np.float32)
        out[start:end] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    out.flush()
    del out
    done.touch()
    return np.load(path, mmap_mode="r")


def rss_mb() -> float:
    """Resident memory now (MB), file pages of memory maps included."""
    return round(int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20, 1)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def train_quantizer(stored: np.ndarray, nlist: int, seed: int = 0) -> faiss.Index:
    """The coarse quantizer the build trains for `nlist` lists (IVF-Flat's sample: 64 rows a list)."""
    spec = IndexSpec(f"IVF{nlist},Flat", "approximate")
    ivf = faiss.index_factory(stored.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.ascontiguousarray(training_sample(stored, spec, seed), dtype=np.float32))
    return faiss.clone_index(faiss.extract_index_ivf(ivf).quantizer)


def assign(quantizer: faiss.Index, stored: np.ndarray) -> np.ndarray:
    """Each row's list, a chunk at a time."""
    lists = np.empty(len(stored), dtype=np.int64)
    for start in range(0, len(stored), ADD_CHUNK):
        chunk = np.ascontiguousarray(stored[start:start + ADD_CHUNK], dtype=np.float32)
        lists[start:start + len(chunk)] = quantizer.search(chunk, 1)[1][:, 0]
    return lists


def shared_quantizer(stored: np.ndarray, nlist: int, stem: Path) -> tuple[faiss.Index, np.ndarray, dict]:
    """The coarse quantizer and every row's list, with the seconds they took; kept in --scratch (stem.faiss,
    stem.lists.npy, stem.json) and reused by the next run of the same vectors, reporting the first run's seconds."""
    record = stem.with_suffix(".json")
    if record.is_file():
        shared = {**json.loads(record.read_text()), "reused": True}
        return faiss.read_index(str(stem.with_suffix(".faiss"))), np.load(stem.with_suffix(".lists.npy")), shared
    t0 = time.perf_counter()
    quantizer = train_quantizer(stored, nlist)
    quantizer_seconds = time.perf_counter() - t0
    LOG.info("coarse quantizer (%d lists) trained in %.0f s", nlist, quantizer_seconds)
    t0 = time.perf_counter()
    lists = assign(quantizer, stored)
    assign_seconds = time.perf_counter() - t0
    LOG.info("%d rows assigned in %.0f s", len(stored), assign_seconds)
    faiss.write_index(quantizer, str(stem.with_suffix(".faiss")))
    np.save(stem.with_suffix(".lists.npy"), lists)
    shared = {"quantizer_train_seconds": quantizer_seconds, "assign_seconds": assign_seconds,
              "load_average": round(os.getloadavg()[0], 2)}
    record.write_text(json.dumps(shared))
    return quantizer, lists, {**shared, "reused": False}


def build_with(spec: IndexSpec, stored: np.ndarray, quantizer: faiss.Index, lists: np.ndarray,
               seed: int = 0) -> tuple[faiss.Index, float, float]:
    """(index, train seconds, add seconds) of `spec` over the rows, its quantizer and assignment given."""
    index = faiss.index_factory(stored.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    replace_ivf_quantizer(ivf, faiss.clone_index(quantizer))  # trained: IndexIVF.train then trains the codes only
    started = time.perf_counter()
    index.train(np.ascontiguousarray(training_sample(stored, spec, seed), dtype=np.float32))
    trained = time.perf_counter()
    for start in range(0, len(stored), ADD_CHUNK):
        chunk = np.ascontiguousarray(stored[start:start + ADD_CHUNK], dtype=np.float32)
        add_preassigned(ivf, chunk, np.ascontiguousarray(lists[start:start + len(chunk)]))
    return index, trained - started, time.perf_counter() - trained


def reranked_search(index: faiss.Index, stored: np.ndarray, query: np.ndarray, k: int,
                    candidates: int = RERANK_CANDIDATES) -> np.ndarray:
    """The service's search of a compressed index: the best rerank_pool(k) by code, re-scored from the floats."""
    return rerank(stored, query[0], index.search(query, rerank_pool(k, candidates))[1][0], k)[1]


def recall_reranked(index: faiss.Index, stored: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                    candidates: int = RERANK_CANDIDATES) -> float:
    found = [reranked_search(index, stored, query[None, :], RECALL_K, candidates) for query in queries]
    return recall_at_k(np.stack([np.pad(f, (0, RECALL_K - len(f)), constant_values=-1) for f in found]), truth)


def filtered_ms(index: faiss.Index, stored: np.ndarray, queries: np.ndarray, count: int,
                compressed: bool) -> dict[str, dict]:
    """The service's filtered search (service/search.py) with 0.1%, 1% and 5% of the rows allowed: IVF-Flat
    exact through FilteredIndex; a compressed kind scores a small allowed set from its float vectors
    (DIRECT_FRACTION), a larger one through its codes, re-ranked."""
    filtered = FilteredIndex(index)
    out = {}
    for fraction in FILTER_FRACTIONS:
        allowed = np.sort(np.random.default_rng(5).choice(len(stored), int(len(stored) * fraction), replace=False))
        times = []
        for query in queries[:count]:
            started = time.perf_counter()
            if compressed and len(allowed) <= len(stored) * DIRECT_FRACTION:
                rerank(stored, query, allowed, RECALL_K)
            elif compressed:
                rerank(stored, query, filtered.search(query, rerank_pool(RECALL_K), allowed)[1], RECALL_K)
            else:
                filtered.search(query, RECALL_K, allowed)
            times.append((time.perf_counter() - started) * 1e3)
        out[f"{fraction:.1%}"] = {"mean_ms": round(float(np.mean(times)), 2),
                                  "p50_ms": round(float(np.median(times)), 2)}
    return out


def _ms(latency: dict) -> dict:
    return {name: round(value, 4) for name, value in latency.items()}


def measure(spec: IndexSpec, stored: np.ndarray, queries: np.ndarray, truth: np.ndarray, quantizer: faiss.Index,
            lists: np.ndarray, shared_seconds: float, scratch: Path, threads: int, filtered_queries: int) -> dict:
    faiss.omp_set_num_threads(threads)  # builds use every core, as the build does
    index, train_seconds, add_seconds = build_with(spec, stored, quantizer, lists)
    started = time.perf_counter()
    params, tuned = tune_search_params(index, stored, spec)
    tune_seconds = time.perf_counter() - started
    faiss.omp_set_num_threads(1)  # single-query latency as one server thread sees it
    file = scratch / "index.faiss"
    faiss.write_index(index, str(file))  # its size, without a second copy of the index in RAM
    size = file.stat().st_size
    file.unlink()
    build_seconds = train_seconds + add_seconds
    row = {
        "factory": spec.factory, "search_params": params, "tuned_leave_one_out_recall": round(tuned, 4),
        "train_seconds": round(train_seconds, 1), "add_seconds": round(add_seconds, 1),
        "build_seconds": round(build_seconds, 1), "standalone_build_seconds": round(build_seconds + shared_seconds, 1),
        "tune_seconds": round(tune_seconds, 1),
        "bytes_per_product": round(size / len(stored), 1),
        "estimated_bytes_per_product": round(index_bytes(spec.factory, *stored.shape) / len(stored), 1),
        "rss_mb_after_build": rss_mb(),
        "recall_at_50": round(recall_at_k(index.search(queries, RECALL_K)[1], truth), 4),
        "latency": _ms(single_query_ms(lambda q, k: index.search(q, k), queries, RECALL_K)),
    }
    if is_compressed(spec.factory):
        row["rerank_candidates"] = rerank_pool(RECALL_K)
        row["recall_at_50_rerank"] = round(recall_reranked(index, stored, queries, truth), 4)
        row["latency_rerank"] = _ms(single_query_ms(lambda q, k: reranked_search(index, stored, q, k), queries,
                                                    RECALL_K))
        ivf = faiss.extract_index_ivf(index)
        tuned_nprobe, sweep = ivf.nprobe, {}
        for nprobe in sorted({tuned_nprobe, *SWEEP_NPROBE}):  # do more probes pay once re-ranked?
            ivf.nprobe = nprobe
            sweep[str(nprobe)] = {
                "recall_at_50": round(recall_at_k(index.search(queries, RECALL_K)[1], truth), 4),
                "recall_at_50_rerank": round(recall_reranked(index, stored, queries, truth), 4),
                "p50_ms_rerank": round(single_query_ms(lambda q, k: reranked_search(index, stored, q, k), queries,
                                                       RECALL_K)["p50_ms"], 4)}
        ivf.nprobe = tuned_nprobe
        row["by_nprobe"] = sweep
        row["by_rerank_candidates"] = {  # STL_RERANK_CANDIDATES: what a larger pool buys where the codes are coarse
            str(candidates): {
                "recall_at_50_rerank": round(recall_reranked(index, stored, queries, truth, candidates), 4),
                "p50_ms_rerank": round(single_query_ms(
                    lambda q, k, c=candidates: reranked_search(index, stored, q, k, c), queries, RECALL_K)["p50_ms"],
                    4)}
            for candidates in SWEEP_CANDIDATES}
    # Other work on the machine shows in every latency here: the 1-minute load average when it was measured.
    row["load_average"] = round(os.getloadavg()[0], 2)
    row["filtered_ms"] = filtered_ms(index, stored, queries, filtered_queries,
                                          is_compressed(spec.factory))
    print(json.dumps(row), flush=True)
    return row


def save(run: dict, results: Path = RESULTS) -> None:
    """This size's run into compressed.json, beside the other sizes' runs."""
    runs = []
    if results.is_file():
        previous = json.loads(results.read_text())
        runs = [r for r in previous.get("runs", []) if r.get("vectors") != run["vectors"]]
    runs = sorted([*runs, run], key=lambda r: r["vectors"])
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "runs": runs,
        "note": "bytes_per_product: the index file (codes, ids, centroids, codebooks); the service's id list "
                "(~60-80 bytes a product in Python) and the memory-mapped float vectors (on disk, 4 x dim "
                "bytes a product, paged in as re-ranking reads them) are not counted",
    }, indent=2))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128, help="the head's out_dim (training.model.head)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--filtered-queries", type=int, default=20)
    parser.add_argument("--float-up-to", type=int, default=FLOAT_UP_TO,
                        help="measure IVF-Flat (float vectors in RAM) up to this many vectors")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the vectors file (4 x dim bytes a vector; kept and reused); default: a "
                             "temporary folder, removed afterwards")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON file the run goes into")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no index kind after this many minutes (the ones left are listed as skipped)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    threads = faiss.omp_get_max_threads()
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.scratch or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        stored = write_clustered(scratch / f"vectors-{args.vectors}x{args.dim}-{args.clusters}.npy", args.vectors,
                                 args.dim, args.clusters, seed=0)
        LOG.info("%d x %d vectors ready (%.0f s)", args.vectors, args.dim, time.perf_counter() - started)
        queries = clustered(args.queries, args.dim, args.clusters, seed=1)
        truth = exact_neighbours(stored, queries, RECALL_K)
        nlist = ivf_nlist(args.vectors)
        quantizer, lists, shared = shared_quantizer(stored, nlist, scratch / f"quantizer-{args.vectors}x{args.dim}-"
                                                    f"{args.clusters}-{nlist}")
        quantizer_seconds, assign_seconds = shared["quantizer_train_seconds"], shared["assign_seconds"]
        specs = [*([IndexSpec(f"IVF{nlist},Flat", "approximate")] if args.vectors <= args.float_up_to else []),
                 *compressed_specs(args.vectors, args.dim)]
        run = {
            "vectors": args.vectors, "dim": args.dim, "clusters": args.clusters, "queries": args.queries,
            "k": RECALL_K, "float_bytes_per_product": 4 * args.dim, "nlist": nlist,
            "quantizer_train_seconds": round(quantizer_seconds, 1), "assign_seconds": round(assign_seconds, 1),
            "quantizer_reused": shared["reused"],
            "indexes": [], "skipped": [],
            "machine": {"cpus": threads, "platform": platform.platform()},
        }
        for spec in specs:
            elapsed = (time.perf_counter() - started) / 60
            if args.max_minutes is not None and elapsed > args.max_minutes:
                LOG.warning("%.0f min passed: %s skipped", elapsed, spec.factory)
                run["skipped"].append(spec.factory)
                continue
            kind_started = time.perf_counter()
            row = measure(spec, stored, queries, truth, quantizer, lists, quantizer_seconds + assign_seconds,
                          scratch, threads, args.filtered_queries)
            row["seconds"] = round(time.perf_counter() - kind_started, 1)
            run["indexes"].append(row)
            run.update(peak_rss_mb=peak_rss_mb(), seconds=round(time.perf_counter() - started, 1))
            save(run, args.out)
        if args.float_up_to < args.vectors:
            run["skipped"].append(f"IVF{nlist},Flat: {4 * args.dim * args.vectors / 2**30:.1f} GiB of float vectors "
                                  "in RAM, what --memory-budget rules out")
        run.update(peak_rss_mb=peak_rss_mb(), seconds=round(time.perf_counter() - started, 1))
        save(run, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
