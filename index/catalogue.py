"""The catalogue database of an artifact: products, labels, price, stock, popularity, dedup groups, thumbnails.

One SQLite file (stdlib sqlite3) written beside the indexes and published with them. A product's `row` is
its row in its category's FAISS index, so a search hit maps straight to a product and a filter maps
straight to allowed rows (`allowed_rows`, fed to `index.selection`). The service opens it read-only and
immutable: an artifact version never changes once published, so SQLite may skip locking entirely.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from index.columns import CategoryColumns
from index.errors import ArtifactError
from index.filters import BUILTIN_KEYS, And, Compare, Filter, Not, fold, mentions, to_sql
from training.data.products import Product
from training.io import atomic_path

LOG = logging.getLogger(__name__)

CATALOGUE_FILE = "catalogue.sqlite"
SCHEMA_VERSION = 1
THUMBNAIL_SIZE = 256
# SQLite allows 32,766 parameters per statement; lookups go in chunks far below that.
LOOKUP_CHUNK = 500
CACHE_SIZE = 128
# The in_stock default: exclude what is known to be out of stock; a product of unknown stock stays in.
NOT_OUT_OF_STOCK: Filter = Not(Compare("in_stock", "=", False))

T = TypeVar("T")

SCHEMA = """
CREATE TABLE products (
    id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    row INTEGER NOT NULL CHECK (row >= 0),
    title TEXT,
    brand TEXT,
    brand_lc TEXT,
    price REAL,
    currency TEXT,
    url TEXT,
    in_stock INTEGER,
    popularity INTEGER NOT NULL DEFAULT 0,
    group_id TEXT NOT NULL,
    thumb BLOB,
    thumb_type TEXT,
    thumb_etag TEXT
);
CREATE UNIQUE INDEX products_category_row ON products (category, row);
CREATE TABLE labels (
    product_id TEXT NOT NULL REFERENCES products (id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    value_lc TEXT NOT NULL
);
CREATE INDEX labels_key_value ON labels (key, value_lc);
CREATE INDEX labels_product ON labels (product_id, key, value_lc);
"""

_PRODUCT_COLUMNS = ("id, category, row, title, brand, price, currency, url, in_stock, popularity, group_id, "
                    "thumb_type, thumb_etag")


class CatalogueError(ArtifactError):
    """The catalogue cannot be written or read as asked (duplicate rows, a missing file, a bad image)."""


@dataclass(frozen=True)
class CatalogueRow:
    """What `write_catalogue` stores for one product. `group_id` None: the product is its own group."""

    product: Product
    category: str
    row: int
    popularity: int = 0
    group_id: str | None = None
    thumbnail: bytes | None = None
    thumbnail_type: str | None = None


@dataclass(frozen=True)
class ProductRecord:
    """One product as read back: its data, where it sits in the index, and how it ranks."""

    product: Product
    category: str
    row: int
    popularity: int
    group_id: str
    thumbnail_type: str | None
    thumbnail_etag: str | None

    @property
    def id(self) -> str:
        return self.product.id


@dataclass(frozen=True)
class Facets:
    """What a category offers to filter on. Values are shown as first written; counts are products.

    Shared from the catalogue's cache: read it, do not change its dicts.
    """

    total: int
    in_stock: int
    price_min: float | None
    price_max: float | None
    brands: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)


def thumbnail_etag(data: bytes) -> str:
    """A strong validator for a thumbnail: its content hash (the service adds the quotes of an ETag)."""
    return hashlib.sha256(data).hexdigest()[:32]


def make_thumbnail(image: str | Path | bytes, size: int = THUMBNAIL_SIZE) -> tuple[bytes, str]:
    """(bytes, media type) of a thumbnail at most `size` px a side: WebP where Pillow has it, else JPEG."""
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    try:
        with Image.open(source) as opened:
            picture = ImageOps.exif_transpose(opened)
            picture.thumbnail((size, size), Image.Resampling.LANCZOS)
            if picture.mode in ("RGBA", "LA", "P"):
                # Product shots with transparency go on white, as shops show them; JPEG has no alpha.
                picture = picture.convert("RGBA")
                background = Image.new("RGB", picture.size, (255, 255, 255))
                background.paste(picture, mask=picture.getchannel("A"))
                picture = background
            elif picture.mode != "RGB":
                picture = picture.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        name = "image bytes" if isinstance(image, bytes) else str(image)
        raise CatalogueError(f"{name}: cannot make a thumbnail ({exc})") from exc
    out = io.BytesIO()
    if features.check("webp"):
        picture.save(out, format="WEBP", quality=80, method=4)
        return out.getvalue(), "image/webp"
    picture.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue(), "image/jpeg"


def _product_values(row: CatalogueRow) -> tuple[object, ...]:
    product = row.product
    if row.thumbnail is not None and not row.thumbnail_type:
        raise CatalogueError(f"product {product.id!r}: a thumbnail needs its media type")
    if row.popularity < 0:
        raise CatalogueError(f"product {product.id!r}: popularity {row.popularity} is negative")
    in_stock = None if product.in_stock is None else int(product.in_stock)
    return (product.id, row.category, int(row.row), product.title, product.brand,
            None if product.brand is None else fold(product.brand), product.price, product.currency, product.url,
            in_stock, int(row.popularity), row.group_id or product.id,
            row.thumbnail, row.thumbnail_type if row.thumbnail is not None else None,
            thumbnail_etag(row.thumbnail) if row.thumbnail is not None else None)


def write_catalogue(path: str | Path, rows: Iterable[CatalogueRow]) -> int:
    """Write the catalogue to `path` atomically (temp file, fsync, rename); returns the number of products."""
    count = 0
    with atomic_path(path) as temp:
        connection = sqlite3.connect(temp)
        try:
            # A fresh file nobody else reads yet: no journal, no syncs until the one fsync below.
            connection.execute("PRAGMA journal_mode = OFF")
            connection.execute("PRAGMA synchronous = OFF")
            connection.executescript(SCHEMA)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            with connection:
                for row in rows:
                    try:
                        connection.execute("INSERT INTO products VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                           _product_values(row))
                    except sqlite3.IntegrityError as exc:
                        raise CatalogueError(
                            f"product {row.product.id!r} (category {row.category!r}, row {row.row}): {exc}") from exc
                    connection.executemany(
                        "INSERT INTO labels VALUES (?, ?, ?, ?)",
                        [(row.product.id, key, value, fold(value))
                         for key, values in row.product.labels.items() for value in values])
                    count += 1
            connection.execute("ANALYZE")  # planner statistics: labels' (key, value_lc) index vs a scan
            connection.commit()
        finally:
            connection.close()
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
    LOG.info("wrote catalogue of %d products to %s", count, path)
    return count


def _product_of(values: Sequence[object], labels: dict[str, tuple[str, ...]]) -> ProductRecord:
    (product_id, category, row, title, brand, price, currency, url, in_stock, popularity, group_id,
     thumb_type, thumb_etag) = values
    product = Product(id=str(product_id), title=title, brand=brand, price=price, currency=currency, url=url,
                      in_stock=None if in_stock is None else bool(in_stock), labels=labels)  # type: ignore[arg-type]
    return ProductRecord(product, str(category), int(row), int(popularity), str(group_id),  # type: ignore[arg-type]
                         thumb_type, thumb_etag)  # type: ignore[arg-type]


def _chunks(items: Sequence, size: int = LOOKUP_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Catalogue:
    """Read-only access to a catalogue file, safe to share between threads.

    One connection per thread (created on first use): sqlite3 serialises all calls on one connection, so a
    shared connection would make concurrent requests queue behind each other, while separate read-only
    connections to an immutable file read in parallel with no locking at all.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._cache: OrderedDict[tuple[object, ...], object] = OrderedDict()
        self._columns: dict[str, CategoryColumns] = {}
        try:
            connection = self._connection()
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise CatalogueError(f"{path}: catalogue schema version {version}, expected {SCHEMA_VERSION}")
            self._label_keys = frozenset(key for (key,) in connection.execute("SELECT DISTINCT key FROM labels"))
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | Path) -> Catalogue:
        path = Path(path)
        if not path.is_file():
            raise CatalogueError(f"{path}: no catalogue file")
        try:
            return cls(path)
        except sqlite3.Error as exc:
            raise CatalogueError(f"{path}: not a readable catalogue ({exc})") from exc

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            # check_same_thread=False only so that close() may close every thread's connection.
            connection = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._connection().execute("SELECT COUNT(*) FROM products").fetchone()[0])

    def keys(self) -> set[str]:
        """Every key a filter may use: brand, price, in_stock and the label keys present."""
        return set(BUILTIN_KEYS | self._label_keys)

    def label_keys(self) -> set[str]:
        return set(self._label_keys)

    def categories(self) -> dict[str, int]:
        """Category path -> number of products."""
        query = "SELECT category, COUNT(*) FROM products GROUP BY category ORDER BY category"
        return {str(category): int(count) for category, count in self._connection().execute(query)}

    def _records(self, where: str, params: Sequence[object]) -> list[ProductRecord]:
        connection = self._connection()
        rows = connection.execute(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE {where}", params).fetchall()
        labels: dict[str, dict[str, list[str]]] = {}
        for chunk in _chunks([row[0] for row in rows]):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT product_id, key, value FROM labels WHERE product_id IN ({marks}) ORDER BY rowid"
            for product_id, key, value in connection.execute(query, list(chunk)):
                labels.setdefault(product_id, {}).setdefault(key, []).append(value)
        return [_product_of(row, {key: tuple(values) for key, values in labels.get(row[0], {}).items()})
                for row in rows]

    def product(self, product_id: str) -> ProductRecord | None:
        records = self._records("id = ?", [product_id])
        return records[0] if records else None

    def products(self, product_ids: Iterable[str]) -> dict[str, ProductRecord]:
        """Records of the ids that exist (absent ids are simply not in the answer)."""
        found: dict[str, ProductRecord] = {}
        for chunk in _chunks(list(dict.fromkeys(product_ids))):
            for record in self._records(f"id IN ({','.join('?' * len(chunk))})", list(chunk)):
                found[record.id] = record
        return found

    def by_rows(self, category: str, rows: Sequence[int] | np.ndarray) -> list[ProductRecord]:
        """Records for index rows of a category, in the order given (search hits -> products)."""
        wanted = [int(row) for row in rows]
        by_row: dict[int, ProductRecord] = {}
        for chunk in _chunks(sorted(set(wanted))):
            where = f"category = ? AND row IN ({','.join('?' * len(chunk))})"
            by_row.update((record.row, record) for record in self._records(where, [category, *chunk]))
        missing = [row for row in wanted if row not in by_row]
        if missing:
            # Every index row has a product in a verified artifact: a gap means index and catalogue disagree.
            raise CatalogueError(f"{self.path}: no product for rows {missing[:10]} of category {category!r}")
        return [by_row[row] for row in wanted]

    def row_ids(self, category: str) -> list[str]:
        """Product ids of a category in row order (row r's id at position r), for checks against ids.json."""
        query = "SELECT id FROM products WHERE category = ? ORDER BY row"
        return [str(product_id) for (product_id,) in self._connection().execute(query, [category])]

    def rows(self) -> Iterator[CatalogueRow]:
        """Every product as the `CatalogueRow` that wrote it, thumbnail bytes included, by category and row.

        For derived versions (add, remove, update), which carry products over without re-making thumbnails;
        thumbnails are read one row at a time, labels all at once.
        """
        connection = self._connection()
        labels: dict[str, dict[str, list[str]]] = {}
        for product_id, key, value in connection.execute("SELECT product_id, key, value FROM labels ORDER BY rowid"):
            labels.setdefault(product_id, {}).setdefault(key, []).append(value)
        query = f"SELECT {_PRODUCT_COLUMNS}, thumb FROM products ORDER BY category, row"
        for values in connection.execute(query):
            record = _product_of(values[:-1], {key: tuple(found) for key, found in labels.get(values[0], {}).items()})
            thumb = None if values[-1] is None else bytes(values[-1])
            yield CatalogueRow(record.product, record.category, record.row, record.popularity, record.group_id,
                               thumb, record.thumbnail_type if thumb is not None else None)

    def thumbnail(self, product_id: str) -> tuple[bytes, str, str] | None:
        """(bytes, media type, etag) of a product's thumbnail, or None."""
        found = self._connection().execute(
            "SELECT thumb, thumb_type, thumb_etag FROM products WHERE id = ? AND thumb IS NOT NULL",
            [product_id]).fetchone()
        return None if found is None else (bytes(found[0]), str(found[1]), str(found[2]))

    @staticmethod
    def effective_filter(filter_: Filter | None, default_in_stock: bool = True) -> Filter | None:
        """The filter as applied: with "not out of stock" added unless it says something about in_stock."""
        if not default_in_stock or mentions(filter_, "in_stock"):
            return filter_
        return NOT_OUT_OF_STOCK if filter_ is None else And((filter_, NOT_OUT_OF_STOCK))

    def _where(self, category: str, filter_: Filter | None) -> tuple[str, list[object]]:
        if filter_ is None:
            return "category = ?", [category]
        sql, params = to_sql(filter_)
        return f"category = ? AND {sql}", [category, *params]

    def allowed_rows(self, category: str, filter_: Filter | None,
                     default_in_stock: bool = True) -> np.ndarray:
        """Sorted int64 index rows of the category's products that pass the filter (read-only array)."""
        def compute() -> np.ndarray:
            # Columns, not SQL: a filter over a million-product category in milliseconds (index/columns.py).
            rows = self.columns(category).rows(self.effective_filter(filter_, default_in_stock))
            rows.flags.writeable = False
            return rows

        return self._cached(("rows", category, filter_, default_in_stock), compute)

    def columns(self, category: str) -> CategoryColumns:
        """The category's filterable fields as numpy columns, read once (the file never changes)."""
        # Kept apart from the LRU of filter answers: re-reading a big category is what the columns avoid.
        with self._lock:
            columns = self._columns.get(category)
        if columns is None:
            columns = CategoryColumns.read(self._connection(), category)
            with self._lock:
                self._columns[category] = columns
        return columns

    def _cached(self, key: tuple[object, ...], compute: Callable[[], T]) -> T:
        # The file is immutable, so an answer never changes: repeated filters and facets come from memory
        # (a 50k-product category: ~10-30 ms per filter and ~170 ms for facets in SQLite, microseconds here).
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    def popular(self, category: str, filter_: Filter | None, k: int, offset: int = 0,
                default_in_stock: bool = True, one_per_group: bool = True) -> list[ProductRecord]:
        """The popularity fallback: most popular matching products (ties: lower row first), a page at a time.

        With `one_per_group`, each dedup group appears once, as its most popular matching member.
        """
        if k <= 0:
            return []
        where, params = self._where(category, self.effective_filter(filter_, default_in_stock))
        if one_per_group:
            ranked = (f"SELECT id, ROW_NUMBER() OVER (PARTITION BY group_id ORDER BY popularity DESC, row) AS rank "
                      f"FROM products WHERE {where}")
            query = (f"SELECT p.id FROM products p JOIN ({ranked}) r ON r.id = p.id WHERE r.rank = 1 "
                     "ORDER BY p.popularity DESC, p.row LIMIT ? OFFSET ?")
        else:
            query = f"SELECT id FROM products WHERE {where} ORDER BY popularity DESC, row LIMIT ? OFFSET ?"
        ids = [product_id for (product_id,) in self._connection().execute(query, [*params, k, max(0, offset)])]
        records = self.products(ids)
        return [records[product_id] for product_id in ids]

    def facets(self, category: str, filter_: Filter | None = None) -> Facets:
        """Label key -> value -> product count, brands, price range and stock counts of a category."""
        return self._cached(("facets", category, filter_), lambda: self._facets(category, filter_))

    def _facets(self, category: str, filter_: Filter | None) -> Facets:
        connection = self._connection()
        where, params = self._where(category, filter_)
        total, in_stock, price_min, price_max = connection.execute(
            f"SELECT COUNT(*), COALESCE(SUM(in_stock IS 1), 0), MIN(price), MAX(price) FROM products WHERE {where}",
            params).fetchone()
        brands = {str(brand): int(count) for brand, count in connection.execute(
            f"SELECT MIN(brand), COUNT(*) AS n FROM products WHERE {where} AND brand_lc IS NOT NULL "
            "GROUP BY brand_lc ORDER BY n DESC, MIN(brand)", params)}
        labels: dict[str, dict[str, int]] = {}
        query = (f"SELECT l.key, MIN(l.value), COUNT(DISTINCT l.product_id) AS n FROM labels l "
                 f"JOIN products ON products.id = l.product_id WHERE {where} "
                 "GROUP BY l.key, l.value_lc ORDER BY l.key, n DESC, MIN(l.value)")
        for key, value, count in connection.execute(query, params):
            labels.setdefault(str(key), {})[str(value)] = int(count)
        return Facets(int(total), int(in_stock), price_min, price_max, brands, labels)


def check_catalogue(path: str | Path, category_sizes: dict[str, int]) -> list[str]:
    """Problems that make a catalogue unfit for its indexes (empty when fit): for `index verify`.

    Every category's rows must be exactly 0..n-1 of its index, and every thumbnail must match its etag.
    """
    problems: list[str] = []
    try:
        catalogue = Catalogue.open(path)
    except CatalogueError as exc:
        return [str(exc)]
    with catalogue:
        connection = catalogue._connection()
        integrity = connection.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"{path}: SQLite quick_check says {integrity}")
        present = catalogue.categories()
        for category, size in sorted(category_sizes.items()):
            count, low, high = connection.execute(
                "SELECT COUNT(*), MIN(row), MAX(row) FROM products WHERE category = ?", [category]).fetchone()
            if count != size or (size and (low != 0 or high != size - 1)):
                problems.append(f"{path}: category {category!r} has {count} products (rows {low}..{high}), "
                                f"its index {size} rows")
        for category in sorted(set(present) - set(category_sizes)):
            problems.append(f"{path}: category {category!r} has products but no index")
        for product_id, thumb, etag in connection.execute(
                "SELECT id, thumb, thumb_etag FROM products WHERE thumb IS NOT NULL"):
            if thumbnail_etag(bytes(thumb)) != etag:
                problems.append(f"{path}: thumbnail of {product_id!r} does not match its etag")
    return problems
