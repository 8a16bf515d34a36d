"""`python -m index add`: publish a new version with products added, embedding only the new images."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.catalogue import CatalogueRow, make_thumbnail
from index.edit import carried_rows, changed, derive, open_current, placement, unchanged
from index.embed import embed_product_files
from index.errors import ArtifactError, Refused
from index.manifest import Change
from index.publish import DEFAULT_KEEP, build_lock
from training.cli import report
from training.cli.args import add_device_arg, require_positive
from training.data.products import Product, read_products
from training.data.stl import CategoryMap, is_valid_id, not_utf8
from training.errors import TrainingError
from training.model.checkpoint import load_embedder

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewProduct:
    id: str
    category: str  # full path or unambiguous short name
    image: Path


def read_jsonl(path: Path) -> list[NewProduct]:
    """`{"id", "category", "image"}` per line; relative image paths are relative to the file's folder."""
    products = []
    try:
        # surrogateescape: a byte that is not UTF-8 fails its own line below (training.data.stl.not_utf8).
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem = not_utf8(line)
        if problem is not None:
            raise Refused(f"{path}:{number}: {problem}")
        try:
            record = json.loads(line)
            image = Path(record["image"])
            products.append(NewProduct(str(record["id"]), str(record["category"]),
                                       image if image.is_absolute() else path.parent / image))
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:  # RecursionError: deep nesting
            raise Refused(f"{path}:{number}: expected {{\"id\", \"category\", \"image\"}}: {exc}") from exc
    return products


def validate(products: list[NewProduct], catalogue: CategoryMap) -> list[NewProduct]:
    """Resolve categories to full paths; every problem of every product in one clear error."""
    problems, resolved, seen = [], [], set()
    for product in products:
        if not is_valid_id(product.id):
            problems.append(f"{product.id!r}: invalid id (letters, digits, _ and - only, at most 128)")
        elif product.id in catalogue:
            problems.append(f"{product.id}: already in the index (category {catalogue.of(product.id)!r})")
        elif product.id in seen:
            problems.append(f"{product.id}: given twice")
        seen.add(product.id)
        try:
            category = catalogue.resolve(product.category)
        except KeyError as exc:
            problems.append(f"{product.id}: {exc.args[0]}")
            category = product.category
        if not product.image.is_file():
            problems.append(f"{product.id}: image {product.image} does not exist")
        resolved.append(NewProduct(product.id, category, product.image))
    if not products:
        problems.append("no products given")
    if problems:
        raise Refused("nothing published: " + "; ".join(problems))
    return resolved


def check_product_data(products: list[NewProduct], product_data: Mapping[str, Product]) -> None:
    """Product data may only describe the products being added (the others change with `index update`)."""
    stray = sorted(set(product_data) - {product.id for product in products})
    if stray:
        raise Refused(f"nothing published: product data for id(s) not being added {stray}")


def add_products(root: Path, products: list[NewProduct], device: str = "auto", keep: int = DEFAULT_KEEP,
                 batch_size: int = 64, product_data: Mapping[str, Product] | None = None) -> str:
    """Publish a new version = current + `products`; returns the new version name.

    `product_data` (title, price, labels... by id) goes into the catalogue; an added product without data
    gets a bare row. The catalogue is written when the current version has one or product data is given.
    """
    started = time.perf_counter()
    root = Path(root)
    check_product_data(products, product_data or {})
    with build_lock(root, create=False):
        artifact = open_current(root)
        records = artifact.products()
        catalogue = CategoryMap({record["id"]: record["category"] for record in records})
        products = validate(products, catalogue)
        embedder = load_embedder(artifact.checkpoint_path, device)
        artifact.check_embedder(embedder.fingerprint())
        vectors, readable = embed_product_files(embedder, [p.image for p in products], batch_size, workers=0,
                                                progress=False)
        unreadable = [str(p.image) for p, ok in zip(products, readable, strict=True) if not ok]
        if unreadable:
            raise Refused(f"nothing published: unreadable image(s) {unreadable}")

        categories = []
        for category in sorted(artifact.categories):
            rows = [i for i, p in enumerate(products) if p.category == category]
            if not rows:
                categories.append(unchanged(artifact, category))
                continue
            index = artifact.read_index(category)
            index.add(np.ascontiguousarray(vectors[rows]))  # faiss ids = positions, so appending keeps them
            ids = artifact.read_ids(category) + [products[i].id for i in rows]
            all_vectors = np.concatenate([artifact.read_vectors(category), vectors[rows]])
            categories.append(changed(artifact, category, ids, all_vectors, index))
        records = records + [{"id": p.id, "category": p.category, "image": str(p.image.resolve())} for p in products]
        catalogue = None
        if artifact.catalogue_path is not None or product_data is not None:
            placed = placement(artifact, categories)
            added = []
            for product in products:  # thumbnails first: a bad image refuses before anything is staged
                thumbnail, media_type = make_thumbnail(product.image)
                data = (product_data or {}).get(product.id) or Product(product.id)
                added.append(CatalogueRow(data, *placed[product.id], 0, None, thumbnail, media_type))
            catalogue = itertools.chain(carried_rows(artifact, placed), added)
        change = Change("add", [p.id for p in products])
        version = derive(root, artifact, categories, records, change, embedder.fingerprint(), keep, started,
                         catalogue)
        LOG.info("added %d products: %s -> %s", len(products), artifact.version, version)
        return version


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index add", description=__doc__)
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact root")
    parser.add_argument("--id", action="append", default=[], help="product id (repeat with --category/--image)")
    parser.add_argument("--category", action="append", default=[], help="category path or short name, per --id")
    parser.add_argument("--image", action="append", default=[], type=Path, help="product image file, per --id")
    parser.add_argument("--from", dest="from_file", type=Path, default=None,
                        help='JSON lines of {"id", "category", "image"}')
    parser.add_argument("--products", type=Path, default=None,
                        help="catalogue data of the added products: JSONL, or CSV with label.<key> columns "
                             "(as for build); a row for any other id is refused")
    add_device_arg(parser, strict=True)
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not (len(args.id) == len(args.category) == len(args.image)):
        print(f"error: give one --category and one --image per --id (got {len(args.id)} ids, "
              f"{len(args.category)} categories, {len(args.image)} images)", file=sys.stderr)
        return 2
    if not require_positive(keep=args.keep):
        return 2
    try:
        products = [NewProduct(*fields) for fields in zip(args.id, args.category, args.image, strict=True)]
        if args.from_file is not None:
            products += read_jsonl(args.from_file)
        product_data = (None if args.products is None
                        else {product.id: product for product in read_products(args.products)})
        version = add_products(args.artifacts, products, args.device, args.keep, product_data=product_data)
    except (TrainingError, ArtifactError) as exc:
        return report(exc)
    print(f"published {version} with {len(products)} product(s) added")
    return 0
