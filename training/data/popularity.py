"""Popularity baseline: how many training pairs each product appears in, ranked per category.

The index build writes this table into the artifact and the service's fallback reads it back, so it
stores product -> category itself (no dataset needed) and precomputes each category's order once.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from training.data.stl import CategoryMap, Pair
from training.io import write_text_atomic

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1


class Popularity:
    """Training-pair counts per product, with every product of the category map as a candidate."""

    def __init__(self, counts: dict[str, int], categories: CategoryMap) -> None:
        self.category_map = categories
        # Only products with a category can be ranked; others are kept out so top() never returns them.
        self._counts = {pid: int(n) for pid, n in counts.items() if n > 0 and pid in categories}
        dropped = sum(1 for pid in counts if pid not in categories)
        if dropped:
            LOG.warning("ignoring %d counted products that have no category", dropped)
        # Sorted once: most pairs first, ties by product id ascending (deterministic, matches evaluation).
        self._order: dict[str, list[tuple[str, float]]] = {}
        for path in categories.paths:
            products = categories.products_in(path)  # already sorted by id
            ranked = sorted(products, key=lambda pid: -self._counts.get(pid, 0))  # stable: id order kept
            self._order[path] = [(pid, float(self._counts.get(pid, 0))) for pid in ranked]

    @classmethod
    def from_pairs(cls, pairs: Iterable[Pair], categories: CategoryMap) -> Popularity:
        counts = Counter(pair.product_id for pair in pairs)
        LOG.info("popularity from %d pairs over %d products", sum(counts.values()), len(counts))
        return cls(dict(counts), categories)

    def count(self, product_id: str) -> int:
        return self._counts.get(product_id, 0)

    def categories(self) -> list[str]:
        """Full category paths, sorted."""
        return list(self.category_map.paths)

    def top(self, category: str, k: int) -> list[tuple[str, float]]:
        """The k most popular products of a category (short or full name) as (product id, pair count)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return self._order[self.category_map.resolve(category)][:k]

    def scores(self, category_products: Sequence[str]) -> np.ndarray:
        """Pair counts of the given products as float32 (0 for products never seen in training)."""
        return np.fromiter((self._counts.get(pid, 0) for pid in category_products), dtype=np.float32,
                           count=len(category_products))

    def to_json(self, path: str | Path) -> None:
        """Write atomically: counts plus product -> category, enough to serve without the dataset."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": FORMAT_VERSION,
            "counts": dict(sorted(self._counts.items())),
            "categories": dict(sorted(self.category_map.product_to_path.items())),
        }
        write_text_atomic(path, json.dumps(payload))

    @classmethod
    def from_json(cls, path: str | Path) -> Popularity:
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a popularity table: invalid JSON ({exc.msg})") from exc
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a popularity table of format {FORMAT_VERSION}")
        counts, categories = payload.get("counts"), payload.get("categories")
        if not isinstance(counts, dict) or not isinstance(categories, dict):
            raise ValueError(f"{path} must hold 'counts' and 'categories' objects")
        return cls({pid: int(n) for pid, n in counts.items()}, CategoryMap(categories))
