"""Product data: `products.jsonl` beside `categories.json`, or a shop's CSV export, read into typed `Product`s.

One JSON object per line, `{"id", "title", "brand", "price", "currency", "url", "in_stock", "labels"}`, every
field but `id` optional; `labels` is `{key: value or [values]}`. A CSV export has the same fields as columns
and one `label.<key>` column per label key, several values in one cell separated by `|`. Every record is
validated and a bad one names its file and line, as the pair files do (`training.data.stl`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from training.data.stl import is_valid_id, jsonl_records, not_utf8
from training.errors import DataError
from training.io import write_text_atomic

LOG = logging.getLogger(__name__)

PRODUCTS_FILE = "products.jsonl"
JSONL_SUFFIXES = (".jsonl", ".json")
CSV_SUFFIXES = (".csv",)
FIELDS = ("id", "title", "brand", "price", "currency", "url", "in_stock", "labels")
# Keys a filter already means something by (or that are not attributes at all): a label may not shadow them.
RESERVED_KEYS = frozenset({"brand", "price", "in_stock", "id", "title", "currency", "url"})
# Label keys become filter keys (`color=red`) and SQL parameters, so one plain spelling only.
LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CSV_LABEL_PREFIX = "label."
CSV_VALUE_SEPARATOR = "|"
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")  # ISO 4217 codes
# Spreadsheets write booleans every which way; these are the spellings we accept, case-insensitively.
CSV_TRUE = frozenset({"true", "1", "yes"})
CSV_FALSE = frozenset({"false", "0", "no"})

Labels = dict[str, tuple[str, ...]]


class ProductFormatError(DataError):
    """A product record is invalid; the message names the file and line."""


@dataclass(frozen=True)
class Product:
    """One catalogue product. `labels` maps a key to its values (always a tuple, in file order, no repeats)."""

    id: str
    title: str | None = None
    brand: str | None = None
    price: float | None = None
    currency: str | None = None
    url: str | None = None
    in_stock: bool | None = None
    labels: Labels = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The JSONL record, without the fields that are absent."""
        record: dict[str, object] = {"id": self.id}
        for name in ("title", "brand", "price", "currency", "url", "in_stock"):
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        if self.labels:
            record["labels"] = {key: list(values) if len(values) != 1 else values[0]
                                for key, values in self.labels.items()}
        return record


class _Invalid(ValueError):
    """A field's value is unusable; the reader adds the file and line."""


def _text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a string, got {value!r}")
    value = value.strip()
    return value or None


