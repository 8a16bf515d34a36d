"""HR@K, binary accuracy and AUC of models on the held-out scenes (`python -m training evaluate`).

Every query (a test pair) ranks ALL catalogue products of its positive's category. Models are
"rankers" that score queries against candidates; `evaluate_models` compares rankers on one split part
(the benchmarks call it), `evaluate_dataset` is the whole command: models by name, metrics.json, the plot.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from training.data.popularity import Popularity
from training.data.split import Split, split_by_scene
from training.data.stl import Pair, STLDataset
from training.errors import DataError
from training.eval.metrics import (
    DEFAULT_KS,
    auc_per_query,
    binary_outcomes,
    hit_rate_at_k,
    mean_reciprocal_rank,
    positive_ranks,
    random_hit_rate,
    sample_negatives,
)
from training.eval.plot import plot_hr_curves
from training.fit.features import cache_features
from training.io import write_json_atomic
from training.model.backbones import load_backbone
from training.model.checkpoint import load_embedder
from training.model.embedder import Embedder

LOG = logging.getLogger(__name__)

Part = Literal["train", "val", "test"]
METRICS_FILE = "metrics.json"
PLOT_FILE = "hr_at_k.png"
QUERY_CHUNK = 1024  # queries scored at once: bounds the [queries, candidates] matrix (~50 MB for 12k products)


class Ranker(Protocol):
    name: str

    def score(self, queries: Sequence[Pair], candidates: Sequence[str]) -> np.ndarray:
        """Scores [len(queries), len(candidates)]; higher means a better match."""
        ...


class FeatureSource(Protocol):
    """Cached frozen-backbone features (`training.fit.features.CachedFeatures` provides these)."""

    def scene_features(self, pairs: Sequence[Pair]) -> np.ndarray: ...

    def product_features(self, product_ids: Sequence[str]) -> np.ndarray: ...


class PopularityRanker:
    """Same ranking for every scene: the category's products by training-pair count."""

    def __init__(self, popularity: Popularity, name: str = "popularity") -> None:
        self.name = name
        self.popularity = popularity

    def score(self, queries: Sequence[Pair], candidates: Sequence[str]) -> np.ndarray:
        # A read-only broadcast view: one row of memory however many queries there are.
        return np.broadcast_to(self.popularity.scores(candidates), (len(queries), len(candidates)))


class EmbeddingRanker:
    """Inner product of projected scene-crop and product features (unit vectors, so cosine)."""

    def __init__(self, name: str, embedder: Embedder, features: FeatureSource) -> None:
        self.name = name
        self.embedder = embedder
        self.features = features
        # evaluate_models scores a category's queries chunk by chunk against the same candidates:
        # keeping the last candidate set's vectors avoids re-projecting the catalogue per chunk.
        self._cached_candidates: tuple[str, ...] | None = None
        self._cached_vectors: np.ndarray | None = None

    def _product_vectors(self, candidates: Sequence[str]) -> np.ndarray:
        key = tuple(candidates)
        if key != self._cached_candidates or self._cached_vectors is None:
            features = self.features.product_features(list(candidates))
            self._cached_vectors = self.embedder.project(features, "product")
            self._cached_candidates = key
        return self._cached_vectors

    def score(self, queries: Sequence[Pair], candidates: Sequence[str]) -> np.ndarray:
        scenes = self.embedder.project(self.features.scene_features(list(queries)), "scene")
        return scenes @ self._product_vectors(candidates).T


@dataclass
class _Group:
    """The queries of one category and what every model is compared on."""

    category: str
    candidates: list[str]
    query_index: np.ndarray  # positions in the evaluated query list
    positives: np.ndarray  # candidate index of each query's positive
    negatives: np.ndarray  # one seeded random same-category negative per query (-1: none)


def candidates_by_category(dataset: STLDataset) -> dict[str, list[str]]:
    """Catalogue products (those with an image) per full category path, sorted by id."""
    grouped: dict[str, list[str]] = {}
    for product_id in dataset.catalogue():  # sorted, so every list is sorted too
        grouped.setdefault(dataset.categories.of(product_id), []).append(product_id)
    return grouped


