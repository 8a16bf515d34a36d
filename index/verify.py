"""`python -m index verify ARTIFACTS`: files (the exported model's and the detector's too) against the manifest's
sha256s, the checkpoint, the exported model's and the detector's own manifests, the catalogue
against the indexes, and recall@K of every approximate index against exact search on its own vectors.
Non-zero exit on any problem."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from index.ann import (
    RECALL_K,
    RECALL_TARGET,
    RERANK_CANDIDATES,
    is_compressed,
    leave_one_out_recall,
    tuning_rows,
)
from index.artifact import Artifact, open_artifact
from index.catalogue import Catalogue, CatalogueError, check_catalogue
from index.errors import ArtifactError
from index.examples import read_examples
from training.cli import report as report_error
from training.cli.args import COUNT, number
from training.errors import TrainingError
from training.io import file_sha256
from training.model.checkpoint import CheckpointMismatch, load_checkpoint
from training.model.detect_post import CHECKPOINT_FILE as DETECTOR_CHECKPOINT_FILE
from training.model.detect_post import DetectorExport
from training.model.runtimes import ExportManifest

LOG = logging.getLogger(__name__)


@dataclass
class Report:
    version: str
    problems: list[str] = field(default_factory=list)
    recall: dict[str, float] = field(default_factory=dict)  # approximate categories only

    @property
    def ok(self) -> bool:
        return not self.problems


def check_checkpoint(artifact: Artifact, checkpoint: Path | None) -> list[str]:
    """The artifact's model.pt (and, if given, an outside checkpoint) must be the head the index was built with."""
    problems = []
    built_with = artifact.manifest.embedder
    candidates = [artifact.checkpoint_path] + ([checkpoint] if checkpoint is not None else [])
    for path in candidates:
        if not path.is_file():
            problems.append(f"checkpoint {path}: missing")
            continue
        if file_sha256(path) != built_with.head_sha256:
            problems.append(f"checkpoint {path}: sha256 differs from the head the index was built with "
                            f"({built_with.head_sha256[:12]})")
            continue
        try:
            loaded = load_checkpoint(path)
        except CheckpointMismatch as exc:
            problems.append(str(exc))
            continue
        if (loaded.backbone_name, loaded.backbone_weights_sha256) != (built_with.backbone,
                                                                     built_with.backbone_weights_sha256):
            problems.append(f"checkpoint {path}: backbone {loaded.backbone_name!r} differs from the manifest's")
        if loaded.head_config.out_dim != built_with.dim:
            problems.append(f"checkpoint {path}: head gives {loaded.head_config.out_dim}-d vectors, "
                            f"the index holds {built_with.dim}-d")
    return problems


def check_export_model(artifact: Artifact) -> list[str]:
    """The exported model (if the version has one) is the model the index was built with: its own manifest
    names the version's embedder fingerprint and its graphs' checksums hold (the files' sha256s against the
    version's manifest are `check_files`')."""
    folder = artifact.export_dir
    if folder is None:
        return []
    try:
        export = ExportManifest.read(folder)
        export.verify(folder)
    except TrainingError as exc:
        return [f"exported model: {exc}"]
    if export.fingerprint != artifact.fingerprint():
        return [f"exported model in {folder.name}/ was made from another embedder than the index was built with"]
    return []


def check_detector(artifact: Artifact) -> list[str]:
    """The item detector (if the version has one): its detector.json names its graph's and its checkpoint's
    sha256, and the categories the manifest recorded; at least one of them is indexed."""
    folder, record = artifact.detector_dir, artifact.manifest.detector
    if folder is None or record is None:
        return []
    try:
        export = DetectorExport.read(folder)
        export.verify(folder)
    except TrainingError as exc:
        return [f"detector: {exc}"]
    problems = []
    checkpoint = folder / DETECTOR_CHECKPOINT_FILE
    if not checkpoint.is_file() or file_sha256(checkpoint) != export.checkpoint_sha256:
        problems.append(f"detector: {folder.name}/{DETECTOR_CHECKPOINT_FILE} is not the checkpoint the graph "
                        "was exported from")
    if export.categories != record.categories or export.image_size != record.image_size:
        problems.append(f"detector: {folder.name}/detector.json contradicts the manifest's detector record")
    if not set(export.categories) & set(artifact.categories):
        problems.append("detector: none of its categories is indexed in this version")
    return problems


