"""One category's search: the exact top-k among allowed rows, a page at an offset, each dedup group once.

The allowed rows (a filter's matches, from the catalogue) go into FAISS as an id selector
(`index.selection.FilteredIndex`), so the answer is the true top-k of the matching products. Dedup collapses
hits by their catalogue group: a group sits where its best hit ranks and is shown as its most popular
allowed member. Pages are cut from one deterministic list: how many hits are fetched depends only on
`offset + k` and the allowed rows, so `offset 0, k 20` and `offset 10, k 10` read the same hits.

A compressed index (SQ8, PQ codes: `index.ann.is_compressed`) ranks by its codes, so its top-k is not the true
one. Such a category searches a larger pool (`index.ann.rerank_pool`: at least STL_RERANK_CANDIDATES rows) the
same way, filter included, and re-scores the pool from the stored float vectors (`index.ann.rerank`, over a
read-only memory map: only the candidates' rows are read, RAM stays at the codes' size). A filter that allows
few rows (DIRECT_FRACTION) skips the codes: every allowed row is scored from its float vector. Scores are then
the exact inner products, and dedup collapses the re-ranked hits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from index.ann import RERANK_CANDIDATES, rerank, rerank_pool
from index.artifact import CategoryIndex
from index.catalogue import ProductRecord
from index.filters import Filter
from index.selection import FilteredIndex

LOG = logging.getLogger(__name__)

# With dedup, a first search fetches this many hits per wanted group; it doubles while groups are short.
DEDUP_OVERFETCH = 2
# A compressed category whose filter allows at most this fraction of its rows scores them all from their float
# vectors instead of scanning every list's codes: exact, and cheaper. Measured at 10M x 128 on 2 busy cores
# (benchmarks/bench_compressed.py): 0.1% allowed took 1 ms this way, 1% 27-53 ms, where the codes' scan takes
# 120-470 ms whatever the fraction (5%: 156-222 ms); at 1M, 1% took 0.8 ms against 8-15 ms.
DIRECT_FRACTION = 0.01


@dataclass(frozen=True)
class SearchSpec:
    """What one search asks for: a page of a category's ranking, filtered and deduplicated or not."""

    category: str  # full path, resolved
    k: int
    offset: int = 0
    filter: Filter | None = None
    dedup: bool = True
    # Never answered: the product a "more like this" starts from (and its duplicates), as rows and as ids.
    exclude_rows: tuple[int, ...] = ()
    exclude_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RowPage:
    """A page of (row, score), best first, and how many rows were searchable (passed filter and exclusion)."""

    hits: list[tuple[int, float]]
    matching: int


class Hit(NamedTuple):
    product_id: str
    score: float
    record: ProductRecord | None  # None: the version has no catalogue


@dataclass(frozen=True)
class Page:
    """One answer's hits, best first, and how many products could have been answered at all."""

    hits: list[Hit]
    matching: int


