"""Exact top-k among allowed rows: a filter's matching products go into the FAISS search as an id selector.

A selector alone is exact for a Flat index (every allowed vector is scored) but not for IVF: only the
probed lists are scanned, so a selective filter can leave fewer than k results, or miss better matches
in unprobed lists. `FilteredIndex` makes IVF exact with a bound per list: every member of list l scores at
most `q·c_l + |q|·r_l` (centroid c_l, radius r_l = farthest member), so lists that hold allowed rows are
scanned in order of that bound until the k-th score found beats the bound of every list not yet scanned.
Lists without an allowed row are never touched, so a small allowed set costs a few lists, not nprobe.

Rows are faiss ids, the row numbers 0..n-1 of a category (index.ann). Results are 1-D, best first,
exactly `min(k, allowed)` long: no -1 padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

# A bitmap costs n/8 bytes and one bit test per id; IDSelectorBatch costs ~8 bytes per allowed id and a
# hash probe. Past one allowed row in 64 the bitmap is both smaller and faster.
DENSE_FRACTION = 1 / 64
# Float32 inner products of unit vectors differ from the exact value by ~1e-6; the bound test leaves
# room for that, so rounding can only make us scan one list more, never stop one list early.
BOUND_SLACK = 1e-4


def make_selector(allowed_rows: np.ndarray, ntotal: int) -> tuple[faiss.IDSelector, object]:
    """An id selector for sorted unique rows, and the array it points into (keep both alive while searching)."""
    if len(allowed_rows) > ntotal * DENSE_FRACTION:
        mask = np.zeros(ntotal, dtype=bool)
        mask[allowed_rows] = True
        bitmap = np.packbits(mask, bitorder="little")  # faiss tests bit (id & 7) of byte id >> 3
        return faiss.IDSelectorBitmap(bitmap), bitmap
    ids = np.ascontiguousarray(allowed_rows, dtype=np.int64)
    return faiss.IDSelectorBatch(ids), ids


@dataclass(frozen=True)
class _IVFBounds:
    centroids: np.ndarray  # [nlist, d] float32
    radii: np.ndarray  # [nlist] float32, -inf for an empty list
    row_list: np.ndarray  # [ntotal] int64: the list holding each row, -1 where a row is absent


def _ivf_bounds(ivf: faiss.IndexIVF, ntotal: int) -> _IVFBounds:
    """Centroids, list radii and row -> list map of an IVF-Flat index (one pass over its vectors)."""
    nlist, dim = ivf.nlist, ivf.d
    centroids = ivf.quantizer.reconstruct_n(0, nlist).astype(np.float32)
    radii = np.full(nlist, -np.inf, dtype=np.float32)
    row_list = np.full(ntotal, -1, dtype=np.int64)
    invlists = ivf.invlists
    for list_no in range(nlist):
        count = invlists.list_size(list_no)
        if count == 0:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), count).copy()
        codes = invlists.get_codes(list_no)
        vectors = faiss.rev_swig_ptr(codes, count * ivf.code_size).view(np.float32).reshape(count, dim)
        radii[list_no] = float(np.sqrt(((vectors - centroids[list_no]) ** 2).sum(axis=1).max()))
        invlists.release_codes(list_no, codes)
        row_list[ids[ids < ntotal]] = list_no
    return _IVFBounds(centroids, radii, row_list)


def _sorted_rows(rows: np.ndarray, ntotal: int) -> np.ndarray:
    """Sorted unique in-range rows; the catalogue already hands them over sorted, so usually no sort at all."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if len(rows) > 1 and not bool(np.all(rows[1:] > rows[:-1])):
        rows = np.unique(rows)
    if len(rows) and (rows[0] < 0 or rows[-1] >= ntotal):
        rows = rows[(rows >= 0) & (rows < ntotal)]
    return rows


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k by score (ties: lower row first), dropping faiss's -1 fill."""
    keep = rows >= 0
    scores, rows = scores[keep], rows[keep]
    order = np.lexsort((rows, -scores))[:k]
    return scores[order].astype(np.float32), rows[order].astype(np.int64)


