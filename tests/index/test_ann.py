"""Index construction: exact vs approximate recall on seeded clustered vectors, faiss write/read round trip."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from index.ann import (
    IndexSpec,
    build_index,
    choose_spec,
    exact_neighbours,
    ivf_nlist,
    leave_one_out_recall,
    recall_at_k,
    tune_search_params,
    tuning_rows,
)


def clustered(count: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around fixed centres (the same for every seed, so another seed gives held-out queries)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, count)] + 0.4 * rng.standard_normal((count, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_recall_at_k_by_hand() -> None:
    found = np.array([[0, 1, 2], [5, 6, -1]])
    truth = np.array([[2, 1, 9], [5, 7, 8]])
    assert recall_at_k(found, truth) == pytest.approx(3 / 6)


def test_leave_one_out_recall_ignores_the_query_itself() -> None:
    vectors = clustered(300, seed=6)
    flat = build_index(vectors, choose_spec(len(vectors)))
    rows = tuning_rows(len(vectors), 50)
    assert leave_one_out_recall(flat, vectors, rows, 10) == pytest.approx(1.0)
    # One inverted list per vector, one list probed: the index returns the query itself and nothing else,
    # which leave-one-out scores as finding none of the true neighbours.
    only_self = build_index(vectors[rows], IndexSpec("IVF50,Flat", "approximate", {"nprobe": 1}))
    assert leave_one_out_recall(only_self, vectors[rows], np.arange(len(rows)), 10) < 0.2


def test_choose_spec_switches_at_the_threshold() -> None:
    assert choose_spec(1000, exact_threshold=1000) == IndexSpec("Flat", "exact")
    approximate = choose_spec(1001, exact_threshold=1000)
    assert approximate.kind == "approximate" and approximate.factory == f"IVF{ivf_nlist(1001)},Flat"
    assert choose_spec(5000, exact_threshold=10, approximate="hnsw").factory.startswith("HNSW")
    assert ivf_nlist(1_000_000) == 4096 and ivf_nlist(100) == 2
    with pytest.raises(ValueError, match="unknown approximate"):
        choose_spec(5000, exact_threshold=10, approximate="lsh")  # type: ignore[arg-type]


def test_exact_index_matches_brute_force() -> None:
    vectors = clustered(500)
    index = build_index(vectors, choose_spec(len(vectors)))
    queries = clustered(20, seed=1)
    scores, rows = index.search(queries, 10)
    brute = queries @ vectors.T
    np.testing.assert_array_equal(rows[:, 0], brute.argmax(axis=1))
    np.testing.assert_allclose(scores[:, 0], brute.max(axis=1), rtol=1e-5)


@pytest.mark.parametrize("family", ["ivf", "hnsw"])
def test_approximate_recall_against_exact(family: str) -> None:
    vectors = clustered(4000, seed=2)
    spec = choose_spec(len(vectors), exact_threshold=100, approximate=family)  # type: ignore[arg-type]
    index = build_index(vectors, spec)
    params, tuned = tune_search_params(index, vectors, spec, k=50)
    assert tuned >= 0.97 and params
    queries = clustered(200, seed=3)  # held out: not in the index, same distribution
    recall = recall_at_k(index.search(queries, 50)[1], exact_neighbours(vectors, queries, 50))
    assert recall >= 0.95
    # With a single probed list / tiny beam the approximate index is measurably worse: the check has teeth.
    space = faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe" if family == "ivf" else "efSearch", 1)
    assert recall_at_k(index.search(queries, 50)[1], exact_neighbours(vectors, queries, 50)) < recall


def test_index_write_read_round_trip(tmp_path: Path) -> None:
    vectors = clustered(2000, seed=4)
    spec = choose_spec(len(vectors), exact_threshold=100)
    index = build_index(vectors, spec)
    params, _ = tune_search_params(index, vectors, spec)
    faiss.write_index(index, str(tmp_path / "cat.faiss"))
    loaded = faiss.read_index(str(tmp_path / "cat.faiss"))
    faiss.ParameterSpace().set_index_parameter(loaded, "nprobe", params["nprobe"])
    queries = clustered(10, seed=5)
    before, after = index.search(queries, 5), loaded.search(queries, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    assert loaded.ntotal == 2000 and loaded.metric_type == faiss.METRIC_INNER_PRODUCT
