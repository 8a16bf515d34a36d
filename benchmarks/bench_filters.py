"""Filtered vs unfiltered search: the catalogue's filter evaluation plus the exact filtered FAISS search.

    .venv/bin/python benchmarks/bench_filters.py [--big 1000000] [--queries 200]

Part 1, the 38,111-product catalogue in the real STL category mix (every category exact, as the build
makes them): a filter that selects ~10 % of a category (`colour=red`) vs no filter, per query p50/p99, and
the ratio (target <= 2x). Part 2, one category of `--big` products behind an IVF index (as the build
chooses above 50,000) with a 1 %-selective filter (`pattern=p07`): filter evaluation (uncached, columns
loaded) + filtered search, p50/p99 (target <= 20 ms), and the one-time cost of loading the columns.
Vectors are clustered synthetic unit vectors; the catalogue is a real SQLite file written by the real
writer. Prints the figures and writes benchmarks/results/filters.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index.ann import build_index, choose_spec, tune_search_params
from index.catalogue import Catalogue, CatalogueRow, write_catalogue
from index.filters import parse_filter
from index.selection import FilteredIndex
from training.data.products import Product
from training.data.synth import load_category_counts

RESULTS = Path(__file__).parent / "results" / "filters.json"
DIM = 128
COLOURS = ("red", "blue", "black", "white", "green", "grey", "beige", "pink", "navy", "brown")  # ~10 % each


def clustered(count: int, rng: np.random.Generator, clusters: int = 64) -> np.ndarray:
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.standard_normal((count, DIM)).astype(np.float32)
    faiss.normalize_L2(vectors)
    return vectors


def product_rows(category: str, count: int, rng: np.random.Generator, patterns: int, prefix: str) -> list[CatalogueRow]:
    colours = rng.integers(0, len(COLOURS), count)
    pattern = rng.integers(0, patterns, count)
    prices = np.round(np.exp(rng.normal(3.8, 0.6, count)), 2)
    stock = rng.random(count) >= 0.1
    return [
        CatalogueRow(Product(f"{prefix}{row:07d}", brand=f"brand{row % 20}", price=float(prices[row]),
                             in_stock=bool(stock[row]),
                             labels={"colour": (COLOURS[colours[row]],), "pattern": (f"p{pattern[row]:02d}",)}),
                     category, row)
        for row in range(count)
    ]


def timed_queries(run, queries: np.ndarray) -> np.ndarray:
    times = []
    for query in queries:
        started = time.perf_counter()
        run(query[None, :])
        times.append((time.perf_counter() - started) * 1000.0)
    return np.asarray(times)


def summary(times: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def part_catalogue(root: Path, queries: int, k: int, rng: np.random.Generator) -> dict:
    counts = dict(load_category_counts())
    total = sum(counts.values())
    sizes = {path: max(1, round(38_111 * n / total)) for path, n in counts.items()}
    rows: list[CatalogueRow] = []
    indexes: dict[str, FilteredIndex] = {}
    for number, (category, size) in enumerate(sizes.items()):
        rows += product_rows(category, size, rng, patterns=10, prefix=f"c{number}x")
        indexes[category] = FilteredIndex(build_index(clustered(size, rng), choose_spec(size)))
    path = root / "catalogue.sqlite"
    write_catalogue(path, rows)
    catalogue = Catalogue.open(path)
    category = max(sizes, key=sizes.get)
    index = indexes[category]
    expression = parse_filter("colour=red", catalogue.label_keys())
    query_vectors = clustered(queries, rng)
    catalogue.columns(category)  # loaded once per version in the service, before the first request

    def unfiltered(query: np.ndarray) -> None:
        index.search(query, k, None)

    def in_stock_only(query: np.ndarray) -> None:  # what a request without a filter searches (~90 %)
        index.search(query, k, catalogue.allowed_rows(category, None))

    def filtered_cached(query: np.ndarray) -> None:
        index.search(query, k, catalogue.allowed_rows(category, expression))

    def filtered_uncached(query: np.ndarray) -> None:
        catalogue._cache.clear()  # every query evaluates the filter again, as a never-seen filter would
        index.search(query, k, catalogue.allowed_rows(category, expression))

    allowed = catalogue.allowed_rows(category, expression)
    results = {
        "products": sum(sizes.values()), "category": category, "category_products": sizes[category],
        "filter": "colour=red (+ in_stock default)", "selectivity": round(len(allowed) / sizes[category], 4),
    }
    for _ in range(2):  # warm-up pass, then the measured one
        times = {"unfiltered": timed_queries(unfiltered, query_vectors),
                 "in_stock_only": timed_queries(in_stock_only, query_vectors),
                 "filtered_cached": timed_queries(filtered_cached, query_vectors),
                 "filtered_uncached": timed_queries(filtered_uncached, query_vectors)}
    results |= {name: summary(values) for name, values in times.items()}
    base = results["unfiltered"]["p50_ms"]
    results["ratio_cached"] = round(results["filtered_cached"]["p50_ms"] / base, 2)
    results["ratio_uncached"] = round(results["filtered_uncached"]["p50_ms"] / base, 2)
    results["ratio_in_stock_only"] = round(results["in_stock_only"]["p50_ms"] / base, 2)
    catalogue.close()
    return results


def part_big(root: Path, count: int, queries: int, k: int, rng: np.random.Generator) -> dict:
    category = "Apparel & Accessories|Shoes"
    started = time.perf_counter()
    vectors = clustered(count, rng, clusters=256)
    spec = choose_spec(count)
    index = build_index(vectors, spec)
    params, recall = tune_search_params(index, vectors, spec)
    for name, value in params.items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    build_seconds = time.perf_counter() - started
    path = root / "big.sqlite"
    started = time.perf_counter()
    write_catalogue(path, product_rows(category, count, rng, patterns=100, prefix="big"))
    write_seconds = time.perf_counter() - started
    catalogue = Catalogue.open(path)
    started = time.perf_counter()
    catalogue.columns(category)
    columns_seconds = time.perf_counter() - started
    filtered = FilteredIndex(index)
    expression = parse_filter("pattern=p07", catalogue.label_keys())
    query_vectors = clustered(queries, rng, clusters=256)

    def filter_and_search(query: np.ndarray) -> None:
        catalogue._cache.clear()  # the filter is evaluated for every query: no cached answer
        filtered.search(query, k, catalogue.allowed_rows(category, expression))

    def unfiltered(query: np.ndarray) -> None:
        filtered.search(query, k, None)

    for _ in range(2):
        times = {"unfiltered": timed_queries(unfiltered, query_vectors),
                 "filter_plus_search": timed_queries(filter_and_search, query_vectors)}
    allowed = catalogue.allowed_rows(category, expression)
    # Exactness spot check: the filtered top-k equals brute force over the allowed rows.
    scores, found = filtered.search(query_vectors[:1], k, allowed)
    truth = allowed[np.argsort(-(vectors[allowed] @ query_vectors[0]), kind="stable")[:k]]
    result = {
        "products": count, "index": spec.factory, "search_params": params, "tuning_recall": round(recall, 4),
        "build_seconds": round(build_seconds, 1), "catalogue_write_seconds": round(write_seconds, 1),
        "columns_load_seconds": round(columns_seconds, 2), "filter": "pattern=p07 (+ in_stock default)",
        "selectivity": round(len(allowed) / count, 4), "exact_top_k": bool(set(found.tolist()) == set(truth.tolist())),
    }
    result |= {name: summary(values) for name, values in times.items()}
    catalogue.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=1_000_000, help="products in the one big category (0: skip)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)  # one query at a time, as the service searches
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        results = {"catalogue": part_catalogue(Path(scratch), args.queries, args.k, rng)}
        print(json.dumps(results["catalogue"], indent=1))
        if args.big:
            results["big"] = part_big(Path(scratch), args.big, args.queries, args.k, rng)
            print(json.dumps(results["big"], indent=1))
    ratio = results["catalogue"]["ratio_uncached"]
    print(f"filtered / unfiltered p50 (filter evaluated per query): {ratio}x [target <= 2x: "
          f"{'met' if ratio <= 2 else 'NOT met'}]")
    if args.big:
        p50 = results["big"]["filter_plus_search"]["p50_ms"]
        print(f"{args.big:,} products, 1% filter: filter + search p50 {p50} ms [target <= 20 ms: "
              f"{'met' if p50 <= 20 else 'NOT met'}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
