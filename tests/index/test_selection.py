"""Filtered search is the exact top-k of the allowed rows, for Flat, IVF and HNSW alike."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index.ann import IndexSpec, build_index
from index.selection import FilteredIndex, make_selector, search_with_selector

COUNT, DIM, K = 2000, 32, 10


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    # Clustered, like embeddings: IVF lists differ, and the list bounds actually prune.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, DIM))
    return unit(centres[rng.integers(0, 40, COUNT)] + 0.4 * rng.normal(size=(COUNT, DIM)))


def brute_force(vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    scores = vectors[allowed] @ query[0]
    return allowed[np.lexsort((allowed, -scores))[:k]]


SPECS = [
    IndexSpec("Flat", "exact"),
    IndexSpec("IVF32,Flat", "approximate", {"nprobe": 2}),  # a low nprobe: a selector alone would miss rows
    IndexSpec("HNSW32,Flat", "approximate", {"efSearch": 16}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.factory)
def test_filtered_search_equals_brute_force(vectors: np.ndarray, spec: IndexSpec) -> None:
    index = build_index(vectors, spec, use_gpu=False)
    searcher = FilteredIndex(index)
    rng = np.random.default_rng(1)
    for size in (0, 1, 3, K, COUNT // 100, COUNT // 10, COUNT // 2, COUNT):
        for trial in range(6):
            allowed = np.sort(rng.choice(COUNT, size=size, replace=False))
            # Half the queries sit on a stored vector: their best matches crowd one list.
            query = vectors[rng.integers(COUNT)][None] if trial % 2 else unit(rng.normal(size=(1, DIM)))
            scores, rows = searcher.search(query, K, allowed)
            expected = brute_force(vectors, query, allowed, K)
            assert len(rows) == min(K, size)
            assert set(rows.tolist()) <= set(allowed.tolist())
            np.testing.assert_array_equal(rows, expected)
            np.testing.assert_allclose(scores, vectors[rows] @ query[0], atol=1e-5)


def test_selective_filter_within_one_cluster(vectors: np.ndarray) -> None:
    index = build_index(vectors, SPECS[1], use_gpu=False)
    searcher = FilteredIndex(index)
    query = vectors[:1]
    # The 40 rows nearest the query, minus the nearest 25: the top-k lies just outside the probed lists' best.
    nearest = np.argsort(-(vectors @ query[0]))
    allowed = np.sort(nearest[25:65])
    _, rows = searcher.search(query, K, allowed)
    np.testing.assert_array_equal(rows, brute_force(vectors, query, allowed, K))


def test_unsorted_duplicate_and_out_of_range_rows(vectors: np.ndarray) -> None:
    index = build_index(vectors, SPECS[0], use_gpu=False)
    allowed = np.array([17, 3, 17, -1, COUNT + 5, 900, 3])
    _, rows = search_with_selector(index, vectors[:1], K, allowed)
    assert sorted(rows.tolist()) == [3, 17, 900]


def test_unfiltered_search_is_the_index_search(vectors: np.ndarray) -> None:
    index = build_index(vectors, SPECS[1], use_gpu=False)
    scores, rows = search_with_selector(index, vectors[5:6], K, None)
    expected_scores, expected_rows = index.search(vectors[5:6], K)
    np.testing.assert_array_equal(rows, expected_rows[0])
    np.testing.assert_allclose(scores, expected_scores[0])


def test_selectors_pick_bitmap_when_dense() -> None:
    sparse, _ = make_selector(np.array([1, 5]), 1000)
    dense, bitmap = make_selector(np.arange(0, 1000, 2), 1000)
    assert isinstance(sparse, faiss.IDSelectorBatch) and isinstance(dense, faiss.IDSelectorBitmap)
    assert len(bitmap) == 125
    assert dense.is_member(4) and not dense.is_member(5) and sparse.is_member(5) and not sparse.is_member(4)


def test_other_index_types_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot search"):
        FilteredIndex(faiss.IndexLSH(8, 16))
