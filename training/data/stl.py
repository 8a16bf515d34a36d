"""The Pinterest Shop-the-Look (STL) data format: pair files, category files and an image folder.

A dataset directory holds `pairs.jsonl` (one `{"product", "scene", "bbox"}` object per line, the
upstream `fashion.json`), `categories.json` (`{product_id: "A|B|C"}`, the upstream
`fashion-cat.json`) and `images/scenes/<id>.jpg`, `images/products/<id>.jpg`.

The images may live elsewhere: `STLDataset.open(root, images="s3://bucket/stl")` reads
`<images>/scenes/<id>.jpg` and `<images>/products/<id>.jpg` through fsspec (s3://, gs://, https://, file://),
so workers on other machines read the same files. `read_bytes(location)` reads a path or a URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.errors import DataError, Unavailable, UnknownCategory
from training.io import file_sha256

LOG = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
CATEGORIES_FILE = "categories.json"
# Upstream names, accepted when the canonical ones are absent.
UPSTREAM_PAIRS_FILES = ("fashion.json", "home.json")
UPSTREAM_CATEGORIES_FILES = ("fashion-cat.json", "home-cat.json")
SCENES_DIR = Path("images") / "scenes"
PRODUCTS_DIR = Path("images") / "products"
IMAGE_SUFFIX = ".jpg"

BBox = tuple[float, float, float, float]
OnError = Literal["raise", "skip"]
# The two kinds of image: a scene photo (cropped to an item's bbox) or a product picture (used whole).
Kind = Literal["scene", "product"]
KINDS: tuple[Kind, ...] = ("scene", "product")
# Ids become file names (images/products/<id>.jpg), so only these characters: the one id rule.
ID_PATTERN = re.compile(r"^[0-9a-zA-Z_-]{1,128}$")


# A location is a local path or a URI with a scheme fsspec knows ("s3://...", "https://..."); a Windows
# drive letter ("C:\\...") has one letter before the colon and stays a path.
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.match(value) is not None


class STLFormatError(DataError):
    """A record of an STL file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class Issue:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Pair:
    scene_id: str
    product_id: str
    bbox: BBox


def validate_bbox(values: object) -> BBox:
    """Return a `[left, top, right, bottom]` box in [0, 1] or raise ValueError saying why not."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise ValueError(f"bbox must be 4 numbers [left, top, right, bottom], got {values!r}")
    box: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"bbox values must be numbers, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"bbox values must be finite, got {value!r}")
        box.append(float(value))
    left, top, right, bottom = box
    if min(box) < 0.0 or max(box) > 1.0:
        raise ValueError(f"bbox values must lie in [0, 1], got {box}")
    if left >= right:
        raise ValueError(f"bbox left ({left}) must be less than right ({right})")
    if top >= bottom:
        raise ValueError(f"bbox top ({top}) must be less than bottom ({bottom})")
    return left, top, right, bottom


def short_name(category_path: str) -> str:
    return category_path.rsplit("|", 1)[-1]


class CategoryResolver:
    """Category names as people write them: a full STL path, or its short name (the last path part) where
    that names one path only. The one resolver: the dataset, the index and the service all use it."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths: list[str] = sorted(set(paths))
        self._known = set(self.paths)
        self._by_short: dict[str, list[str]] = {}
        for path in self.paths:
            self._by_short.setdefault(short_name(path), []).append(path)

    def display_name(self, path: str) -> str:
        """The short name where it is unambiguous, else the full path."""
        name = short_name(path)
        return name if len(self._by_short.get(name, [])) == 1 else path

    def names(self) -> list[str]:
        return [self.display_name(path) for path in self.paths]

    def resolve(self, name: str) -> str:
        """Full category path for a full path or a short name; UnknownCategory (a KeyError) listing the known."""
        name = name.strip()
        if name in self._known:
            return name
        matches = self._by_short.get(name, [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UnknownCategory(f"category {name!r} is ambiguous; use one of the full paths: {matches}")
        raise UnknownCategory(f"unknown category {name!r}; known categories: {self.names()}")


class CategoryMap:
    """product id -> full category path, with short names (last path part) accepted wherever a path is."""

    def __init__(self, product_to_path: dict[str, str]) -> None:
        self.product_to_path = dict(product_to_path)
        self.resolver = CategoryResolver(self.product_to_path.values())
        self.paths: list[str] = self.resolver.paths
        self._products: dict[str, list[str]] = {path: [] for path in self.paths}
        for product_id in sorted(self.product_to_path):
            self._products[self.product_to_path[product_id]].append(product_id)

    @classmethod
    def from_file(cls, path: str | Path) -> CategoryMap:
        path = Path(path)
        data = path.read_bytes()
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise STLFormatError(f"{path}:{_line_of(data, exc.start)}: {_not_utf8_at(data, exc.start)}") from None
        except json.JSONDecodeError as exc:
            raise STLFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        except RecursionError:  # json gives up on very deep nesting (the fuzzer's 100000 '[')
            raise STLFormatError(f"{path}: not valid JSON (nested too deeply)") from None
        if not isinstance(raw, dict):
            raise STLFormatError(f"{path}:1: expected an object {{product_id: category path}}")
        for product_id, category in raw.items():
            # An id names an image file (images/products/<id>.jpg): "../../x" read a file outside the dataset.
            if not is_valid_id(product_id):
                shown = product_id if len(product_id) <= 80 else product_id[:77] + "..."
                raise STLFormatError(f"{path}:1: invalid product id {shown!r} (1-128 letters, digits, '_' or '-')")
            if not isinstance(category, str) or not category.strip():
                raise STLFormatError(f"{path}:1: product {product_id!r} has no category path")
        return cls(raw)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.product_to_path, sort_keys=True), encoding="utf-8")

    def __contains__(self, product_id: str) -> bool:
        return product_id in self.product_to_path

    def __len__(self) -> int:
        return len(self.product_to_path)

    def of(self, product_id: str) -> str:
        return self.product_to_path[product_id]

    def resolve(self, name: str) -> str:
        """Full category path for a full path or a short name; UnknownCategory (a KeyError) listing the known."""
        return self.resolver.resolve(name)

    def short_names(self) -> list[str]:
        return self.resolver.names()

    def products_in(self, category: str) -> list[str]:
        """Product ids of a category (full path or short name), sorted."""
        return self._products[self.resolve(category)]


