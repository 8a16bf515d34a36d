"""`python -m index remove`: publish a new version without the given products (nothing is re-embedded)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import faiss
import numpy as np

from index.edit import carried_rows, changed, derive, open_current, placement, unchanged
from index.errors import ArtifactError, Refused, shown_ids
from index.manifest import Change
from index.publish import DEFAULT_KEEP, build_lock
from training.cli import report
from training.cli.args import require_positive
from training.errors import TrainingError

LOG = logging.getLogger(__name__)


def _refill_ivf(index: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    # reset() empties the inverted lists but keeps the trained quantizer: re-adding the remaining rows
    # renumbers them 0..n-1 (faiss ids = positions) without retraining k-means.
    index.reset()
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def remove_products(root: Path, product_ids: list[str], keep: int = DEFAULT_KEEP) -> str:
    """Publish a new version = current - `product_ids`; returns the new version name."""
    started = time.perf_counter()
    root = Path(root)
    if not product_ids:
        raise Refused("nothing published: no product ids given")
    with build_lock(root, create=False):
        artifact = open_current(root)
        records = artifact.products()
        known = {record["id"]: record["category"] for record in records}
        unknown = sorted({pid for pid in product_ids if pid not in known})
        if unknown:
            raise Refused(f"nothing published: unknown product id(s) {shown_ids(unknown)}")
        doomed = set(product_ids)
        categories = []
        for category in sorted(artifact.categories):
            ids = artifact.read_ids(category)
            keep_rows = [row for row, pid in enumerate(ids) if pid not in doomed]
            if len(keep_rows) == len(ids):
                categories.append(unchanged(artifact, category))
                continue
            if not keep_rows:
                LOG.warning("category %r has no products left; it is dropped from the index", category)
                continue
            vectors = artifact.read_vectors(category)[keep_rows]
            is_ivf = artifact.entry(category).factory.startswith("IVF")
            index = _refill_ivf(artifact.read_index(category), vectors) if is_ivf else None
            categories.append(changed(artifact, category, [ids[row] for row in keep_rows], vectors, index))
        records = [record for record in records if record["id"] not in doomed]
        if not records:
            raise Refused("nothing published: removing these products would leave the index empty")
        change = Change("remove", sorted(doomed))
        # The catalogue follows the renumbered rows; a parent without one stays without one.
        catalogue = (carried_rows(artifact, placement(artifact, categories))
                     if artifact.catalogue_path is not None else None)
        version = derive(root, artifact, categories, records, change, artifact.fingerprint(), keep, started,
                         catalogue)
        LOG.info("removed %d products: %s -> %s", len(doomed), artifact.version, version)
        return version


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index remove", description=__doc__)
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact root")
    parser.add_argument("--id", action="append", required=True, help="product id to remove (repeatable)")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not require_positive(keep=args.keep):
        return 2
    try:
        version = remove_products(args.artifacts, args.id, args.keep)
    except (TrainingError, ArtifactError) as exc:
        return report(exc)
    print(f"published {version} with {len(set(args.id))} product(s) removed")
    return 0
