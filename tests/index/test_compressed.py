"""--memory-budget: compressed indexes (IVF + SQ8 / PQ) when float vectors would not fit, searched and filtered."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import ann
from index.ann import (
    OverBudget,
    build_index,
    choose_spec,
    exact_neighbours,
    index_bytes,
    parse_size,
    recall_at_k,
    rerank,
    tune_search_params,
)
from index.build import build
from index.errors import Refused
from index.selection import FilteredIndex


def _clustered(count: int, dim: int, clusters: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered(12_000, 32)


@pytest.fixture(scope="module")
def pq(vectors) -> tuple:
    """(spec, index) of the compressed index a 300 kB budget gives 12,000 x 32 vectors (built once: ~6 s)."""
    spec = choose_spec(len(vectors), exact_threshold=1000, dim=32, memory_budget=300_000)
    return spec, build_index(vectors, spec)


def test_parse_size():
    assert parse_size("2GB") == 2 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5k") == 1536 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("two gigs")


def test_budget_picks_the_best_index_that_fits():
    count, dim = 1_000_000, 128
    assert choose_spec(count, dim=dim).factory == "IVF4096,Flat"  # no budget: as before
    assert choose_spec(count, dim=dim, memory_budget=2**30).factory == "IVF4096,Flat"  # 520 MB fits
    assert choose_spec(count, dim=dim, memory_budget=300 * 2**20).factory == "IVF4096,SQ8"
    assert choose_spec(count, dim=dim, memory_budget=100 * 2**20).factory == "IVF4096,PQ64x8np"
    assert choose_spec(count, dim=dim, memory_budget=30 * 2**20).factory == "IVF4096,PQ16x8np"
    assert index_bytes("IVF4096,PQ16x8np", count, dim) < 30 * 2**20 < index_bytes("IVF4096,PQ32x8np", count, dim)
    assert index_bytes("IVF4096,PQ16x8", count, dim) == index_bytes("IVF4096,PQ16x8np", count, dim)  # older manifests
    with pytest.raises(OverBudget):
        choose_spec(count, dim=dim, memory_budget=10 * 2**20)
    assert choose_spec(1000, dim=dim, memory_budget=2**30).factory == "Flat"  # small: exact stays exact


def test_pq_index_is_smaller_and_tuned(vectors, pq):
    spec, index = pq
    assert spec.factory == "IVF307,PQ8x8np"
    params, recall = tune_search_params(index, vectors, spec, rerank_candidates=0)
    assert len(faiss.serialize_index(index)) < vectors.nbytes / 3
    assert 0.3 < recall < 0.9 and params["nprobe"] < faiss.extract_index_ivf(index).nlist  # plateau stops early
    # Tuned as served, re-ranked from the float vectors: the same probes find nearly every true neighbour.
    params, reranked = tune_search_params(index, vectors, spec)
    assert reranked >= 0.97 > recall and params["nprobe"] < faiss.extract_index_ivf(index).nlist


def test_rerank_from_stored_vectors_restores_recall(vectors, pq, tmp_path):
    index = faiss.clone_index(pq[1])
    faiss.extract_index_ivf(index).nprobe = 16
    queries = _clustered(50, 32, seed=1)
    truth = exact_neighbours(vectors, queries, 10)
    plain = recall_at_k(index.search(queries, 10)[1], truth)
    np.save(tmp_path / "vectors.npy", vectors)
    stored = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    candidates = index.search(queries, 100)[1]
    reranked = np.stack([rerank(stored, q, rows, 10)[1] for q, rows in zip(queries, candidates, strict=True)])
    assert recall_at_k(reranked, truth) > max(plain, 0.9)
    scores, rows = rerank(stored, queries[0], candidates[0], 10)
    np.testing.assert_allclose(scores, vectors[rows] @ queries[0], atol=1e-6)
    assert np.all(np.diff(scores) <= 0)


def test_filtered_search_on_a_pq_index_is_exact_over_its_codes(vectors, pq):
    index = faiss.clone_index(pq[1])
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()
    decoded = ivf.reconstruct_n(0, ivf.ntotal)  # what the codes say each vector is
    filtered = FilteredIndex(index)
    rng = np.random.default_rng(3)
    for query in _clustered(5, 32, seed=2):
        allowed = np.sort(rng.choice(len(vectors), 300, replace=False))
        scores, rows = filtered.search(query, 10, allowed)
        assert len(rows) == 10 and set(rows.tolist()) <= set(allowed.tolist())
        expected = allowed[np.argsort(-(decoded[allowed] @ query), kind="stable")[:10]]
        assert rows.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, decoded[rows] @ query, atol=1e-4)


def test_build_refuses_a_budget_no_index_fits(dataset_dir, checkpoint_path, tmp_path):
    with pytest.raises(Refused, match="memory-budget"):
        build(dataset_dir, checkpoint_path, tmp_path / "out", device="cpu", workers=0, progress=False,
              runtime="torch", export=False, duplicate_threshold=0.0, memory_budget=100)
    assert not (tmp_path / "out" / "current").exists()


def test_exact_neighbours_scans_in_chunks_alike(vectors, monkeypatch, tmp_path):
    queries = _clustered(20, 32, seed=4)
    whole = ann.exact_neighbours(vectors, queries, 10)
    np.save(tmp_path / "vectors.npy", vectors)
    monkeypatch.setattr(ann, "EXACT_CHUNK", 1000)  # 12 chunks of a memory map, merged
    chunked = ann.exact_neighbours(np.load(tmp_path / "vectors.npy", mmap_mode="r"), queries, 10)
    assert chunked.tolist() == whole.tolist()


def test_which_indexes_are_re_ranked():
    assert [ann.is_compressed(f) for f in ("Flat", "IVF64,Flat", "HNSW32", "HNSW32,Flat")] == [False] * 4
    assert all(ann.is_compressed(f) for f in ("IVF64,SQ8", "IVF4096,PQ16x8np", "IVF4096,PQ64x8"))
    assert ann.rerank_pool(10) == 200 and ann.rerank_pool(100) == 400 and ann.rerank_pool(10, 50) == 50


def test_rerank_keeps_the_tie_rule_when_it_sorts_only_the_best():
    rng = np.random.default_rng(7)
    vectors = rng.integers(0, 3, size=(500, 4)).astype(np.float32)  # many equal scores
    query = np.ones(4, np.float32)
    rows = rng.permutation(500)[:300]
    scores, best = rerank(vectors, query, rows, 20)
    candidates = np.unique(rows)
    all_scores = vectors[candidates] @ query
    expected = candidates[np.lexsort((candidates, -all_scores))[:20]]  # every candidate sorted: ties by lower row
    assert best.tolist() == expected.tolist()
    np.testing.assert_array_equal(scores, vectors[best] @ query)