def _price(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"price must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _Invalid(f"price must be a finite non-negative number, got {value!r}")
    return float(value)


def _currency(value: object) -> str | None:
    text = _text("currency", value)
    if text is None:
        return None
    if not CURRENCY_PATTERN.match(text.upper()):
        raise _Invalid(f"currency must be a 3-letter ISO 4217 code such as EUR, got {value!r}")
    return text.upper()


def _url(value: object) -> str | None:
    text = _text("url", value)
    # Answers hand the link to a browser: only web links, never javascript: or data: ones.
    if text is not None and not text.lower().startswith(("http://", "https://")):
        raise _Invalid(f"url must start with http:// or https://, got {value!r}")
    return text


def _in_stock(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _Invalid(f"in_stock must be true or false, got {value!r}")


def _label_key(key: object) -> str:
    if not isinstance(key, str) or not LABEL_KEY_PATTERN.match(key):
        raise _Invalid(f"label key {key!r} must be lowercase letters, digits and _, starting with a letter")
    if key in RESERVED_KEYS:
        raise _Invalid(f"label key {key!r} is reserved; reserved keys: {sorted(RESERVED_KEYS)}")
    return key


def _label_values(key: str, value: object) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    cleaned: list[str] = []
    for item in values:
        if not isinstance(item, str):
            raise _Invalid(f"label {key!r} values must be strings, got {item!r}")
        item = item.strip()
        if not item:
            raise _Invalid(f"label {key!r} has an empty value")
        if item not in cleaned:
            cleaned.append(item)
    return tuple(cleaned)


def _labels(value: object) -> Labels:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"labels must be an object {{key: value or [values]}}, got {value!r}")
    labels: Labels = {}
    for key, values in value.items():
        cleaned = _label_values(_label_key(key), values)
        if cleaned:  # an empty list says "no values": the same as leaving the key out
            labels[key] = cleaned
    return labels


def product_from_record(record: Mapping[str, object]) -> Product:
    """A validated `Product` from one JSON object; ValueError (`_Invalid`) saying what is wrong."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise _Invalid(f"unknown field(s) {unknown}; known fields: {list(FIELDS)}")
    if "id" not in record:
        raise _Invalid("missing field 'id'")
    product_id = record["id"]
    if not is_valid_id(product_id):
        raise _Invalid(f"invalid product id {product_id!r}")
    return Product(
        id=product_id,  # type: ignore[arg-type]  # is_valid_id checked it is a str
        title=_text("title", record.get("title")),
        brand=_text("brand", record.get("brand")),
        price=_price(record.get("price")),
        currency=_currency(record.get("currency")),
        url=_url(record.get("url")),
        in_stock=_in_stock(record.get("in_stock")),
        labels=_labels(record.get("labels")),
    )


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    for number, record in jsonl_records(path):
        if isinstance(record, str):  # a product file is all or nothing: no record is skipped
            raise ProductFormatError(f"{path}:{number}: {record}")
        yield number, record


def _csv_scalar(name: str, text: str) -> object:
    """A CSV cell as the JSON value it stands for; an empty cell is an absent field."""
    text = text.strip()
    if not text:
        return None
    if name == "price":
        try:
            return float(text)
        except ValueError:
            raise _Invalid(f"price must be a number, got {text!r}") from None
    if name == "in_stock":
        if text.lower() in CSV_TRUE:
            return True
        if text.lower() in CSV_FALSE:
            return False
        raise _Invalid(f"in_stock must be one of {sorted(CSV_TRUE | CSV_FALSE)}, got {text!r}")
    return text


def _csv_header(path: Path, header: list[str]) -> tuple[list[str], dict[int, str]]:
    """Column names, and column index -> label key for the `label.<key>` columns."""
    names = [name.strip() for name in header]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ProductFormatError(f"{path}:1: duplicate column(s) {duplicates}")
    if "id" not in names:
        raise ProductFormatError(f"{path}:1: no 'id' column; columns: {names}")
    label_columns: dict[int, str] = {}
    for position, name in enumerate(names):
        if name.startswith(CSV_LABEL_PREFIX):
            try:
                label_columns[position] = _label_key(name[len(CSV_LABEL_PREFIX):])
            except _Invalid as exc:
                raise ProductFormatError(f"{path}:1: column {name!r}: {exc}") from None
        elif name not in FIELDS or name == "labels":
            raise ProductFormatError(
                f"{path}:1: unknown column {name!r}; known columns: {[f for f in FIELDS if f != 'labels']}"
                f" and {CSV_LABEL_PREFIX}<key>")
    return names, label_columns


def _utf8_lines(path: Path, lines: Iterable[str]) -> Iterator[str]:
    """The lines as they are, up to the first one with a byte that is not UTF-8: that one fails with its line."""
    for number, line in enumerate(lines, start=1):
        problem = not_utf8(line)
        if problem is not None:
            raise ProductFormatError(f"{path}:{number}: {problem}")
        yield line


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would glue itself to "id".
    # surrogateescape + _utf8_lines: a byte that is not UTF-8 is named by its line, not a decode traceback.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as source:
        reader = csv.reader(_utf8_lines(path, source))
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ProductFormatError(f"{path}:1: malformed CSV: {exc}") from None
        names, label_columns = _csv_header(path, header)
        while True:
            # A quoted cell may span lines: a record starts on the line after the previous one ended.
            number = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ProductFormatError(f"{path}:{number}: malformed CSV: {exc}") from None
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(names):
                raise ProductFormatError(f"{path}:{number}: expected {len(names)} cells, got {len(cells)}")
            record: dict[str, object] = {}
            labels: dict[str, list[str]] = {}
            try:
                for position, (name, cell) in enumerate(zip(names, cells, strict=True)):
                    if position in label_columns:
                        values = [value.strip() for value in cell.split(CSV_VALUE_SEPARATOR) if value.strip()]
                        if values:
                            labels[label_columns[position]] = values
                    else:
                        record[name] = _csv_scalar(name, cell)
            except _Invalid as exc:
                raise ProductFormatError(f"{path}:{number}: {exc}") from None
            if record.get("id") is None:
                record.pop("id", None)  # an empty id cell reads as "missing field 'id'"
            if labels:
                record["labels"] = labels
            yield number, record


def read_products(path: str | Path) -> list[Product]:
    """Products of a JSONL (`.jsonl`, `.json`) or CSV (`.csv`) file, in file order, each validated."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in CSV_SUFFIXES:
        records = _csv_records(path)
    else:
        raise ProductFormatError(
            f"{path}: unknown product file type {path.suffix!r}; use {list(JSONL_SUFFIXES + CSV_SUFFIXES)}")
    if not path.is_file():
        raise ProductFormatError(f"{path}: no such product file")
    products: list[Product] = []
    first_line: dict[str, int] = {}
    for number, record in records:
        try:
            product = product_from_record(record)
        except _Invalid as exc:
            raise ProductFormatError(f"{path}:{number}: {exc}") from None
        if product.id in first_line:
            raise ProductFormatError(
                f"{path}:{number}: duplicate product id {product.id!r} (first on line {first_line[product.id]})")
        first_line[product.id] = number
        products.append(product)
    LOG.info("read %d products from %s", len(products), path)
    return products


def write_products(path: str | Path, products: Iterable[Product]) -> None:
    """`products.jsonl`, written atomically: readers see the old file or the whole new one."""
    text = "".join(json.dumps(product.to_json(), ensure_ascii=False) + "\n" for product in products)
    write_text_atomic(path, text)


def read_dataset_products(root: str | Path) -> dict[str, Product]:
    """The product data of a dataset directory (its optional products.jsonl) by id; {} when it has none.

    The category file stays the source of truth for which products exist: rows here only add data.
    """
    path = Path(root) / PRODUCTS_FILE
    if not path.is_file():
        return {}
    return {product.id: product for product in read_products(path)}
