"""`python -m training evaluate`: HR@K, binary accuracy and AUC of models on the held-out scenes.

Every query (a test pair) ranks ALL catalogue products of its positive's category. Models are
"rankers" that score queries against candidates; `evaluate_models` is the library entry point the
trainer (early stopping on the validation split) and the benchmarks call.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from training.data.popularity import Popularity
from training.data.split import Split, split_by_scene
from training.data.stl import Pair, STLDataset, STLFormatError
from training.eval.metrics import (
    DEFAULT_KS,
    auc_per_query,
    binary_outcomes,
    hit_rate_at_k,
    mean_reciprocal_rank,
    plot_hr_curves,
    positive_ranks,
    random_hit_rate,
    sample_negatives,
)
from training.model.checkpoint import load_embedder

if TYPE_CHECKING:
    from training.model.embedder import Embedder

LOG = logging.getLogger(__name__)

Part = Literal["train", "val", "test"]
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
            raise ValueError(f"candidates of {category!r} must be sorted by product id (the tie-break order)")
    popularity = popularity if popularity is not None else Popularity.from_pairs(split.train, dataset.categories)
    groups, queries = _groups(queries_all, dataset, candidates, seed)
    if not queries:
        raise ValueError(f"the {part} split has no pairs to evaluate ({len(queries_all)} before filtering)")
    n = len(queries)
    cold = np.fromiter((popularity.count(q.product_id) == 0 for q in queries), dtype=bool, count=n)
    n_candidates = np.empty(n, dtype=np.int64)
    for group in groups:
        n_candidates[group.query_index] = len(group.candidates)
    random_curve = random_hit_rate(n_candidates, ks)

    models: dict[str, dict] = {}
    for ranker in rankers:
        if ranker.name in models:
            raise ValueError(f"two models are named {ranker.name!r}; names must be unique")
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


# ---------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training evaluate",
        description="Rank all products of each test pair's category; report HR@K, binary accuracy and AUC.",
    )
    parser.add_argument("--data", type=Path, required=True, help="STL dataset directory")
    parser.add_argument("--model", action="append", required=True, dest="models",
                        help="'popularity', 'knn' (untrained backbone) or a head checkpoint path; repeatable")
    parser.add_argument("--out", type=Path, required=True, help="writes metrics.json and hr_at_k.png here")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the scene split (as in training)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the binary-accuracy negatives")
    parser.add_argument("--part", choices=["val", "test"], default="test", help="which split part to rank")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="K values of HR@K")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the knn baseline")
    parser.add_argument("--backbone-weights", type=Path, default=None, help="weights file for the backbone")
    parser.add_argument("--context", type=float, default=0.1,
                        help="context margin around a scene crop's bbox for the knn baseline (checkpoints "
                             "carry their own)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="feature cache directory (default: <data>/.cache/features)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64, help="feature extraction batch size")
    parser.add_argument("--workers", type=int, default=2, help="image decoding workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}-{number}", number + 1
    taken.add(candidate)
    return candidate


def _embedders(args: argparse.Namespace) -> list[tuple[str, Embedder]]:
    """(name, embedder) for every non-popularity --model, in the order given."""
    from training.model.backbones import load_backbone
    from training.model.embedder import Embedder

    embedders: list[tuple[str, Embedder]] = []
    taken = {"popularity"}
    for spec in args.models:
        if spec == "popularity":
            continue
        if spec == "knn":
            backbone = load_backbone(args.backbone, args.backbone_weights)
            embedders.append((_unique_name("knn", taken), Embedder(backbone, None, args.context, args.device)))
            continue
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec!r} is not 'popularity', 'knn' or an existing checkpoint file")
        embedder = load_embedder(path, args.device, args.backbone_weights)
        embedders.append((_unique_name(path.stem, taken), embedder))
    return embedders


@dataclass
class _Plan:
    rankers: list[Ranker]
    candidates: dict[str, list[str]]  # the same candidates for every model
    keep: Callable[[Pair], bool] | None  # the same queries for every model


def _build_rankers(args: argparse.Namespace, dataset: STLDataset, queries: Sequence[Pair],
                   popularity: Popularity) -> _Plan:
    embedders = dict(_embedders(args))
    grouped = candidates_by_category(dataset)
    features_by_backbone: dict[tuple[str, str, str], FeatureSource] = {}
    if embedders:
        from training.fit.features import cache_features

        cache_root = args.cache if args.cache is not None else args.data / ".cache" / "features"
        needed = sorted({dataset.categories.of(q.product_id) for q in queries if q.product_id in dataset.categories})
        products = [pid for category in needed for pid in grouped.get(category, [])]
        for embedder in embedders.values():
            # Features depend on the backbone and the crop preprocessing, never on the head: models that
            # share them share one extraction.
            key = _feature_key(embedder)
            if key not in features_by_backbone:
                features_by_backbone[key] = cache_features(
                    dataset, embedder, cache_root, pairs=list(queries), products=products,
                    batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
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
    for spec in args.models:
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


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    ks = sorted(set(args.ks))
    if any(k < 1 for k in ks):
        print(f"error: every --ks value must be >= 1, got {args.ks}", file=sys.stderr)
        return 2
    if args.context < 0 or args.batch_size < 1 or args.workers < 0:
        print("error: --context and --workers must be >= 0 and --batch-size >= 1", file=sys.stderr)
        return 2
    try:
        dataset = STLDataset.open(args.data)
    except (FileNotFoundError, STLFormatError) as exc:
        print(f"error: cannot open dataset {args.data}: {exc}", file=sys.stderr)
        return 2
    split = split_by_scene(dataset.pairs, seed=args.split_seed)
    queries = getattr(split, args.part)
    if not queries:
        print(f"error: the {args.part} split of {args.data} is empty ({len(dataset.pairs)} pairs in all)",
              file=sys.stderr)
        return 2
    popularity = Popularity.from_pairs(split.train, dataset.categories)
    try:
        plan = _build_rankers(args, dataset, queries, popularity)
        results = evaluate_models(dataset, split, plan.rankers, ks, args.seed, args.part, popularity,
                                  plan.candidates, plan.keep)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as exc:
        # CheckpointMismatch is a ValueError; BackboneUnavailable and FeatureCacheError are RuntimeErrors:
        # each carries a message that says what to do.
        print(f"error: {exc}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "data": str(args.data), "part": args.part, "split_seed": args.split_seed, "seed": args.seed,
        "ks": ks, "models": args.models, "backbone": args.backbone, "context": args.context,
        "n_pairs": len(dataset.pairs), "n_train": len(split.train), "n_val": len(split.val),
        "n_test": len(split.test), "n_left_out": results["n_left_out"],
    }
    metrics = {"models": results["models"], "random": results["random"], "config": config}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_hr_curves({name: m["hr"] for name, m in results["models"].items()}, results["random"],
                   args.out / "hr_at_k.png", title=f"HR@K on the {args.part} split ({results['n_queries']} pairs)")
    print(format_table(results, ks))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'hr_at_k.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
