"""`python -m index build`: embed the whole catalogue, index it per category, publish a new version."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from index.ann import (
    DEFAULT_APPROXIMATE,
    DEFAULT_EXACT_THRESHOLD,
    Approximate,
    IndexSpec,
    OverBudget,
    build_index,
    choose_spec,
    parse_size,
    tune_search_params,
)
from index.catalogue import CatalogueRow, make_thumbnail
from index.dedup import DEFAULT_DUPLICATE_THRESHOLD, group_duplicates, image_digest
from index.detector import check_detector_checkpoint, prepare_detector
from index.embed import embed_product_files
from index.errors import ArtifactError, Refused
from index.examples import DEFAULT_EXAMPLES, choose_examples, write_examples
from index.manifest import Provenance, SplitRecord
from index.publish import DEFAULT_KEEP, STAGING_PREFIX, build_lock, clean_stale, publish, staged
from index.writer import CategoryData, new_version, stage_detector, stage_export, write_version
from training.cli import report
from training.cli.args import (
    SEED,
    add_cache_arg,
    add_data_arg,
    add_device_arg,
    add_engine_args,
    add_images_arg,
    add_progress_arg,
    add_workers_arg,
    directory,
    number,
)
from training.data.popularity import Popularity
from training.data.products import Product, read_dataset_products, read_products
from training.data.split import SPLIT_FRACTIONS, split_by_scene
from training.data.stl import CategoryMap, STLDataset, read_bytes
from training.errors import TrainingError, Unavailable
from training.exec.choose import open_executor
from training.exec.executor import Executor, LocalExecutor
from training.fit.features import cache_features
from training.io import file_sha256
from training.model.batch_runtime import RUNTIME_CHOICES, batch_runtime
from training.model.checkpoint import load_checkpoint, load_embedder
from training.model.embedder import Embedder
from training.model.export import MIN_COSINE, can_export, check_export_runtimes, export_embedder
from training.model.runtimes import Runtime, RuntimeName, RuntimeUnavailable

LOG = logging.getLogger(__name__)


def catalogue_fingerprint(dataset: STLDataset, catalogue: list[str], digests: Mapping[str, str] | None = None) -> str:
    """sha256 of the catalogue an index is built from: each product's id, category and image content digest.

    Not `training.data.stl.dataset_fingerprint` (which data a head was trained on): this one changes
    when a product image is replaced, so it also salts the version name. Content, not size and mtime: the
    images may be behind a URI (`--images`), where there is nothing to stat, and the same catalogue read from
    disk or from a store gets the same fingerprint. `digests` are those known already (a build reads each
    image once, for its thumbnail and dedup); the other images are read here, an unreadable one counts as such.
    """
    known = digests or {}
    digest = hashlib.sha256()
    for pid in catalogue:
        content = known.get(pid) or _digest_or_unreadable(dataset.product_location(pid))
        digest.update(f"{pid}\t{dataset.categories.of(pid)}\t{content}\n".encode())
    digest.update(f"pairs={len(dataset.pairs)}".encode())
    return digest.hexdigest()


def _digest_or_unreadable(location: str) -> str:
    try:
        return image_digest(location)
    except OSError:  # a missing file, or a store's network error
        return "unreadable"


@dataclass(frozen=True)
class ProductImage:
    """What a build keeps of a product's image file: its catalogue thumbnail and its content digest."""

    thumbnail: bytes
    media_type: str
    digest: str


def read_product_images(dataset: STLDataset, product_ids: Sequence[str], workers: int = 2) -> dict[str, ProductImage]:
    """Each product image read once, through the one image reader (`training.data.stl.read_bytes`: a local path
    or a URI under the dataset's `images` base), for its thumbnail and digest.

    Only images the embedding has read already come here, so a failure now is the store's (Unavailable)."""

    def read(pid: str) -> ProductImage:
        location = dataset.product_location(pid)
        try:
            data = read_bytes(location)
        except OSError as exc:
            raise Unavailable(f"cannot read product image {location} for its thumbnail: {exc}") from exc
        return ProductImage(*make_thumbnail(data), image_digest(data))

    # PIL releases the GIL while decoding and encoding, hashlib while hashing, fsspec while waiting on the
    # network: threads use the cores.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(product_ids, pool.map(read, product_ids), strict=True))


