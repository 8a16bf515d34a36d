"""A category's filterable fields as numpy columns, so a filter is evaluated in a few vector operations.

SQLite answers a filter by visiting every product of the category (a label test is a subquery per
product): fine for tens of thousands, but a million-product category takes hundreds of milliseconds.
The catalogue file never changes, so its columns are read once per category and every later filter is
boolean algebra over arrays: a few milliseconds at a million rows. The meaning is exactly
`index.filters.matches` (two-valued: a missing price or stock is simply not equal, `!=` is `NOT =`),
checked against SQLite and that oracle in tests/index/test_columns.py.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np

from index.filters import And, Compare, Filter, Not, Or

_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


@dataclass(frozen=True)
class CategoryColumns:
    """Row-aligned columns of one category (row r = the product at row r of its FAISS index)."""

    price: np.ndarray  # float64, NaN where unknown
    in_stock: np.ndarray  # int8: 1 in stock, 0 out of stock, -1 unknown
    brand: np.ndarray  # int32 code into `brands`, -1 where unknown
    brands: dict[str, int]  # casefolded brand -> code
    labels: dict[tuple[str, str], np.ndarray]  # (key, casefolded value) -> sorted rows that carry it

    @property
    def size(self) -> int:
        return len(self.price)

    @classmethod
    def read(cls, connection: sqlite3.Connection, category: str) -> CategoryColumns:
        found = connection.execute(
            "SELECT row, price, in_stock, brand_lc FROM products WHERE category = ? ORDER BY row", [category]
        ).fetchall()
        size = len(found)
        price = np.full(size, np.nan)
        in_stock = np.full(size, -1, dtype=np.int8)
        brand = np.full(size, -1, dtype=np.int32)
        brands: dict[str, int] = {}
        for row, row_price, row_stock, row_brand in found:
            if row_price is not None:
                price[row] = row_price
            if row_stock is not None:
                in_stock[row] = 1 if row_stock else 0
            if row_brand is not None:
                brand[row] = brands.setdefault(row_brand, len(brands))
        postings: dict[tuple[str, str], list[int]] = {}
        query = ("SELECT p.row, l.key, l.value_lc FROM labels l JOIN products p ON p.id = l.product_id "
                 "WHERE p.category = ?")
        for row, key, value in connection.execute(query, [category]):
            postings.setdefault((key, value), []).append(row)
        labels = {pair: np.unique(np.asarray(rows, dtype=np.int64)) for pair, rows in postings.items()}
        return cls(price, in_stock, brand, brands, labels)

    def mask(self, node: Filter) -> np.ndarray:
        """Boolean mask over rows of the products that pass `node`."""
        if isinstance(node, And):
            result = self.mask(node.terms[0])
            for term in node.terms[1:]:
                result &= self.mask(term)
            return result
        if isinstance(node, Or):
            result = self.mask(node.terms[0])
            for term in node.terms[1:]:
                result |= self.mask(term)
            return result
        if isinstance(node, Not):
            return ~self.mask(node.term)
        return self._compare(node)

    def _compare(self, node: Compare) -> np.ndarray:
        if node.key == "price":
            known = ~np.isnan(self.price)
            value = float(node.value)
            if node.op in ("=", "!="):
                hit = known & (self.price == value)
            else:
                with np.errstate(invalid="ignore"):
                    return known & _OPS[node.op](self.price, value)
        elif node.key == "in_stock":
            hit = self.in_stock == (1 if node.value else 0)
        elif node.key == "brand":
            code = self.brands.get(str(node.value))
            hit = np.zeros(self.size, dtype=bool) if code is None else self.brand == code
        else:
            hit = np.zeros(self.size, dtype=bool)
            rows = self.labels.get((node.key, str(node.value)))
            if rows is not None:
                hit[rows] = True
        return hit if node.op == "=" else ~hit

    def rows(self, node: Filter | None) -> np.ndarray:
        """Sorted int64 rows passing `node` (every row for None)."""
        if node is None:
            return np.arange(self.size, dtype=np.int64)
        return np.flatnonzero(self.mask(node)).astype(np.int64)