def _groups(queries: Sequence[Pair], dataset: STLDataset, candidates: Mapping[str, Sequence[str]],
            seed: int) -> tuple[list[_Group], list[Pair]]:
    by_category: dict[str, list[int]] = {}
    kept: list[Pair] = []
    skipped = 0
    positions: dict[str, dict[str, int]] = {
        category: {pid: i for i, pid in enumerate(products)} for category, products in candidates.items()
    }
    for pair in queries:
        category = dataset.categories.of(pair.product_id) if pair.product_id in dataset.categories else None
        if category is None or pair.product_id not in positions.get(category, {}):
            skipped += 1
            continue
        by_category.setdefault(category, []).append(len(kept))
        kept.append(pair)
    if skipped:
        LOG.warning("left out %d pairs whose product is not in the catalogue (no category or image)", skipped)
    rng = np.random.default_rng(seed)
    groups = []
    for category in sorted(by_category):  # fixed order, so the negatives depend on the seed only
        index = np.asarray(by_category[category], dtype=np.int64)
        products = list(candidates[category])
        positives = np.asarray([positions[category][kept[i].product_id] for i in index], dtype=np.int64)
        groups.append(_Group(category, products, index, positives, sample_negatives(positives, len(products), rng)))
    return groups, kept


def _nan_to_none(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def _clean(hr: Mapping[int, float]) -> dict[int, float | None]:
    return {k: _nan_to_none(v) for k, v in hr.items()}


def _score_group(ranker: Ranker, group: _Group, queries: Sequence[Pair]) -> tuple[np.ndarray, ...]:
    ranks, aucs, outcomes = [], [], []
    for start in range(0, len(group.query_index), QUERY_CHUNK):
        chunk = slice(start, start + QUERY_CHUNK)
        chunk_queries = [queries[i] for i in group.query_index[chunk]]
        scores = np.asarray(ranker.score(chunk_queries, group.candidates))
        if scores.shape != (len(chunk_queries), len(group.candidates)):
            raise ValueError(f"ranker {ranker.name!r} returned scores of shape {scores.shape}, "
                             f"expected {(len(chunk_queries), len(group.candidates))}")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"ranker {ranker.name!r} returned non-finite scores for {group.category!r}")
        positives = group.positives[chunk]
        ranks.append(positive_ranks(scores, positives))
        aucs.append(auc_per_query(scores, positives))
        outcomes.append(binary_outcomes(scores, positives, group.negatives[chunk]))
    return np.concatenate(ranks), np.concatenate(aucs), np.concatenate(outcomes)


def _nanmean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def evaluate_models(
    dataset: STLDataset,
    split: Split,
    rankers: Sequence[Ranker],
    ks: Iterable[int] = DEFAULT_KS,
    seed: int = 0,
    part: Part = "test",
    popularity: Popularity | None = None,
    candidates: Mapping[str, Sequence[str]] | None = None,
    keep: Callable[[Pair], bool] | None = None,
) -> dict:
    """HR@K (overall, per category, warm/cold), binary accuracy and AUC of each ranker on one split part.

    Returns {"models": {name: metrics}, "random": {K: HR}, "n_queries": n, "n_left_out": m}; HR dicts are
    keyed by int K (JSON turns them into strings). Cold = the positive product has no training pair.
    `candidates` (category -> sorted product ids) defaults to the catalogue; `popularity` to the train part;
    `keep` drops queries (e.g. scene crops whose features could not be extracted) for every model alike.
    """
    ks = sorted({int(k) for k in ks})
    queries_all = getattr(split, part)
    if keep is not None:
        queries_all = [pair for pair in queries_all if keep(pair)]
    candidates = candidates if candidates is not None else candidates_by_category(dataset)
    for category, products in candidates.items():
        if list(products) != sorted(products):
            raise DataError(f"candidates of {category!r} must be sorted by product id (the tie-break order)")
    popularity = popularity if popularity is not None else Popularity.from_pairs(split.train, dataset.categories)
    groups, queries = _groups(queries_all, dataset, candidates, seed)
    if not queries:
        raise DataError(f"the {part} split has no pairs to evaluate ({len(queries_all)} before filtering)")
    n = len(queries)
    cold = np.fromiter((popularity.count(q.product_id) == 0 for q in queries), dtype=bool, count=n)
    n_candidates = np.empty(n, dtype=np.int64)
    for group in groups:
        n_candidates[group.query_index] = len(group.candidates)
    random_curve = random_hit_rate(n_candidates, ks)

    models: dict[str, dict] = {}
    for ranker in rankers:
        if ranker.name in models:
            raise DataError(f"two models are named {ranker.name!r}; names must be unique")
        ranks = np.empty(n, dtype=np.int64)
        aucs = np.empty(n, dtype=np.float64)
        outcomes = np.empty(n, dtype=np.float64)
        per_category: dict[str, dict] = {}
        for group in groups:
            group_ranks, group_aucs, group_outcomes = _score_group(ranker, group, queries)
            ranks[group.query_index] = group_ranks
            aucs[group.query_index] = group_aucs
            outcomes[group.query_index] = group_outcomes
            per_category[group.category] = {
                "n_test": len(group.query_index),
                "n_candidates": len(group.candidates),
                "hr": _clean(hit_rate_at_k(group_ranks, ks)),
                "random": _clean(random_hit_rate([len(group.candidates)], ks)),
                "auc": _nanmean(group_aucs),
            }
        models[ranker.name] = {
            "hr": _clean(hit_rate_at_k(ranks, ks)),
            "mrr": _nan_to_none(mean_reciprocal_rank(ranks)),
            "per_category": per_category,
            "binary_accuracy": _nanmean(outcomes),
            "auc": _nanmean(aucs),
            "cold_start_share": float(cold.mean()),
            "hr_warm": _clean(hit_rate_at_k(ranks[~cold], ks)),
            "hr_cold": _clean(hit_rate_at_k(ranks[cold], ks)),
            "n_test": n,
        }
        LOG.info("%s on %s: %s", ranker.name, part,
                 ", ".join(f"HR@{k}={v:.3f}" for k, v in models[ranker.name]["hr"].items()))
    return {"models": models, "random": _clean(random_curve), "n_queries": n,
            "n_left_out": len(getattr(split, part)) - n}