def split_seed_of(checkpoint: Path) -> int:
    """The split seed training used, from the checkpoint's typed train record."""
    return load_checkpoint(checkpoint).train_config.split_seed


def export_checked(embedder: Embedder, folder: Path) -> dict[str, float] | None:
    """Export the embedder into `folder` and check it against torch on every installed runtime: runtime ->
    smallest cosine. None (with a warning) when it cannot be made or checked here; ExportMismatch when a
    runtime's vectors are not torch's (the build then publishes nothing)."""
    if not can_export():
        LOG.warning("onnx is not installed: this version gets no exported model (a server will need torch)")
        return None
    export_embedder(embedder, folder)
    try:
        checked = check_export_runtimes(embedder, folder)
    except RuntimeUnavailable as exc:
        LOG.warning("the export cannot be checked here (%s): this version gets no exported model", exc)
        return None
    LOG.info("exported model checked against torch: %s", checked)
    return checked


def embed_catalogue(dataset: STLDataset, catalogue: list[str], embedder: Embedder, cache: Path | None,
                    batch_size: int, workers: int, progress: bool, runtime: Runtime | None = None,
                    runtime_name: RuntimeName = "auto", export_dir: Path | None = None,
                    executor: Executor | None = None, checkpoint: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index vectors of the catalogue and a mask of the products that could be embedded.

    `runtime` runs the network over the files; with a feature cache its missing features are extracted in
    `runtime_name` over `export_dir` (`cache_features`). A remote `executor` (Ray) rebuilds the embedder on
    its workers from `checkpoint` and runs `runtime_name` there."""
    load = partial(load_embedder, Path(checkpoint).resolve()) if checkpoint is not None else None
    if cache is not None:
        # Backbone features already extracted for training are reused; only missing ones are computed.
        features = cache_features(dataset, embedder, cache, pairs=[], products=catalogue,
                                  batch_size=batch_size, workers=workers, progress=progress,
                                  runtime=runtime_name, export_dir=export_dir, executor=executor, load=load)
        readable = np.array([features.has_product(pid) for pid in catalogue], dtype=bool)
        vectors = np.zeros((len(catalogue), embedder.dim), dtype=np.float32)
        if readable.any():
            cached = [pid for pid, ok in zip(catalogue, readable, strict=True) if ok]
            vectors[readable] = embedder.project(features.product_features(cached), "product")
        return vectors, readable
    locations = [dataset.product_location(pid) for pid in catalogue]
    return embed_product_files(embedder, locations, batch_size=batch_size, workers=workers, progress=progress,
                               runtime=runtime, executor=executor, load=load, runtime_name=runtime_name)


def category_index(vectors: np.ndarray, spec: IndexSpec, seed: int) -> tuple[np.ndarray, IndexSpec, float]:
    """Build and tune one category's index: (serialized index, spec with tuned search params, tuned recall).

    A plain function of arrays so an executor can run it anywhere (a Ray task); the bytes come back to the
    driver, which writes them."""
    index = build_index(vectors, spec, seed=seed)
    params, recall = tune_search_params(index, vectors, spec, seed=seed)
    return faiss.serialize_index(index), IndexSpec(spec.factory, spec.kind, params), recall


def build_category_indexes(executor: Executor, categories: list[CategoryData], exact_threshold: int,
                           approximate: Approximate, seed: int, memory_budget: int | None = None) -> None:
    """Fill each category's `index`/`spec`/`tuned_recall` through `executor.map_tasks` (one task a category).

    `memory_budget` (bytes, all indexes together) is shared in proportion to the categories' sizes; a category
    whose float index would not fit its share gets a compressed one (`index.ann.choose_spec`)."""
    total = sum(len(data.ids) for data in categories)
    specs = []
    for data in categories:
        share = None if memory_budget is None else int(memory_budget * len(data.ids) / total)
        try:
            specs.append(choose_spec(len(data.ids), exact_threshold, approximate, data.vectors.shape[1], share))
        except OverBudget as exc:
            raise Refused(f"category {data.category!r} does not fit --memory-budget: {exc}") from exc
    started = time.perf_counter()
    built = executor.map_tasks(category_index, [(np.ascontiguousarray(data.vectors, dtype=np.float32), spec, seed)
                                                for data, spec in zip(categories, specs, strict=True)])
    for data, (serialized, spec, recall) in zip(categories, built, strict=True):
        data.index, data.spec, data.tuned_recall = faiss.deserialize_index(serialized), spec, recall
    LOG.info("built %d category indexes on %s in %.1f s", len(categories), executor.name,
             time.perf_counter() - started)


def build(
    data: Path,
    checkpoint: Path,
    out: Path,
    device: str = "auto",
    cache: Path | None = None,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    approximate: Approximate = DEFAULT_APPROXIMATE,
    keep: int = DEFAULT_KEEP,
    batch_size: int = 64,
    workers: int = 2,
    split_seed: int | None = None,
    seed: int = 0,
    progress: bool = True,
    products_file: Path | None = None,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    examples: int = DEFAULT_EXAMPLES,
    runtime: RuntimeName = "auto",
    export: bool = True,
    executor: Executor | None = None,
    memory_budget: int | None = None,
    detector: Path | None = None,
    images: str | None = None,
) -> str:
    """Build and publish a new version from a dataset directory and a head checkpoint; returns the version.

    Product data comes from `products_file` (JSONL or CSV) when given, else from the dataset's optional
    products.jsonl; products without a row still get a catalogue entry (id, category, thumbnail).
    Duplicates within a category (same image bytes, or vectors with inner product >= `duplicate_threshold`;
    <= 0 keeps only the image rule) share a catalogue group (`index.dedup`). The default was measured on a
    trained head; an untrained (random) head maps every product of a category above it, so tests with one
    pass 0.

    With `export`, the backbone and head are exported into the version (`export/`, for a server without torch),
    checked against torch first (ExportMismatch: nothing is published). `runtime` runs the catalogue's
    embedding (`training.model.batch_runtime`: `auto` is OpenVINO over that export on a CPU, torch on a GPU).

    `executor` runs the embedding and the per-category index builds (`training.exec`: this process by default,
    or a Ray cluster); this process writes and publishes the version either way. `memory_budget` (bytes, every
    category's index together) makes the categories that would not fit compressed (IVF with SQ8 or PQ codes).

    `detector` (a `train-detector` checkpoint) goes into the version with its ONNX export (`index.detector`).

    `images`: where the image files are when not under `data/images` (a folder, or a URI read through fsspec:
    s3://, gs://, https://, file://; see `STLDataset.open`). Every read of the build goes there: the embedding,
    thumbnails and dedup digests, the example scenes.
    """
    executor = executor if executor is not None else LocalExecutor(workers)
    remote = not isinstance(executor, LocalExecutor)
    started = time.perf_counter()
    out = Path(out)
    with build_lock(out):
        clean_stale(out)
        try:
            dataset = STLDataset.open(data, on_error="skip", images=images)
        except FileNotFoundError as exc:  # not a dataset directory: there is nothing to index
            raise Refused(f"nothing to index: {exc}") from exc
        product_data = (
            {product.id: product for product in read_products(products_file)} if products_file is not None
            else read_dataset_products(data)
        )
        catalogue = dataset.catalogue()
        if not catalogue:
            raise Refused(f"{data} has no product with both a category and an image; nothing to index")
        embedder = load_embedder(checkpoint, device)
        if detector is not None:
            check_detector_checkpoint(detector)
        # Beside the versions, so the export's files are hard-linked into the version, not copied; a killed
        # build's leftover goes with the next build's clean_stale.
        with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}export-", dir=out) as scratch:
            export_dir = Path(scratch)
            checked = export_checked(embedder, export_dir) if export else None
            made = export_dir if checked is not None else None
            LOG.info("embedding %d products on %s (faiss GPUs: %d)", len(catalogue), embedder.device,
                     faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
            # A remote executor's workers open their own runtime: none is compiled here for nothing.
            with contextlib.nullcontext() if remote else batch_runtime(embedder, runtime, made) as engine:
                embed_started = time.perf_counter()  # the runtime's one-off compile is not throughput
                vectors, readable = embed_catalogue(dataset, catalogue, embedder, cache, batch_size, workers,
                                                    progress, engine, runtime, made, executor, checkpoint)
                embed_runtime = f"{executor.name}:{runtime}" if engine is None else engine.name
            embed_seconds = time.perf_counter() - embed_started
            skipped = [pid for pid, ok in zip(catalogue, readable, strict=True) if not ok]
            indexed = {pid: row for row, pid in enumerate(catalogue) if readable[row]}
            if not indexed:
                raise Refused("no product image could be read; nothing to index")

            rows_by_category: dict[str, list[int]] = defaultdict(list)
            for pid, row in indexed.items():
                rows_by_category[dataset.categories.of(pid)].append(row)
            categories = [
                CategoryData(category, [catalogue[row] for row in rows], vectors[rows])
                for category, rows in sorted(rows_by_category.items())
            ]
            build_category_indexes(executor, categories, exact_threshold, approximate, seed, memory_budget)
            products = [
                {"id": pid, "category": data_.category, "image": _image_reference(dataset, pid)}
                for data_ in categories for pid in data_.ids
            ]

            # Popularity from TRAINING pairs only (same split as training), ranked over the indexed products.
            split_seed = split_seed_of(checkpoint) if split_seed is None else split_seed
            split = split_by_scene(dataset.pairs, SPLIT_FRACTIONS, split_seed)
            train_pairs = split.train
            indexed_map = CategoryMap({pid: dataset.categories.of(pid) for pid in indexed})
            popularity = Popularity.from_pairs((p for p in train_pairs if p.product_id in indexed), indexed_map)

            pictures = read_product_images(dataset, list(indexed), workers)
            fingerprint = embedder.fingerprint()
            catalogue_sha256 = catalogue_fingerprint(dataset, catalogue,
                                                     {pid: picture.digest for pid, picture in pictures.items()})
            version = new_version(f"{catalogue_sha256}|{fingerprint['head_sha256']}")
            provenance = Provenance(
                operation="build",
                parent_version=None,
                data_root=str(Path(data).resolve()),
                catalogue_fingerprint=catalogue_sha256,
                checkpoint_source=str(Path(checkpoint).resolve()),
                checkpoint_source_sha256=file_sha256(checkpoint),
                split=SplitRecord(SPLIT_FRACTIONS, split_seed, len(train_pairs)),
                skipped_products=skipped,
                device=str(embedder.device),
                embed_seconds=round(embed_seconds, 3),
                embed_products_per_second=round(len(catalogue) / max(embed_seconds, 1e-9), 2),
                embed_runtime=embed_runtime,
            )
            # Test-split scenes (never trained on) for the page's "try an example".
            chosen = choose_examples(split.test, {pid: dataset.categories.of(pid) for pid in indexed}, examples, seed)
            rows = catalogue_rows(categories, product_data, popularity, pictures, duplicate_threshold)
            detector_dir = Path(scratch) / "detector"
            if detector is not None:
                prepare_detector(detector, detector_dir, [data_.category for data_ in categories], device)
            with staged(out, version) as staging:
                write_version(staging, version, categories, fingerprint, Path(checkpoint), popularity, products,
                              provenance, exact_threshold, approximate, seed, progress, started=started,
                              catalogue=rows, examples=lambda folder: write_examples(folder, dataset, chosen),
                              export=None if made is None else partial(stage_export, source=made, checked=checked,
                                                                       min_cosine=MIN_COSINE),
                              detector=None if detector is None else partial(
                                  stage_detector, source=detector_dir, origin=str(Path(detector).resolve())))
                publish(out, staging, keep)
            return version


def catalogue_rows(categories: Sequence[CategoryData], product_data: Mapping[str, Product], popularity: Popularity,
                   pictures: Mapping[str, ProductImage], duplicate_threshold: float = 0.0) -> list[CatalogueRow]:
    """One catalogue row per indexed product: its data (or just its id), category, row in the category's
    index, training popularity, dedup group and the thumbnail of its image (`read_product_images`)."""
    placed = [(data.category, row, pid) for data in categories for row, pid in enumerate(data.ids)]
    group_of: dict[str, str] = {}
    for data in categories:
        group_of.update(group_duplicates(
            data.ids, data.vectors if duplicate_threshold > 0 else None, [pictures[pid].digest for pid in data.ids],
            duplicate_threshold, {pid: popularity.count(pid) for pid in data.ids}))
    return [
        CatalogueRow(product_data.get(pid) or Product(pid), category, row, popularity.count(pid), group_of[pid],
                     pictures[pid].thumbnail, pictures[pid].media_type)
        for category, row, pid in placed
    ]


def _image_reference(dataset: STLDataset, product_id: str) -> str:
    if dataset.images is not None:  # an image base of its own (a URI or a folder): where the image was read
        return dataset.product_location(product_id)
    # Relative to the dataset root, so the artifact stays valid when the data is mounted elsewhere.
    return str(dataset.product_path(product_id).relative_to(dataset.root))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index build", description=__doc__)
    add_data_arg(parser, help="STL-format dataset directory")
    parser.add_argument("--checkpoint", type=Path, required=True, help="head checkpoint (model.pt)")
    parser.add_argument("--out", type=directory, required=True, help="artifact root (versions/ and current)")
    add_device_arg(parser, strict=True)
    add_cache_arg(parser, help="backbone feature cache dir to reuse")
    parser.add_argument("--exact-threshold", type=int, default=DEFAULT_EXACT_THRESHOLD,
                        help="categories up to this size get an exact index, larger ones an approximate one")
    parser.add_argument("--approximate", choices=["ivf", "hnsw"], default=DEFAULT_APPROXIMATE)
    parser.add_argument("--memory-budget", type=parse_size, default=None,
                        help="memory all category indexes may take together (e.g. 2GB): a category whose float "
                             "index would not fit its share gets a compressed one (IVF with SQ8 or PQ codes)")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="versions to keep (current always kept)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_workers_arg(parser, help="image decoding worker processes")
    parser.add_argument("--split-seed", type=SEED, default=None,
                        help="seed of the train split for popularity (default: the checkpoint's, else 0)")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--products", type=Path, default=None,
                        help="product data: JSONL, or CSV with label.<key> columns (default: DATA/products.jsonl)")
    parser.add_argument("--duplicate-threshold", type=number(), default=DEFAULT_DUPLICATE_THRESHOLD,
                        help="products of a category whose vectors' inner product reaches this are one dedup group "
                             "(as are identical image files); 0 or negative: image files only "
                             f"(default {DEFAULT_DUPLICATE_THRESHOLD})")
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto",
                        help="what runs the backbone over the catalogue: auto = OpenVINO over the export on a CPU, "
                             "torch on a GPU")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="publish no exported model (ONNX) beside the indexes; a server then needs torch")
    parser.add_argument("--detector", type=Path, default=None,
                        help="item detector checkpoint (train-detector's detector.pt) to put into the version, "
                             "with its ONNX export: /detect and /shop")
    add_images_arg(parser)
    add_engine_args(parser)
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.keep < 1 or args.exact_threshold < 0 or args.batch_size < 1 or args.workers < 0:
        print("error: --keep and --batch-size must be >= 1, --exact-threshold and --workers >= 0", file=sys.stderr)
        return 2
    if not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} "
              f"{'is not a file' if args.checkpoint.exists() else 'does not exist'}", file=sys.stderr)
        return 2
    try:
        with open_executor(args.engine, args.ray_address, args.workers) as executor:
            version = build(args.data, args.checkpoint, args.out, args.device, args.cache, args.exact_threshold,
                            args.approximate, args.keep, args.batch_size, args.workers, args.split_seed, args.seed,
                            progress=not args.no_progress, products_file=args.products,
                            duplicate_threshold=args.duplicate_threshold, runtime=args.runtime, export=args.export,
                            executor=executor, memory_budget=args.memory_budget, detector=args.detector,
                            images=args.images)
    except (TrainingError, ArtifactError) as exc:
        return report(exc)
    print(f"published {version} under {args.out}")
    return 0