@dataclass
class LoadReport:
    """Records that were skipped while loading, each with file and line."""

    issues: list[Issue] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.issues)


def _fail(report: LoadReport, on_error: OnError, issue: Issue) -> None:
    if on_error == "raise":
        raise STLFormatError(str(issue))
    LOG.warning("skipping %s", issue)
    report.issues.append(issue)


def _not_utf8_at(data: bytes, offset: int) -> str:
    """The message for the byte at `offset` of `data` that is not UTF-8; the position counts from its line's start."""
    position = offset - (data.rfind(b"\n", 0, offset) + 1)
    return f"not UTF-8 text (byte 0x{data[offset]:02x} at position {position})"


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def not_utf8(line: str) -> str | None:
    """What is wrong with one line read with errors="surrogateescape", None when it is all UTF-8.

    That error handler turns each byte that is not UTF-8 into a lone surrogate (which strict UTF-8 never
    yields), so a bad byte fails its own line, with its number, instead of the whole read with no line at all.
    """
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = line.encode("utf-8", errors="surrogateescape")
        return _not_utf8_at(raw, len(line[: exc.start].encode("utf-8")))
    return None


def jsonl_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record) for each non-blank line of a JSON-lines file; a line that is not a JSON object
    (or not UTF-8 text) comes as (line number, what is wrong with it), for the caller to raise or to skip and
    count."""
    with Path(path).open(encoding="utf-8", errors="surrogateescape") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            problem = not_utf8(text)
            if problem is not None:
                yield number, problem
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, f"malformed JSON: {exc.msg}"
                continue
            except RecursionError:  # json gives up on very deep nesting (the fuzzer's 100000 '[')
                yield number, "malformed JSON: nested too deeply"
                continue
            yield number, record if isinstance(record, dict) else "expected a JSON object"


def read_pairs(
    path: str | Path,
    categories: CategoryMap | None = None,
    image_root: str | Path | None = None,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> list[Pair]:
    """Read an STL pair file (JSON lines), validating every record.

    With `categories`, a pair whose product has no category is an error; with `image_root`, so is a
    pair whose scene or product image is missing. `on_error="skip"` drops bad records and records
    them in `report` instead of raising.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    root = Path(image_root) if image_root is not None else None
    pairs: list[Pair] = []
    for number, record in jsonl_records(path):
        if isinstance(record, str):
            _fail(report, on_error, Issue(str(path), number, record))
            continue
        missing = [key for key in ("product", "scene", "bbox") if key not in record]
        if missing:
            _fail(report, on_error, Issue(str(path), number, f"missing field(s) {missing}"))
            continue
        scene_id, product_id = record["scene"], record["product"]
        bad_id = next(
            (value for value in (scene_id, product_id) if not is_valid_id(value)),
            None,
        )
        if bad_id is not None:
            _fail(report, on_error, Issue(str(path), number, f"invalid image id {bad_id!r}"))
            continue
        try:
            bbox = validate_bbox(record["bbox"])
        except ValueError as exc:
            _fail(report, on_error, Issue(str(path), number, str(exc)))
            continue
        if categories is not None and product_id not in categories:
            _fail(report, on_error, Issue(str(path), number, f"product {product_id} has no category"))
            continue
        if root is not None:
            absent = [
                str(image)
                for image in (scene_path(root, scene_id), product_path(root, product_id))
                if not image.is_file()
            ]
            if absent:
                _fail(report, on_error, Issue(str(path), number, f"missing image(s) {absent}"))
                continue
        pairs.append(Pair(scene_id, product_id, bbox))
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> None:
    with Path(path).open("w", encoding="utf-8") as out:
        for pair in pairs:
            record = {"product": pair.product_id, "scene": pair.scene_id, "bbox": [round(v, 6) for v in pair.bbox]}
            out.write(json.dumps(record) + "\n")


