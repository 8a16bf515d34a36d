"""Putting the item detector into a version: `python -m index build --detector PATH` (and the pipeline).

The checkpoint is loaded with torch, exported to ONNX beside it (`training.model.detector.export_detector`)
and the graph's raw outputs are checked against torch's before anything is published: a server runs the
graph without torch (`training.model.detect_post`). The folder is then linked into the version
(`index.writer.stage_detector`), its files covered by the manifest's sha256s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from index.errors import Refused
from training.errors import TrainingError
from training.model.detect_post import DetectorExport
from training.model.detector import check_detector_export, export_detector, load_detector, read_detector_checkpoint

LOG = logging.getLogger(__name__)


def check_detector_checkpoint(checkpoint: Path) -> None:
    """Refused when `checkpoint` is missing or is no detector checkpoint. The build asks this before it embeds
    the catalogue, so a wrong path costs a second rather than the whole embedding."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise Refused(f"detector checkpoint {checkpoint} does not exist")
    try:
        read_detector_checkpoint(checkpoint)
    except TrainingError as exc:
        raise Refused(f"the detector {checkpoint} cannot go into the version: {exc}") from exc


def prepare_detector(checkpoint: Path, folder: Path, indexed: Iterable[str], device: str = "cpu",
                     backbone_weights: Path | None = None) -> DetectorExport:
    """Copy, export and check the detector into `folder`; Refused when it cannot be used with this index."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise Refused(f"detector checkpoint {checkpoint} does not exist")
    try:
        # On the CPU: the export is traced there, and a frozen TorchScript pyramid cannot be exported.
        detector = load_detector(checkpoint, "cpu" if device == "auto" else device, backbone_weights, freeze=False)
        export_detector(detector, checkpoint, folder)
        diff = check_detector_export(detector, folder)
    except TrainingError as exc:  # not a detector, another backbone, or an export that differs
        raise Refused(f"the detector {checkpoint} cannot go into the version: {exc}") from exc
    export = DetectorExport.read(folder)
    known = set(indexed)
    unknown = [category for category in export.categories if category not in known]
    if len(unknown) == len(export.categories):
        raise Refused(f"the detector {checkpoint} finds none of the indexed categories "
                      f"(it knows {export.categories[:5]}...)")
    if unknown:
        LOG.warning("the detector finds %d categories the index has no products of: %s", len(unknown), unknown[:5])
    LOG.info("detector %s exported (%d categories, %d px, max |torch - export| %.2g)", checkpoint,
             len(export.categories), export.image_size, diff)
    return export