def check_catalogue_rows(artifact: Artifact) -> list[str]:
    """The catalogue must fit the indexes (`check_catalogue`) and name, at every row, the product of that row
    in the category's ids file: a hit maps to a product through its row. A version without one is fine."""
    path = artifact.catalogue_path
    if path is None:
        return []
    problems = check_catalogue(path, dict(artifact.categories))
    if problems:
        return problems
    try:
        with Catalogue.open(path) as catalogue:
            for category in sorted(artifact.categories):
                ids, named = artifact.read_ids(category), catalogue.row_ids(category)
                wrong = [row for row, (pid, other) in enumerate(zip(ids, named, strict=True)) if pid != other]
                if wrong:
                    problems.append(f"{path.name}: category {category!r} rows {wrong[:10]} name other products "
                                    f"than its ids file")
    except (CatalogueError, ArtifactError) as exc:
        problems.append(str(exc))
    return problems


def verify(root: Path, version: str | None = None, checkpoint: Path | None = None, k: int = RECALL_K,
           min_recall: float = RECALL_TARGET, queries: int = 256) -> Report:
    artifact = open_artifact(root, version)
    report = Report(artifact.version)
    report.problems += artifact.check_files()
    report.problems += check_checkpoint(artifact, checkpoint)
    report.problems += check_export_model(artifact)
    report.problems += check_detector(artifact)
    if report.problems:
        return report  # recall on corrupt files means nothing
    try:
        indexes = artifact.load_indexes(verify_checksums=False)
        products = artifact.products()
        read_examples(artifact.path)  # checksums match a forged file too: its records must still make sense
    except ArtifactError as exc:
        report.problems.append(str(exc))
        return report
    report.problems += check_catalogue_rows(artifact)
    if len(products) != sum(artifact.categories.values()):
        report.problems.append(f"products.json lists {len(products)} products, indexes hold "
                               f"{sum(artifact.categories.values())}")
    for category, index in indexes.items():
        if artifact.entry(category).kind != "approximate":
            continue
        vectors = artifact.read_vectors(category)
        depth = min(k, len(vectors) - 1)
        # A compressed category is served re-ranked from its float vectors (STL_RERANK_CANDIDATES): its recall
        # is the re-ranked one, as the build tuned it, not the codes' own.
        reranked = RERANK_CANDIDATES if is_compressed(artifact.entry(category).factory) else 0
        # Other rows than the build tuned on (seed 1), each left out of its own results.
        recall = leave_one_out_recall(index.index, vectors, tuning_rows(len(vectors), queries, seed=1), k,
                                      rerank_candidates=reranked)
        report.recall[category] = recall
        if recall < min_recall:
            report.problems.append(f"{category}: recall@{depth} {recall:.3f} below {min_recall}")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index verify", description=__doc__)
    parser.add_argument("artifacts", type=Path, help="artifact root")
    parser.add_argument("--version", default=None, help="version to check (default: current)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="head checkpoint that must match the index")
    parser.add_argument("--k", type=COUNT, default=RECALL_K,
                        help=f"neighbours of the recall check (default {RECALL_K})")
    parser.add_argument("--min-recall", type=number(0.0, 1.0), default=RECALL_TARGET,
                        help=f"recall@k the approximate indexes must reach (default {RECALL_TARGET})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = verify(args.artifacts, args.version, args.checkpoint, args.k, args.min_recall)
    except (TrainingError, ArtifactError) as exc:
        return report_error(exc)
    for category, recall in sorted(report.recall.items()):
        print(f"{category}: recall@{args.k} = {recall:.4f}")
    if report.ok:
        print(f"version {report.version}: OK")
        return 0
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"version {report.version}: {len(report.problems)} problem(s)", file=sys.stderr)
    return 1
