"""Duplicate grouping: same digest or near vectors are one group, far ones are not; leaders and transitivity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from index.dedup import group_duplicates, image_digest, similar_pairs


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def vectors() -> np.ndarray:
    """Five far-apart random unit vectors in 64-d (inner products near 0)."""
    return unit(np.random.default_rng(0).standard_normal((5, 64)))


def near(vector: np.ndarray, seed: int, noise: float = 0.02) -> np.ndarray:
    return unit((vector + noise * np.random.default_rng(seed).standard_normal(vector.shape))[None])[0]


def test_image_digest_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "p.jpg"
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    assert image_digest(path) == hashlib.sha256(b"\xff\xd8 not really a jpeg").hexdigest()


def test_far_products_stay_apart_and_same_digest_is_grouped(vectors: np.ndarray) -> None:
    ids = ["a", "b", "c", "d", "e"]
    alone = group_duplicates(ids, vectors, None, threshold=0.9, popularity={})
    assert alone == {pid: pid for pid in ids}
    # b and d have the same picture but (say, another crop of the embedding run) unrelated vectors.
    digests = ["1", "2", "3", "2", "5"]
    assert group_duplicates(ids, vectors, digests, threshold=0.9, popularity={}) == {
        "a": "a", "b": "b", "c": "c", "d": "b", "e": "e"}
    assert group_duplicates(ids, None, digests, popularity={"d": 3})["b"] == "d"  # digests alone


def test_near_vectors_grouped_by_threshold_and_leader_is_most_popular(vectors: np.ndarray) -> None:
    ids = ["p0", "p1", "p2", "p3", "p4", "p5"]
    rows = np.vstack([vectors, near(vectors[2], seed=1)])  # p5 is a near copy of p2
    score = float(rows[5] @ rows[2])
    assert 0.95 < score < 1.0
    groups = group_duplicates(ids, rows, None, threshold=0.95, popularity={"p5": 7, "p2": 3})
    assert groups["p2"] == groups["p5"] == "p5"  # the more popular member leads
    assert all(groups[pid] == pid for pid in ("p0", "p1", "p3", "p4"))
    tie = group_duplicates(ids, rows, None, threshold=0.95, popularity={})
    assert tie["p5"] == tie["p2"] == "p2"  # a tie goes to the smaller id
    apart = group_duplicates(ids, rows, None, threshold=min(1.0, score + 1e-3), popularity={})
    assert apart["p5"] == "p5"


def test_threshold_is_inclusive() -> None:
    rows = np.array([[1.0, 0.0], [0.75, np.sqrt(1 - 0.75**2)]], dtype=np.float32)  # inner product exactly 0.75
    assert group_duplicates(["a", "b"], rows, None, threshold=0.75, popularity={})["b"] == "a"
    assert group_duplicates(["a", "b"], rows, None, threshold=0.7501, popularity={})["b"] == "b"


def test_grouping_is_transitive_across_rules(vectors: np.ndarray) -> None:
    # x ~ y by vector, y ~ z by digest, z ~ w by vector: one group of four; v stays alone.
    x = vectors[0]
    y = near(x, seed=2)
    z, v = vectors[1], vectors[3]
    w = near(z, seed=3)
    ids = ["x", "y", "z", "w", "v"]
    groups = group_duplicates(ids, np.vstack([x, y, z, w, v]), ["dx", "same", "same", "dw", "dv"], threshold=0.95,
                              popularity={"w": 2, "v": 9})
    assert groups == {"x": "w", "y": "w", "z": "w", "w": "w", "v": "v"}


def test_similar_pairs_blocks_agree_with_the_full_product() -> None:
    rng = np.random.default_rng(4)
    base = unit(rng.standard_normal((6, 16)))
    rows = unit(np.repeat(base, 5, axis=0) + 0.1 * rng.standard_normal((30, 16)))
    scores = rows @ rows.T
    expected = {(i, j) for i in range(30) for j in range(i + 1, 30) if scores[i, j] >= 0.9}
    assert expected  # the clusters give pairs to find
    for block_rows in (1, 7, 1024):
        assert {tuple(pair) for pair in similar_pairs(rows, 0.9, block_rows).tolist()} == expected


def test_rejects_mismatched_inputs(vectors: np.ndarray) -> None:
    with pytest.raises(ValueError, match="distinct"):
        group_duplicates(["a", "a", "b", "c", "d"], vectors, None, 0.9, {})
    with pytest.raises(ValueError, match="vectors"):
        group_duplicates(["a", "b"], vectors, None, 0.9, {})
    with pytest.raises(ValueError, match="digests"):
        group_duplicates(["a", "b", "c", "d", "e"], vectors, ["1"], 0.9, {})