@dataclass(frozen=True)
class EvaluateOptions:
    """What `evaluate` compares and on what: models ('popularity', 'knn' or checkpoint paths) and the split."""

    models: tuple[str, ...]
    part: Part = "test"
    ks: tuple[int, ...] = DEFAULT_KS
    split_seed: int = 0
    seed: int = 0  # of the binary-accuracy negatives
    backbone: str = "efficientnet_lite0"  # of the knn baseline; checkpoints name their own
    backbone_weights: Path | None = None
    context: float = 0.1  # of the knn baseline; checkpoints carry their own

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.ks):
            raise DataError(f"every --ks value must be >= 1, got {list(self.ks)}")
        if self.context < 0:
            raise DataError("--context and --workers must be >= 0 and --batch-size >= 1")
        if not self.models:
            raise DataError("no --model to evaluate")


@dataclass
class Evaluation:
    """What `evaluate_dataset` wrote: `results` as `evaluate_models` returns them, and the files."""

    results: dict
    ks: list[int]
    metrics_path: Path
    plot_path: Path


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}-{number}", number + 1
    taken.add(candidate)
    return candidate


def _embedders(options: EvaluateOptions, device: str) -> list[tuple[str, Embedder]]:
    """(name, embedder) for every non-popularity --model, in the order given."""
    embedders: list[tuple[str, Embedder]] = []
    taken = {"popularity"}
    for spec in options.models:
        if spec == "popularity":
            continue
        if spec == "knn":
            backbone = load_backbone(options.backbone, options.backbone_weights)
            embedders.append((_unique_name("knn", taken), Embedder(backbone, None, options.context, device)))
            continue
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"--model {spec!r} is not 'popularity', 'knn' or an existing checkpoint file")
        embedder = load_embedder(path, device, options.backbone_weights)
        embedders.append((_unique_name(path.stem, taken), embedder))
    return embedders


@dataclass
class _Plan:
    rankers: list[Ranker]
    candidates: dict[str, list[str]]  # the same candidates for every model
    keep: Callable[[Pair], bool] | None  # the same queries for every model


