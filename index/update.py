"""`python -m index update`: publish a new version with changed product data (price, stock, labels, title...).

Nothing is re-embedded: every index, id and vector file of the current version is linked (or copied)
into the new one, popularity is carried over unchanged, and only catalogue.sqlite is rewritten. The
version is published atomically, so a service's /admin/reload either keeps the old data or serves all
of the new.

A row replaces the fields it gives and keeps the others:
  JSONL  a key left out keeps the old value; a key set to null clears it (unknown stock, no price).
         "labels": {"color": ["red"]} replaces the values of the keys it names and keeps the other keys;
         "labels": {"color": []} removes one key; "labels": null removes every label.
  CSV    the columns of the header are given for every row: an empty cell clears that field (or, for a
         label.<key> column, removes the key); columns not in the header keep their old values.
Rows for ids that are not in the index are refused (exit 1) and nothing is published; a malformed file
is bad input (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from index.edit import carried_rows, derive, open_current, placement, unchanged
from index.errors import ArtifactError, Refused, shown_ids
from index.manifest import Change
from index.publish import DEFAULT_KEEP, build_lock
from training.cli import report
from training.cli.args import require_positive
from training.data.products import CSV_LABEL_PREFIX, CSV_SUFFIXES, Product, read_products
from training.errors import TrainingError

LOG = logging.getLogger(__name__)

# Product fields a row may change (the id names the product; its category and image belong to its vector).
SCALAR_FIELDS = ("title", "brand", "price", "currency", "url", "in_stock")


@dataclass(frozen=True)
class ProductUpdate:
    """One row: the validated values, which scalar fields it gives, and which label keys it replaces.

    `label_keys` None: every label is replaced (JSONL "labels": null).
    """

    product: Product
    fields: frozenset[str]
    label_keys: frozenset[str] | None = frozenset()

    def apply(self, old: Product) -> Product:
        """`old` with the given fields replaced (absent ones kept)."""
        changes: dict[str, object] = {name: getattr(self.product, name) for name in self.fields}
        if self.label_keys is None:
            changes["labels"] = dict(self.product.labels)
        elif self.label_keys:
            labels = {key: values for key, values in old.labels.items() if key not in self.label_keys}
            labels.update((key, self.product.labels[key]) for key in self.label_keys if key in self.product.labels)
            changes["labels"] = labels
        return replace(old, **changes)  # type: ignore[arg-type]


def _given_jsonl(path: Path) -> dict[str, tuple[frozenset[str], frozenset[str] | None]]:
    # read_products has validated every line already; this pass only records which keys each row has.
    given = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        labels = record.get("labels", {})
        given[str(record["id"])] = (frozenset(record) & frozenset(SCALAR_FIELDS),
                                    None if labels is None else frozenset(labels))
    return given


def _given_csv(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    with path.open(encoding="utf-8-sig", newline="") as source:
        header = [name.strip() for name in next(csv.reader(source), [])]
    return (frozenset(header) & frozenset(SCALAR_FIELDS),
            frozenset(name[len(CSV_LABEL_PREFIX):] for name in header if name.startswith(CSV_LABEL_PREFIX)))


def read_updates(path: str | Path) -> list[ProductUpdate]:
    """The rows of a JSONL or CSV update file, validated as `read_products` validates a build's product data."""
    path = Path(path)
    products = read_products(path)  # ProductFormatError (bad input) names the file and line
    if path.suffix.lower() in CSV_SUFFIXES:
        fields, label_keys = _given_csv(path)
        return [ProductUpdate(product, fields, label_keys) for product in products]
    given = _given_jsonl(path)
    return [ProductUpdate(product, *given[product.id]) for product in products]


def update_products(root: Path, updates: list[ProductUpdate], keep: int = DEFAULT_KEEP) -> str:
    """Publish a new version = current with `updates` applied to its catalogue; returns the version name."""
    started = time.perf_counter()
    root = Path(root)
    if not updates:
        raise Refused("nothing published: no product rows given")
    with build_lock(root, create=False):
        artifact = open_current(root)
        records = artifact.products()
        known = {record["id"] for record in records}
        unknown = sorted({update.product.id for update in updates} - known)
        if unknown:
            raise Refused(f"nothing published: unknown product id(s) {shown_ids(unknown)}")
        by_id: Mapping[str, ProductUpdate] = {update.product.id: update for update in updates}
        categories = [unchanged(artifact, category) for category in sorted(artifact.categories)]
        placed = placement(artifact, categories)
        catalogue = (replace(row, product=by_id[row.product.id].apply(row.product)) if row.product.id in by_id
                     else row for row in carried_rows(artifact, placed))
        change = Change("update", sorted(by_id))
        version = derive(root, artifact, categories, records, change, artifact.fingerprint(), keep, started,
                         catalogue)
        LOG.info("updated %d products: %s -> %s", len(by_id), artifact.version, version)
        return version


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index update", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact root")
    parser.add_argument("--products", type=Path, required=True,
                        help="changed rows: JSONL, or CSV with label.<key> columns (see above for absent vs empty)")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not require_positive(keep=args.keep):
        return 2
    try:
        updates = read_updates(args.products)
        version = update_products(args.artifacts, updates, args.keep)
    except (TrainingError, ArtifactError) as exc:
        return report(exc)
    print(f"published {version} with {len(updates)} product(s) updated")
    return 0
