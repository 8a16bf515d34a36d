"""Ranking metrics on plain numbers: ranks, HR@K, binary accuracy, AUC, the random reference.

Candidates of a query are always given in product-id ascending order, so "candidate id < positive id"
is "candidate index < positive index" and ties are broken the same way everywhere (popularity's
`top()` included). This is the only rank rule: the trainer's early stopping ranks with it too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50, 100)


def _check_scores(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [queries, candidates], got shape {scores.shape}")
    if positives.shape != (scores.shape[0],):
        raise ValueError(f"need one positive index per query: {positives.shape} vs {scores.shape[0]} queries")
    if positives.size and (positives.min() < 0 or positives.max() >= scores.shape[1]):
        raise ValueError(f"positive indices must lie in [0, {scores.shape[1]})")
    return scores, positives


def positive_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of each query's positive among its candidates (higher score = better).

    rank = #(score > positive's) + #(score == positive's and candidate index < positive index).
    """
    scores, positives = _check_scores(scores, positives)
    rows = np.arange(scores.shape[0])
    positive_scores = scores[rows, positives][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < positives[:, None]
    ahead = (scores > positive_scores) | ((scores == positive_scores) & earlier)
    return ahead.sum(axis=1).astype(np.int64)


def hit_rate_at_k(ranks: Sequence[int] | np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose positive is in the top K, per K; NaN for no queries."""
    ranks = np.asarray(ranks, dtype=np.int64)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")
    if ranks.size == 0:
        return {k: float("nan") for k in ks}
    return {k: float(np.mean(ranks < k)) for k in ks}


def mean_reciprocal_rank(ranks: Sequence[int] | np.ndarray) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(1.0 / (ranks + 1.0))) if ranks.size else float("nan")


def sample_negatives(positives: np.ndarray, n_candidates: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random candidate index other than the positive per query; -1 when there is none."""
    positives = np.asarray(positives, dtype=np.int64)
    if n_candidates < 2:
        return np.full(positives.shape, -1, dtype=np.int64)
    draw = rng.integers(0, n_candidates - 1, size=positives.shape)
    return draw + (draw >= positives)  # skip over the positive without biasing the others


def binary_outcomes(scores: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Per (scene, positive, negative) triplet: 1 if the positive scores higher, 1/2 on a tie, else 0.

    Queries whose negative is -1 (a category with a single product) get NaN and are left out of means.
    """
    scores, positives = _check_scores(scores, positives)
    negatives = np.asarray(negatives, dtype=np.int64)
    rows = np.arange(scores.shape[0])
    valid = negatives >= 0
    pos = scores[rows, positives]
    neg = scores[rows, np.where(valid, negatives, 0)]
    outcome = np.where(pos > neg, 1.0, np.where(pos == neg, 0.5, 0.0))
    return np.where(valid, outcome, np.nan)


def binary_accuracy(scores: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> float:
    return _nanmean(binary_outcomes(scores, positives, negatives))


def auc_per_query(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Fraction of the other candidates scored below the positive (ties 1/2); NaN with no other candidate."""
    scores, positives = _check_scores(scores, positives)
    n_others = scores.shape[1] - 1
    if n_others < 1:
        return np.full(scores.shape[0], np.nan)
    positive_scores = scores[np.arange(scores.shape[0]), positives][:, None]
    below = (scores < positive_scores).sum(axis=1)
    tied = (scores == positive_scores).sum(axis=1) - 1  # the positive ties with itself
    return (below + 0.5 * tied) / n_others


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    return _nanmean(auc_per_query(scores, positives))


def random_hit_rate(n_candidates: Sequence[int] | np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """Expected HR@K of a uniformly random ranking: mean over queries of min(K, n) / n."""
    n = np.asarray(n_candidates, dtype=np.float64)
    if n.size and n.min() < 1:
        raise ValueError("every query needs at least one candidate (its positive)")
    ks = [int(k) for k in ks]
    if n.size == 0:
        return {k: float("nan") for k in ks}
    return {k: float(np.mean(np.minimum(k, n) / n)) for k in ks}


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
