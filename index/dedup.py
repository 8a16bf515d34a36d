"""Duplicate products of one category: the same picture (byte digest) or nearly the same vector.

Real catalogues list one product several times (resellers, re-uploads); an index that keeps them all fills a
top-k with copies of one item. `group_duplicates` maps every product to its group's id, the most popular member
(ties by the smaller id), so a caller can keep one product per group. Groups are transitive (union-find): if A
matches B and B matches C, all three are one group.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from training.data.stl import is_uri, read_bytes

LOG = logging.getLogger(__name__)

# Inner product of unit vectors at or above which two products count as one. A false merge hides a distinct
# product from every answer while a missed duplicate only repeats one, so the default favours precision.
# benchmarks/bench_dedup.py, 600 synthetic products, 12 byte-identical listings + 36 re-uploads (JPEG q70,
# resized 75 %, cropped 4 %); pair precision / re-upload recall of the vector rule alone:
#   threshold             0.95         0.97         0.98         0.99
#   trained head (128-d)  1.00 / 0.50  1.00 / 0.15  1.00 / 0.07  1.00 / 0     (distinct products' nearest: max 0.945)
#   raw backbone (1280-d) 0.77 / 0.85  0.89 / 0.41  0.96 / 0.08  1.00 / 0     (distinct products' nearest: max 0.985)
# Index vectors are head vectors: 0.98 leaves a margin above the closest distinct pair, which grows with a
# category's size. For raw backbone features pass 0.99 (and expect the digest rule to do the work).
DEFAULT_DUPLICATE_THRESHOLD = 0.98
BLOCK_ROWS = 1024  # rows per matrix-product block: 1024 x 12k products is ~48 MiB of float32 scores
_CHUNK_BYTES = 1 << 20


def image_digest(image: str | Path | bytes) -> str:
    """sha256 (hex) of an image's bytes: given, or read from a local path (streamed) or a URI (fsspec)."""
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    if is_uri(image):
        return hashlib.sha256(read_bytes(image)).hexdigest()
    digest = hashlib.sha256()
    with Path(image).open("rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return int(root)

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def similar_pairs(vectors: np.ndarray, threshold: float, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Row pairs (i < j) [P, 2] whose inner product is >= threshold, by a blocked exact matrix product."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    found: list[np.ndarray] = []
    for start in range(0, len(vectors), block_rows):
        scores = vectors[start:start + block_rows] @ vectors.T
        rows, cols = np.nonzero(scores >= threshold)
        rows += start
        keep = rows < cols  # each pair once, never a row with itself
        found.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def group_duplicates(
    ids: Sequence[str],
    vectors: np.ndarray | None,
    image_digests: Sequence[str] | None = None,
    threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    popularity: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Each id -> its duplicate group's id, for the products of ONE category.

    Two products are one group when their image digests are equal or their unit vectors' inner product is
    >= `threshold` (pass `vectors=None` for the digest rule alone); groups are transitive. The group id is the
    member with the highest `popularity` (absent counts 0), ties broken by the smaller id. A product without a
    duplicate maps to itself.
    """
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be distinct")
    if vectors is not None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"expected vectors [{len(ids)}, dim], got shape {vectors.shape}")
    if image_digests is not None and len(image_digests) != len(ids):
        raise ValueError(f"got {len(ids)} ids but {len(image_digests)} image digests")
    popularity = popularity or {}

    groups = _UnionFind(len(ids))
    if image_digests is not None:
        first_with: dict[str, int] = {}
        for row, digest in enumerate(image_digests):
            groups.union(first_with.setdefault(digest, row), row)
    if vectors is not None and len(ids) > 1:
        for a, b in similar_pairs(vectors, threshold):
            groups.union(int(a), int(b))

    members: dict[int, list[str]] = {}
    for row, product_id in enumerate(ids):
        members.setdefault(groups.find(row), []).append(product_id)
    group_of: dict[str, str] = {}
    for group in members.values():
        leader = min(group, key=lambda product_id: (-popularity.get(product_id, 0), product_id))
        group_of.update((product_id, leader) for product_id in group)
    merged = sum(len(group) - 1 for group in members.values())
    LOG.info("%d products in %d groups (%d duplicates)", len(ids), len(members), merged)
    return group_of