def _build_rankers(options: EvaluateOptions, dataset: STLDataset, queries: Sequence[Pair], popularity: Popularity,
                   cache_root: Path, device: str, batch_size: int, workers: int, progress: bool) -> _Plan:
    embedders = dict(_embedders(options, device))
    grouped = candidates_by_category(dataset)
    features_by_backbone: dict[tuple[str, str, str], FeatureSource] = {}
    if embedders:
        needed = sorted({dataset.categories.of(q.product_id) for q in queries if q.product_id in dataset.categories})
        products = [pid for category in needed for pid in grouped.get(category, [])]
        for embedder in embedders.values():
            # Features depend on the backbone and the crop preprocessing, never on the head: models that
            # share them share one extraction.
            key = _feature_key(embedder)
            if key not in features_by_backbone:
                features_by_backbone[key] = cache_features(
                    dataset, embedder, cache_root, pairs=list(queries), products=products,
                    batch_size=batch_size, workers=workers, progress=progress,
                )
    sources = list(features_by_backbone.values())
    keep: Callable[[Pair], bool] | None = None
    if sources:
        # Images the cache could not decode or crop have no features: leave them out for EVERY model
        # (popularity included), so all models rank the same candidates for the same queries.
        def has_product(pid: str) -> bool:
            return all(getattr(source, "has_product", lambda _: True)(pid) for source in sources)

        def keep(pair: Pair) -> bool:
            return all(getattr(source, "has_scene", lambda _: True)(pair) for source in sources)

        before = sum(len(products) for products in grouped.values())
        grouped = {category: kept for category, products in grouped.items()
                   if (kept := [pid for pid in products if has_product(pid)])}
        if (dropped := before - sum(len(products) for products in grouped.values())):
            LOG.warning("%d products have no features (unreadable images) and are left out", dropped)

    rankers: list[Ranker] = []
    embedder_names = iter(embedders)
    for spec in options.models:
        if spec == "popularity":
            if not any(r.name == "popularity" for r in rankers):  # asked twice: evaluate once
                rankers.append(PopularityRanker(popularity))
        else:
            name = next(embedder_names)
            rankers.append(EmbeddingRanker(name, embedders[name], features_by_backbone[_feature_key(embedders[name])]))
    return _Plan(rankers, grouped, keep)


def _feature_key(embedder: Embedder) -> tuple[str, str, str]:
    return embedder.backbone.name, embedder.backbone.weights_sha256, embedder.preprocess.sha256()


def format_table(results: dict, ks: Sequence[int]) -> str:
    header = f"{'model':<24}" + "".join(f"{'HR@' + str(k):>8}" for k in ks) + f"{'acc':>8}{'AUC':>8}{'cold':>8}"
    lines = [header, "-" * len(header)]

    def number(value: float | None) -> str:
        return f"{value:8.3f}" if value is not None else f"{'-':>8}"

    for name, metrics in results["models"].items():
        lines.append(f"{name:<24}" + "".join(number(metrics["hr"][k]) for k in ks) + number(metrics["binary_accuracy"])
                     + number(metrics["auc"]) + number(metrics["cold_start_share"]))
    lines.append(f"{'random':<24}" + "".join(number(results["random"][k]) for k in ks) + number(0.5) + number(0.5))
    return "\n".join(lines)


def evaluate_dataset(
    data: str | Path,
    out: str | Path,
    options: EvaluateOptions,
    cache: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
) -> Evaluation:
    """Split the dataset by scene, rank one part with every model; write OUT/metrics.json and OUT/hr_at_k.png.

    `cache` (default <data>/.cache/features) holds the backbone features; models sharing a backbone and
    preprocessing share one extraction.
    """
    if batch_size < 1 or workers < 0:
        raise DataError("--context and --workers must be >= 0 and --batch-size >= 1")
    data, out = Path(data), Path(out)
    ks = sorted(set(options.ks))
    try:
        dataset = STLDataset.open(data)
    except (FileNotFoundError, DataError) as exc:
        raise DataError(f"cannot open dataset {data}: {exc}") from exc
    split = split_by_scene(dataset.pairs, seed=options.split_seed)
    queries = getattr(split, options.part)
    if not queries:
        raise DataError(f"the {options.part} split of {data} is empty ({len(dataset.pairs)} pairs in all)")
    popularity = Popularity.from_pairs(split.train, dataset.categories)
    cache_root = Path(cache) if cache is not None else data / ".cache" / "features"
    plan = _build_rankers(options, dataset, queries, popularity, cache_root, device, batch_size, workers, progress)
    results = evaluate_models(dataset, split, plan.rankers, ks, options.seed, options.part, popularity,
                              plan.candidates, plan.keep)

    config = {
        "data": str(data), "part": options.part, "split_seed": options.split_seed, "seed": options.seed,
        "ks": ks, "models": list(options.models), "backbone": options.backbone, "context": options.context,
        "n_pairs": len(dataset.pairs), "n_train": len(split.train), "n_val": len(split.val),
        "n_test": len(split.test), "n_left_out": results["n_left_out"],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / METRICS_FILE, {"models": results["models"], "random": results["random"], "config": config})
    plot_hr_curves({name: m["hr"] for name, m in results["models"].items()}, results["random"], out / PLOT_FILE,
                   title=f"HR@K on the {options.part} split ({results['n_queries']} pairs)")
    return Evaluation(results, ks, out / METRICS_FILE, out / PLOT_FILE)
