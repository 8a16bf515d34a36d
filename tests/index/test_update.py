"""`python -m index update`: new product data in a new version that reuses every index file; bad input and
crashes publish nothing and leave `current` where it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import index.edit
import index.writer
from index.__main__ import main as index_main
from index.artifact import Artifact, current_version, list_versions, open_artifact
from index.build import build
from index.catalogue import Catalogue
from index.publish import STAGING_PREFIX
from index.update import main as update_main
from index.verify import verify
from tests.fixtures import write_product_data
from training.errors import EXIT_INPUT, EXIT_REFUSED
from training.io import file_sha256

SHOES = "Apparel & Accessories|Shoes"


@pytest.fixture
def catalogued(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path) -> Path:
    """An artifact root whose version was built with product data (DATA/products.jsonl)."""
    write_product_data(dataset_dir)
    root = tmp_path / "catalogued"
    build(dataset_dir, checkpoint_path, root, device="cpu", workers=0, progress=False)
    return root


def _lines(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _catalogue(artifact: Artifact) -> Catalogue:
    assert artifact.catalogue_path is not None
    return Catalogue.open(artifact.catalogue_path)


def test_update_replaces_given_fields_and_reuses_every_index_file(catalogued: Path, tmp_path: Path) -> None:
    before = open_artifact(catalogued)
    with _catalogue(before) as catalogue:
        old = catalogue.products(["p0x000", "p0x001", "p1x000"])
        old_thumbnail = catalogue.thumbnail("p0x000")
    assert old["p0x000"].product.labels == {"color": ("red",)} and old_thumbnail is not None

    changes = _lines(tmp_path / "changes.jsonl",
                     {"id": "p0x000", "price": 99.5, "in_stock": False, "labels": {"size": ["42", "43"]}},
                     {"id": "p0x001", "title": "Renamed", "price": None})
    assert update_main(["--artifacts", str(catalogued), "--products", str(changes)]) == 0
    after = open_artifact(catalogued)
    assert list_versions(catalogued) == [before.version, after.version]
    with _catalogue(after) as catalogue:
        new = catalogue.products(["p0x000", "p0x001", "p1x000"])
        assert catalogue.thumbnail("p0x000") == old_thumbnail  # stored bytes carried over
        assert [catalogue.row_ids(c) for c in sorted(after.categories)] == [
            after.read_ids(c) for c in sorted(after.categories)]
    # Given fields replaced, the others kept; a label key given replaces that key only.
    assert new["p0x000"].product.price == 99.5 and new["p0x000"].product.in_stock is False
    assert new["p0x000"].product.title == old["p0x000"].product.title == "Product p0x000"
    assert new["p0x000"].product.labels == {"color": ("red",), "size": ("42", "43")}
    assert new["p0x001"].product.title == "Renamed" and new["p0x001"].product.price is None  # null clears
    assert new["p0x001"].product.currency == "EUR"
    assert new["p1x000"] == old["p1x000"]
    assert new["p0x000"].row == old["p0x000"].row and new["p0x000"].popularity == old["p0x000"].popularity

    # Every vector, id and index file and the popularity table are the parent's, byte for byte.
    assert after.manifest.categories == before.manifest.categories
    for entry in after.manifest.categories.values():
        for name in (*entry.files, "popularity.json"):
            same_inode = os.stat(after.path / name).st_ino == os.stat(before.path / name).st_ino
            assert same_inode or file_sha256(after.path / name) == file_sha256(before.path / name)
    assert after.manifest.files["catalogue.sqlite"] != before.manifest.files["catalogue.sqlite"]
    provenance = after.manifest.provenance
    assert provenance.operation == "update" and provenance.parent_version == before.version
    assert provenance.change is not None and provenance.change.ids == ["p0x000", "p0x001"]
    assert verify(catalogued).ok


def test_update_from_csv_and_clearing_labels(catalogued: Path, tmp_path: Path) -> None:
    # CSV: the header's columns are given for every row, an empty cell clears; other columns are kept.
    csv_file = tmp_path / "stock.csv"
    csv_file.write_text("id,in_stock,label.color\np0x000,yes,\np0x002,no,green|black\n")
    assert index_main(["update", "--artifacts", str(catalogued), "--products", str(csv_file)]) == 0
    # JSONL "labels": null removes every label.
    _lines(tmp_path / "x.jsonl", {"id": "p0x004", "labels": None})
    assert update_main(["--artifacts", str(catalogued), "--products", str(tmp_path / "x.jsonl")]) == 0
    with _catalogue(open_artifact(catalogued)) as catalogue:
        found = catalogue.products(["p0x000", "p0x002", "p0x004"])
    assert found["p0x000"].product.in_stock is True and found["p0x000"].product.labels == {}
    assert found["p0x000"].product.title == "Product p0x000" and found["p0x000"].product.price == 10.0
    assert found["p0x002"].product.in_stock is False
    assert found["p0x002"].product.labels == {"color": ("green", "black")}
    assert found["p0x004"].product.labels == {} and found["p0x004"].product.title == "Product p0x004"


def test_unknown_ids_and_bad_files_publish_nothing(catalogued: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = list_versions(catalogued)
    changes = _lines(tmp_path / "c.jsonl", {"id": "p0x000", "price": 1.0}, {"id": "ghost", "price": 2.0})
    assert update_main(["--artifacts", str(catalogued), "--products", str(changes)]) == EXIT_REFUSED
    assert "unknown product id(s) ['ghost']" in capsys.readouterr().err
    bad = _lines(tmp_path / "bad.jsonl", {"id": "p0x000", "price": "cheap"})
    assert update_main(["--artifacts", str(catalogued), "--products", str(bad)]) == EXIT_INPUT
    assert "bad.jsonl:1: price must be a number" in capsys.readouterr().err
    assert update_main(["--artifacts", str(catalogued), "--products", str(_lines(tmp_path / "e.jsonl"))]) == 1
    assert list_versions(catalogued) == before and current_version(catalogued) == before[-1]
    assert not [entry for entry in catalogued.iterdir() if entry.name.startswith(STAGING_PREFIX)]


@pytest.mark.parametrize(("module", "name"), [(index.writer, "write_catalogue"), (index.edit, "publish")])
def test_a_crash_mid_update_leaves_current_untouched(catalogued: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, module: object,
                                                     name: str) -> None:
    before = open_artifact(catalogued)
    staged: list[str] = []

    def crash(*args: object, **kwargs: object) -> None:
        # Staging is well under way: the indexes are already linked into the staging directory.
        staging = next(entry for entry in catalogued.iterdir() if entry.name.startswith(STAGING_PREFIX))
        staged.extend(sorted(path.name for path in staging.iterdir()))
        raise OSError("disk full")

    monkeypatch.setattr(module, name, crash)
    changes = _lines(tmp_path / "c.jsonl", {"id": "p0x000", "price": 1.0})
    with pytest.raises(OSError, match="disk full"):
        update_main(["--artifacts", str(catalogued), "--products", str(changes)])
    assert before.manifest.categories[SHOES].index_file in staged
    assert current_version(catalogued) == before.version and list_versions(catalogued) == [before.version]
    assert verify(catalogued).ok  # the old version's files are intact
    assert not [entry for entry in catalogued.iterdir() if entry.name.startswith(STAGING_PREFIX)]

    # A process killed mid-update leaves its staging dir behind: the next edit clears it, never serves it.
    monkeypatch.undo()
    (catalogued / f"{STAGING_PREFIX}killed").mkdir()
    assert update_main(["--artifacts", str(catalogued), "--products", str(changes)]) == 0
    assert not [entry for entry in catalogued.iterdir() if entry.name.startswith(STAGING_PREFIX)]
    with _catalogue(open_artifact(catalogued)) as catalogue:
        record = catalogue.product("p0x000")
    assert record is not None and record.product.price == 1.0