class FilteredIndex:
    """One category index, searchable with an allowed-rows set. Build once per loaded index: IVF needs one
    pass over its vectors for the list bounds; Flat and HNSW need nothing."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        self.ntotal = int(index.ntotal)
        self._flat: faiss.Index | None = None
        self._ivf: faiss.IndexIVF | None = None
        self._bounds: _IVFBounds | None = None
        downcast = faiss.downcast_index(index)
        if isinstance(downcast, faiss.IndexFlat):
            self._flat = downcast
        elif isinstance(downcast, faiss.IndexHNSW):
            # HNSW with a selector is approximate and can come back short; its storage is a Flat index
            # over the same rows, which a selector makes exact.
            self._flat = faiss.downcast_index(downcast.storage)
        elif isinstance(downcast, faiss.IndexIVFFlat):
            self._ivf = downcast
            self._bounds = _ivf_bounds(downcast, self.ntotal)
        elif isinstance(downcast, faiss.IndexIVF):
            self._ivf = downcast  # other IVF codes: exact over the codes by scanning every list
        else:
            raise ValueError(f"cannot search a {type(downcast).__name__} with a selector exactly")

    def search(self, query: np.ndarray, k: int, allowed_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top-k rows of `allowed_rows` (all rows when None), best first."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if allowed_rows is None:  # unfiltered: the index's own (tuned) search, as before
            want = min(k, self.ntotal)
            if want <= 0:
                return np.empty(0, np.float32), np.empty(0, np.int64)
            scores, rows = self.index.search(query, want)
            return _top(scores[0], rows[0], want)
        allowed = _sorted_rows(allowed_rows, self.ntotal)
        want = min(k, len(allowed))
        if want <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        selector, keep_alive = make_selector(allowed, self.ntotal)
        if self._flat is not None:
            scores, rows = self._flat.search(query, want, params=faiss.SearchParameters(sel=selector))
            result = _top(scores[0], rows[0], want)
        elif self._bounds is not None:
            result = self._bounded_ivf(query, want, allowed, selector)
        else:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self._ivf.nlist)
            scores, rows = self._ivf.search(query, want, params=params)
            result = _top(scores[0], rows[0], want)
        del keep_alive  # the selector read this array until here
        return result

    def _bounded_ivf(self, query: np.ndarray, k: int, allowed: np.ndarray,
                     selector: faiss.IDSelector) -> tuple[np.ndarray, np.ndarray]:
        ivf, bounds = self._ivf, self._bounds
        assert ivf is not None and bounds is not None
        row_lists = bounds.row_list[allowed]
        # bincount, not np.unique: O(allowed + nlist) without a sort or hash table of 10^5 entries.
        lists = np.flatnonzero(np.bincount(row_lists[row_lists >= 0], minlength=ivf.nlist))
        centroid_scores = bounds.centroids[lists] @ query[0]
        upper = centroid_scores + float(np.linalg.norm(query[0])) * bounds.radii[lists]
        order = np.argsort(-upper, kind="stable")
        lists, centroid_scores, upper = lists[order], centroid_scores[order], upper[order]
        found_scores = np.empty(0, np.float32)
        found_rows = np.empty(0, np.int64)
        start, step = 0, max(1, int(ivf.nprobe))  # first round: as many lists as the tuned search probes
        while start < len(lists):
            stop = min(len(lists), start + step)
            batch = np.ascontiguousarray(lists[start:stop].reshape(1, -1), dtype=np.int64)
            batch_scores = np.ascontiguousarray(centroid_scores[start:stop].reshape(1, -1), dtype=np.float32)
            scores = np.empty((1, k), np.float32)
            rows = np.empty((1, k), np.int64)
            # search_preassigned scans exactly these lists; its Python wrapper refuses params, so call the
            # C++ method with nprobe set to the batch width (it reads that many assignments).
            params = faiss.SearchParametersIVF(sel=selector, nprobe=batch.shape[1])
            ivf.search_preassigned_c(1, faiss.swig_ptr(query), k, faiss.swig_ptr(batch), faiss.swig_ptr(batch_scores),
                                     faiss.swig_ptr(scores), faiss.swig_ptr(rows), False, params)
            found_scores, found_rows = _top(np.concatenate([found_scores, scores[0]]),
                                            np.concatenate([found_rows, rows[0]]), k)
            start, step = stop, step * 2
            if start < len(lists) and len(found_rows) == k and found_scores[-1] > upper[start] + BOUND_SLACK:
                LOG.debug("bounded IVF search stopped after %d of %d candidate lists", start, len(lists))
                break
        return found_scores, found_rows


def search_with_selector(index: faiss.Index, query: np.ndarray, k: int,
                         allowed_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows): the exact top-k of `allowed_rows` (all rows when None) for one query [1, d].

    Convenience for one-off calls: an IVF index pays its bound pass each time, so a server should keep one
    `FilteredIndex` per loaded index instead.
    """
    return FilteredIndex(index).search(query, k, allowed_rows)