def scene_path(root: str | Path, scene_id: str) -> Path:
    return Path(root) / SCENES_DIR / f"{scene_id}{IMAGE_SUFFIX}"


def product_path(root: str | Path, product_id: str) -> Path:
    return Path(root) / PRODUCTS_DIR / f"{product_id}{IMAGE_SUFFIX}"


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and _URI.match(location) is not None


def read_bytes(location: str | Path) -> bytes:
    """The bytes of an image at a local path or a URI (fsspec: s3://, gs://, https://, file://).

    A URI needs fsspec, plus the store's own package (s3fs, gcsfs, aiohttp for http); a missing file is a
    FileNotFoundError either way. A scheme fsspec does not know is a DataError, a store whose package is
    missing Unavailable: both hold for every image under the same base, so they fail the job rather than one
    image (`training.exec.executor.decode_item` lets them through).
    """
    if not is_uri(location):
        return Path(location).read_bytes()
    try:
        import fsspec  # only URIs need it: a dataset on local disk reads without it
        from fsspec.core import split_protocol
    except ImportError as exc:
        raise Unavailable(f"reading {location} needs fsspec (pip install fsspec, and s3fs/gcsfs/aiohttp for the "
                        f"store)") from exc
    protocol, _ = split_protocol(str(location))
    try:
        fsspec.get_filesystem_class(protocol)  # what fsspec.open does first, with these two errors told apart
    except ValueError:
        raise DataError(f"unknown protocol {protocol!r} in {location}") from None
    except ImportError as exc:  # fsspec's message names the package: "Install s3fs to access S3"
        raise Unavailable(f"cannot read {location}: {exc}") from exc
    with fsspec.open(str(location), "rb") as source:
        return source.read()


def _find(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root} has none of {list(names)}; is it an STL dataset directory?")


def pairs_file(root: str | Path) -> Path:
    return _find(Path(root), (PAIRS_FILE, *UPSTREAM_PAIRS_FILES))


def categories_file(root: str | Path) -> Path:
    return _find(Path(root), (CATEGORIES_FILE, *UPSTREAM_CATEGORIES_FILES))


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 over a dataset's pair file and category file: which data a head was trained on."""
    digest = hashlib.sha256()
    for path in (pairs_file(root), categories_file(root)):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


@dataclass
class STLDataset:
    """A dataset directory: its pairs, categories and images (under `root`, or under the `images` URI)."""

    root: Path
    pairs: list[Pair]
    categories: CategoryMap
    report: LoadReport
    images: str | None = None  # base URI of scenes/ and products/; None: root/images on local disk

    @classmethod
    def open(cls, root: str | Path, on_error: OnError = "raise", check_images: bool = True,
             images: str | None = None) -> STLDataset:
        """Read a dataset directory. With `images` (a URI or a folder) the image files are read from there and
        not checked at open (a remote store would cost a request per image); unreadable ones fail at use."""
        root = Path(root)
        categories = CategoryMap.from_file(categories_file(root))
        report = LoadReport()
        pairs = read_pairs(
            pairs_file(root),
            categories,
            image_root=root if check_images and images is None else None,
            on_error=on_error,
            report=report,
        )
        LOG.info("loaded %d pairs (%d skipped) and %d products from %s", len(pairs), report.skipped,
                 len(categories), root)
        return cls(root, pairs, categories, report, images)

    def scene_path(self, scene_id: str) -> Path:
        return scene_path(self.root, scene_id)

    def product_path(self, product_id: str) -> Path:
        return product_path(self.root, product_id)

    def scene_location(self, scene_id: str) -> str:
        """Where a scene image is read from: a local path, or a URI under `images` (see `read_bytes`)."""
        return self._location(SCENES_DIR, scene_id)

    def product_location(self, product_id: str) -> str:
        return self._location(PRODUCTS_DIR, product_id)

    def _location(self, folder: Path, image_id: str) -> str:
        if self.images is None:
            return str(self.root / folder / f"{image_id}{IMAGE_SUFFIX}")
        return f"{self.images.rstrip('/')}/{folder.name}/{image_id}{IMAGE_SUFFIX}"

    def catalogue(self) -> list[str]:
        """Every product id that has a category and an image, sorted: what an index is built from.

        With remote `images` every product with a category (an image that cannot be read fails at use)."""
        if self.images is not None:
            return sorted(self.categories.product_to_path)
        return [pid for pid in sorted(self.categories.product_to_path) if self.product_path(pid).is_file()]