class Groups:
    """The dedup groups of one category's rows, for collapsing hits (built once per loaded version)."""

    def __init__(self, group_ids: Sequence[str], popularity: Sequence[int]) -> None:
        _, self.group_of = np.unique(np.asarray(list(group_ids), dtype=object), return_inverse=True)
        self.group_of = self.group_of.astype(np.int64)
        rows = np.arange(len(self.group_of))
        # Members of each group together, most popular first (ties: lower row): a group's representative is
        # its first allowed member in this order.
        self.members = np.lexsort((rows, -np.asarray(popularity, dtype=np.int64), self.group_of))
        self.starts = np.searchsorted(self.group_of[self.members], np.arange(int(self.group_of.max(initial=-1)) + 2))

    @classmethod
    def of(cls, group_ids: Sequence[str], popularity: Sequence[int]) -> Groups | None:
        """The groups, or None when every row is its own group (dedup then changes nothing)."""
        return cls(group_ids, popularity) if len(set(group_ids)) < len(group_ids) else None

    def members_of(self, row: int) -> np.ndarray:
        group = self.group_of[row]
        return self.members[self.starts[group]:self.starts[group + 1]]

    def collapse(self, scores: np.ndarray, rows: np.ndarray, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        """(representative row, best score) per group, in the order the groups' best hits rank."""
        mask: np.ndarray | None = None
        if allowed is not None:
            mask = np.zeros(len(self.group_of), dtype=bool)
            mask[allowed] = True
        seen: set[int] = set()
        out: list[tuple[int, float]] = []
        for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
            group = int(self.group_of[row])
            if group in seen:
                continue
            seen.add(group)
            members = self.members[self.starts[group]:self.starts[group + 1]]
            if mask is not None:
                members = members[mask[members]]  # never empty: the hit itself is allowed
            out.append((int(members[0]), float(score)))
        return out


@dataclass(frozen=True)
class Rerank:
    """Re-scoring a compressed index's candidates from the category's stored float vectors."""

    vectors: np.ndarray  # [n, d] float32, a read-only memory map of the version's vectors file
    candidates: int = RERANK_CANDIDATES

    def pool(self, k: int) -> int:
        return rerank_pool(k, self.candidates)

    def best(self, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return rerank(self.vectors, query, rows, k)


class CategorySearch:
    """One loaded category index, searchable exactly with a row filter, by page, with dedup; re-ranked from the
    float vectors when `rerank` is given (a compressed index)."""

    def __init__(self, index: CategoryIndex, groups: Groups | None = None, rerank: Rerank | None = None) -> None:
        if rerank is not None and rerank.vectors.shape != (index.size, index.dim):
            raise ValueError(f"category {index.category!r}: {rerank.vectors.shape} stored vectors for an index of "
                             f"{index.size} x {index.dim}")
        self.index = index
        self.filtered = FilteredIndex(index.index)
        self.groups = groups
        self.rerank = rerank

    @property
    def size(self) -> int:
        return self.index.size

    def _search(self, query: np.ndarray, fetch: int, allowed: np.ndarray | None,
                matching: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rerank is not None and allowed is not None and len(allowed) <= self.size * DIRECT_FRACTION:
            return self.rerank.best(query, allowed, fetch)
        pool = fetch if self.rerank is None else min(matching, self.rerank.pool(fetch))
        scores, rows = self.filtered.search(query, pool, allowed)
        if allowed is None and len(rows) < min(fetch, matching):
            # An approximate index probed too few lists to fill the page: all rows through the selector are exact.
            scores, rows = self.filtered.search(query, pool, np.arange(self.size, dtype=np.int64))
        if self.rerank is not None:
            scores, rows = self.rerank.best(query, rows, fetch)
        return scores, rows

    def page(self, query: np.ndarray, spec: SearchSpec, allowed: np.ndarray | None) -> RowPage:
        """Hits `offset .. offset + k` of the ranking of `allowed` rows (None: all) minus `spec.exclude`."""
        if spec.exclude_rows:
            base = np.arange(self.size, dtype=np.int64) if allowed is None else allowed
            allowed = np.setdiff1d(base, np.asarray(spec.exclude_rows, dtype=np.int64), assume_unique=True)
        if allowed is not None and len(allowed) == self.size:
            allowed = None  # everything allowed: the index's own tuned search
        matching = self.size if allowed is None else len(allowed)
        want = spec.offset + spec.k
        if matching == 0 or want <= 0:
            return RowPage([], matching)
        collapse = spec.dedup and self.groups is not None
        fetch = min(matching, want * DEDUP_OVERFETCH if collapse else want)
        while True:
            scores, rows = self._search(query, fetch, allowed, matching)
            if not collapse:
                ranked = list(zip(rows.tolist(), scores.tolist(), strict=True))
                break
            assert self.groups is not None
            ranked = self.groups.collapse(scores, rows, allowed)
            if len(ranked) >= want or fetch >= matching:
                break
            fetch = min(matching, fetch * 2)
        return RowPage([(int(row), float(score)) for row, score in ranked[spec.offset:want]], matching)
