"""Sample scenes shipped inside a version, so the page can offer "try an example" from its own catalogue.

A build picks scenes of the test split (never seen in training, so an example shows what a shopper would
get), spread over the categories, and stores each as a top-level `example-<n>.jpg` (covered by the
manifest's checksums like every other file) plus `examples.json` with the item's category and box.
Derived versions (add, remove, update) carry them over unchanged.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from index.errors import CorruptArtifact
from training.data.stl import BBox, Pair, STLDataset, is_valid_id, read_bytes, validate_bbox
from training.errors import one_line
from training.io import copy_atomic, write_bytes_atomic, write_json_atomic
from training.model.arrays import load_image

LOG = logging.getLogger(__name__)

EXAMPLES_FILE = "examples.json"
DEFAULT_EXAMPLES = 24
MAX_SIDE = 800  # a page preview, not the original: bounded size whatever the catalogue's photos are


@dataclass(frozen=True)
class Example:
    id: str  # "1", "2", ...: the file is example-<id>.jpg
    category: str
    bbox: BBox
    product_id: str
    scene_id: str

    @property
    def file(self) -> str:
        return f"example-{self.id}.jpg"


def choose_examples(pairs: Sequence[Pair], category_of: dict[str, str], count: int = DEFAULT_EXAMPLES,
                    seed: int = 0) -> list[tuple[Example, Pair]]:
    """Up to `count` pairs of distinct scenes, round-robin over the categories (seeded)."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[Pair]] = {}
    for pair in pairs:
        if pair.product_id in category_of:
            by_category.setdefault(category_of[pair.product_id], []).append(pair)
    queues = {category: [found[i] for i in rng.permutation(len(found))]
              for category, found in sorted(by_category.items())}
    chosen: list[tuple[Example, Pair]] = []
    scenes: set[str] = set()
    while len(chosen) < count and any(queues.values()):
        for category, queue in queues.items():
            while queue and queue[0].scene_id in scenes:
                queue.pop(0)
            if queue and len(chosen) < count:
                pair = queue.pop(0)
                scenes.add(pair.scene_id)
                chosen.append((Example(str(len(chosen) + 1), category, pair.bbox, pair.product_id, pair.scene_id),
                               pair))
    return chosen


def write_examples(staging: Path, dataset: STLDataset, chosen: Sequence[tuple[Example, Pair]]) -> list[Example]:
    """Store the chosen scenes as small JPEGs and examples.json; scenes that cannot be read are left out.

    Scenes are read where the dataset's images are (`STLDataset.scene_location`: a path, or a URI)."""
    written: list[Example] = []
    for example, pair in chosen:
        try:
            image = load_image(read_bytes(dataset.scene_location(pair.scene_id)))
        except (OSError, ValueError, SyntaxError) as exc:
            LOG.warning("example scene %s left out: %s", pair.scene_id, exc)
            continue
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=88)
        write_bytes_atomic(staging / example.file, buffer.getvalue())
        written.append(example)
    write_json_atomic(staging / EXAMPLES_FILE, [asdict(example) for example in written])
    return written


def carry_examples(source: Path, staging: Path) -> None:
    """Copy a version's examples into a derived version (nothing to do for versions without them)."""
    for example in read_examples(source):
        copy_atomic(source / example.file, staging / example.file)
    if (source / EXAMPLES_FILE).is_file():
        copy_atomic(source / EXAMPLES_FILE, staging / EXAMPLES_FILE)


def read_examples(version_dir: Path) -> list[Example]:
    """The examples of a version directory; [] for versions built before examples existed."""
    path = Path(version_dir) / EXAMPLES_FILE
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise TypeError(f"expected a list, got {type(records).__name__}")
        examples = [Example(str(raw["id"]), str(raw["category"]), validate_bbox(raw["bbox"]),
                            str(raw["product_id"]), str(raw["scene_id"])) for raw in records]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptArtifact(f"{path} is corrupt ({one_line(exc)})") from None
    # The id names a file of the version (example-<id>.jpg): nothing that could point elsewhere.
    bad = next((example.id for example in examples if not is_valid_id(example.id)), None)
    if bad is not None:
        raise CorruptArtifact(f"{path} is corrupt (example id {bad[:40]!r} names no example file)")
    return examples
