import json
from pathlib import Path

import pytest
from PIL import Image

from training.data.stl import (
    CategoryMap,
    LoadReport,
    Pair,
    STLDataset,
    STLFormatError,
    dataset_fingerprint,
    read_bytes,
    read_pairs,
    validate_bbox,
    write_pairs,
)
from training.errors import DataError, Unavailable

SHOE = "a" * 32
PANTS = "b" * 32
SCENE = "c" * 32
CATEGORIES = {SHOE: "Apparel & Accessories|Shoes", PANTS: "Apparel & Accessories|Clothing|Pants"}


def _line(product: str = SHOE, scene: str = SCENE, bbox: object = (0.1, 0.2, 0.5, 0.9)) -> str:
    return json.dumps({"product": product, "scene": scene, "bbox": list(bbox) if isinstance(bbox, tuple) else bbox})


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bbox", "message"),
    [
        ([0.1, 0.2, 0.5], "4 numbers"),
        ([0.1, 0.2, 0.5, 1.2], "[0, 1]"),
        ([0.5, 0.2, 0.5, 0.9], "left"),
        ([0.1, 0.9, 0.5, 0.2], "top"),
        ([0.1, "x", 0.5, 0.9], "numbers"),
        ([0.1, float("nan"), 0.5, 0.9], "finite"),
    ],
)
def test_validate_bbox_rejects(bbox: list, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_bbox(bbox)


def test_validate_bbox_accepts_corner_format() -> None:
    assert validate_bbox([0.434097, 0.859363, 0.560254, 1.0]) == (0.434097, 0.859363, 0.560254, 1.0)


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", [_line(), "{not json", _line(bbox=[0.6, 0.2, 0.5, 0.9])])
    with pytest.raises(STLFormatError, match=r"pairs\.jsonl:2: malformed JSON"):
        read_pairs(pairs)


def test_skip_mode_counts_every_bad_record(tmp_path: Path) -> None:
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [
            _line(),
            "{not json",
            _line(bbox=[0.6, 0.2, 0.5, 0.9]),
            _line(product="d" * 32),  # no category
            json.dumps({"product": SHOE, "scene": SCENE}),  # no bbox
            _line(product=PANTS, bbox=[0.0, 0.0, 1.0, 1.0]),
        ],
    )
    report = LoadReport()
    loaded = read_pairs(pairs, CategoryMap(CATEGORIES), on_error="skip", report=report)
    assert [pair.product_id for pair in loaded] == [SHOE, PANTS]
    assert [issue.line for issue in report.issues] == [2, 3, 4, 5]
    assert "has no category" in report.issues[2].message
    assert "missing field" in report.issues[3].message


def test_a_line_that_is_not_utf8_names_file_line_and_byte(tmp_path: Path) -> None:
    # The fuzzer's case: a Latin-1 byte in one record was a UnicodeDecodeError traceback with no line.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(f"{_line()}\n".encode() + b'{"product": "caf\xe9"}\n' + f"{_line(product=PANTS)}\n".encode())
    with pytest.raises(STLFormatError, match=r"pairs\.jsonl:2: not UTF-8 text \(byte 0xe9 at position 16\)"):
        read_pairs(pairs)
    report = LoadReport()  # a bad line like any other: skip mode drops it and keeps reading
    assert [pair.product_id for pair in read_pairs(pairs, on_error="skip", report=report)] == [SHOE, PANTS]
    assert [issue.line for issue in report.issues] == [2]


def test_json_nested_too_deeply_is_malformed(tmp_path: Path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", [_line(), "[" * 100_000])  # json.loads: RecursionError
    with pytest.raises(STLFormatError, match=r"pairs\.jsonl:2: malformed JSON: nested too deeply"):
        read_pairs(pairs)


def test_category_file_not_utf8_or_nested_too_deeply(tmp_path: Path) -> None:
    path = tmp_path / "categories.json"
    path.write_bytes(b'{"' + SHOE.encode() + b'":\n  "Sho\xe9s"}')
    with pytest.raises(STLFormatError, match=r"categories\.json:2: not UTF-8 text \(byte 0xe9 at position 6\)"):
        CategoryMap.from_file(path)
    path.write_text("[" * 100_000)
    with pytest.raises(STLFormatError, match=r"categories\.json: not valid JSON \(nested too deeply\)"):
        CategoryMap.from_file(path)


def test_category_file_ids_that_are_no_file_names_are_refused(tmp_path: Path) -> None:
    # Found by fuzzing: index build read images/products/../../../x.jpg for the id "../../../x".
    path = tmp_path / "categories.json"
    for bad in ("../../../in/img", "a b", "x" * 129):
        path.write_text(json.dumps({SHOE: "Apparel & Accessories|Shoes", bad: "Apparel & Accessories|Shoes"}))
        with pytest.raises(STLFormatError, match=r"categories\.json:1: invalid product id"):
            CategoryMap.from_file(path)


def test_read_bytes_unknown_protocol_and_missing_store_package(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = pytest.importorskip("fsspec.registry")  # an optional package: URIs only
    with pytest.raises(DataError, match=r"unknown protocol 'nope' in nope://bucket/a\.jpg"):
        read_bytes("nope://bucket/a.jpg")
    # A store fsspec knows whose package is not installed (as s3:// without s3fs): its install hint, exit 3.
    monkeypatch.setitem(registry.known_implementations, "stlmissing",
                        {"class": "stl_no_such_package.FileSystem", "err": "Install stl-no-such-package"})
    with pytest.raises(Unavailable, match=r"stlmissing://bucket/a\.jpg: Install stl-no-such-package"):
        read_bytes("stlmissing://bucket/a.jpg")


def test_missing_image_is_reported(tmp_path: Path) -> None:
    (tmp_path / "images/scenes").mkdir(parents=True)
    (tmp_path / "images/products").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / f"images/scenes/{SCENE}.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / f"images/products/{SHOE}.jpg")
    pairs = _write(tmp_path / "pairs.jsonl", [_line(), _line(product=PANTS)])
    with pytest.raises(STLFormatError, match=r":2: missing image"):
        read_pairs(pairs, CategoryMap(CATEGORIES), image_root=tmp_path)


def test_category_names_short_and_full() -> None:
    categories = CategoryMap(CATEGORIES)
    assert categories.resolve("Shoes") == "Apparel & Accessories|Shoes"
    assert categories.resolve("Apparel & Accessories|Clothing|Pants") == "Apparel & Accessories|Clothing|Pants"
    assert categories.products_in("Pants") == [PANTS]
    with pytest.raises(KeyError, match="known categories"):
        categories.resolve("Hats")


def test_nested_paths_need_the_full_path() -> None:
    categories = CategoryMap({SHOE: "Home|Decor", PANTS: "Garden|Decor"})
    with pytest.raises(KeyError, match="ambiguous"):
        categories.resolve("Decor")
    assert categories.resolve("Garden|Decor") == "Garden|Decor"


def test_dataset_round_trip_and_upstream_names(tmp_path: Path) -> None:
    written = [Pair(SCENE, SHOE, (0.1, 0.2, 0.5, 0.9)), Pair(SCENE, PANTS, (0.2, 0.5, 0.8, 1.0))]
    write_pairs(tmp_path / "fashion.json", written)
    CategoryMap(CATEGORIES).write(tmp_path / "fashion-cat.json")
    dataset = STLDataset.open(tmp_path, check_images=False)
    assert dataset.pairs == written
    assert dataset.categories.of(PANTS) == "Apparel & Accessories|Clothing|Pants"


def test_real_stl_category_file_loads() -> None:
    real = Path(__file__).resolve().parents[4] / "shared" / "stl" / "fashion-cat.json"
    if not real.is_file():
        pytest.skip(f"real STL category file not present at {real}")
    categories = CategoryMap.from_file(real)
    assert len(categories) == 38111
    assert len(categories.paths) == 10
    assert len(categories.products_in("Shoes")) == 11780


def test_dataset_fingerprint_changes_with_either_file(tmp_path) -> None:
    pairs, categories = tmp_path / "pairs.jsonl", tmp_path / "categories.json"
    pairs.write_text('{"a": 1}\n')
    categories.write_text("{}")
    first = dataset_fingerprint(tmp_path)
    assert first == dataset_fingerprint(tmp_path)
    categories.write_text('{"p": "A|B"}')
    assert dataset_fingerprint(tmp_path) != first
    pairs.write_text('{"a": 2}\n')
    assert dataset_fingerprint(tmp_path) not in {first}
