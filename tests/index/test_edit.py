"""Incremental add/remove: new versions include/exclude products; bad requests publish nothing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import index.remove
from index.add import main as add_main
from index.artifact import Artifact, current_version, list_versions, open_artifact
from index.build import build
from index.catalogue import CATALOGUE_FILE, Catalogue
from index.manifest import MANIFEST_FILE, write_manifest
from index.remove import main as remove_main
from index.verify import verify
from tests.fixtures import write_product_data
from training.errors import EXIT_INPUT, EXIT_MISMATCH
from training.model.checkpoint import load_embedder

from .conftest import draw_image, make_checkpoint

SHOES = "Apparel & Accessories|Shoes"
PANTS = "Apparel & Accessories|Clothing|Pants"


def _embed(artifacts: Path, image: Path) -> np.ndarray:
    embedder = load_embedder(open_artifact(artifacts).checkpoint_path, "cpu")
    return embedder.embed([embedder.load_image(image)], None, "product")


def test_add_publishes_a_version_that_finds_the_new_products(artifacts: Path, tmp_path: Path) -> None:
    before = open_artifact(artifacts)
    rng = np.random.default_rng(7)
    first, second = tmp_path / "new1.jpg", tmp_path / "new2.png"
    draw_image(first, rng)
    draw_image(second.with_suffix(".jpg"), rng)
    (tmp_path / "more.jsonl").write_text(json.dumps({"id": "n2", "category": "Pants", "image": "new2.jpg"}) + "\n")
    assert add_main(["--artifacts", str(artifacts), "--id", "n1", "--category", "Shoes", "--image", str(first),
                     "--from", str(tmp_path / "more.jsonl"), "--device", "cpu"]) == 0
    after = open_artifact(artifacts)
    assert after.version != before.version and after.manifest.provenance.parent_version == before.version
    assert after.categories[SHOES] == before.categories[SHOES] + 1
    assert after.categories["Apparel & Accessories|Clothing|Pants"] == 8
    indexes = after.load_indexes()
    hits = indexes[SHOES].search(_embed(artifacts, first), 1)[0]
    assert hits[0][0] == "n1" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    # Old products keep their rows: each still finds itself with its stored vector.
    vectors = after.read_vectors(SHOES)
    assert [h[0][0] for h in indexes[SHOES].search(vectors, 1)] == after.read_ids(SHOES)
    assert after.read_ids(SHOES)[:-1] == before.read_ids(SHOES)
    assert "n1" in {pid for pid, _ in after.popularity.top("Shoes", 100)}
    # The untouched category was carried over byte for byte.
    bags = after.manifest.categories["Apparel & Accessories|Handbags, Wallets & Cases"]
    assert bags == before.manifest.categories["Apparel & Accessories|Handbags, Wallets & Cases"]
    # The previous version is still there and unchanged.
    assert open_artifact(artifacts, before.version).categories[SHOES] == before.categories[SHOES]


def test_remove_publishes_a_version_without_the_products(artifacts: Path) -> None:
    before = open_artifact(artifacts)
    gone = before.read_ids(SHOES)[:2]
    vectors = before.read_vectors(SHOES)[:2]
    assert remove_main(["--artifacts", str(artifacts), "--id", gone[0], "--id", gone[1]]) == 0
    after = open_artifact(artifacts)
    assert after.categories[SHOES] == before.categories[SHOES] - 2
    index = after.load_indexes()[SHOES]
    returned = {pid for row in index.search(vectors, 50) for pid, _ in row}
    assert returned and not returned & set(gone)
    assert not set(gone) & {p["id"] for p in after.products()}
    assert not set(gone) & {pid for pid, _ in after.popularity.top("Shoes", 100)}


def test_remove_and_add_keep_an_approximate_index_consistent(tmp_path: Path, dataset_dir: Path,
                                                              checkpoint_path: Path) -> None:
    root = tmp_path / "art"
    build(dataset_dir, checkpoint_path, root, device="cpu", exact_threshold=6, workers=0, progress=False)
    entry = open_artifact(root).manifest.categories[SHOES]
    assert entry.kind == "approximate" and entry.factory.startswith("IVF")
    doomed = open_artifact(root).read_ids(SHOES)[0]
    assert remove_main(["--artifacts", str(root), "--id", doomed]) == 0
    after = open_artifact(root)
    index = after.load_indexes()[SHOES]
    assert after.manifest.categories[SHOES].factory == entry.factory
    assert [row[0][0] for row in index.search(after.read_vectors(SHOES), 1)] == after.read_ids(SHOES)
    image = tmp_path / "shoe.jpg"
    draw_image(image, np.random.default_rng(3))
    assert add_main(["--artifacts", str(root), "--id", "shoe9", "--category", SHOES, "--image", str(image),
                     "--device", "cpu"]) == 0
    added = open_artifact(root)
    assert added.manifest.categories[SHOES].factory == entry.factory and added.categories[SHOES] == 9
    assert added.load_indexes()[SHOES].search(_embed(root, image), 1)[0][0][0] == "shoe9"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "n1", "--category", "Hats", "--image", "{img}"], "unknown category 'Hats'"),
        (["--id", "p0x000", "--category", "Shoes", "--image", "{img}"], "p0x000: already in the index"),
        (["--id", "n1", "--category", "Shoes", "--image", "{img}", "--id", "n1", "--category", "Shoes",
          "--image", "{img}"], "n1: given twice"),
        (["--id", "n1", "--category", "Shoes", "--image", "{missing}"], "does not exist"),
        (["--id", "bad id", "--category", "Shoes", "--image", "{img}"], "invalid id"),
        (["--id", "n1", "--category", "Shoes", "--image", "{broken}"], "unreadable image"),
        # The fuzzer's case: a Latin-1 --from file was a UnicodeDecodeError traceback.
        (["--from", "{latin1}"], "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at position 28)"),
    ],
)
def test_bad_add_publishes_nothing(artifacts: Path, tmp_path: Path, args: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "ok.jpg"
    draw_image(image, np.random.default_rng(0))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    line = json.dumps({"id": "n1", "category": "Shoes", "image": str(image)}) + "\n"
    (tmp_path / "latin1.jsonl").write_bytes(line.encode() + b'{"id": "n2", "category": "Sh\xe9es"}\n')
    paths = {"img": image, "missing": tmp_path / "missing.jpg", "broken": tmp_path / "broken.jpg",
             "latin1": tmp_path / "latin1.jsonl"}
    before = list_versions(artifacts)
    argv = ["--artifacts", str(artifacts), "--device", "cpu"] + [a.format(**paths) for a in args]
    assert add_main(argv) == 1
    assert message in capsys.readouterr().err
    assert list_versions(artifacts) == before and current_version(artifacts) == before[-1]


def test_bad_remove_publishes_nothing(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = list_versions(artifacts)
    assert remove_main(["--artifacts", str(artifacts), "--id", "p0x000", "--id", "ghost"]) == 1
    assert "unknown product id(s) ['ghost']" in capsys.readouterr().err
    assert list_versions(artifacts) == before
    assert add_main(["--artifacts", str(artifacts), "--id", "x"]) == 2


def test_add_with_another_embedder_is_a_mismatch(artifacts: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The artifact's model.pt swapped for another head: the index was built with a different embedder.
    make_checkpoint(open_artifact(artifacts).checkpoint_path, seed=5)
    image = tmp_path / "ok.jpg"
    draw_image(image, np.random.default_rng(0))
    before = list_versions(artifacts)
    assert add_main(["--artifacts", str(artifacts), "--id", "n1", "--category", "Shoes", "--image", str(image),
                     "--device", "cpu"]) == EXIT_MISMATCH
    assert "built with another embedder" in capsys.readouterr().err
    assert list_versions(artifacts) == before


def test_edit_clis_refuse_bad_arguments_and_let_bugs_raise(artifacts: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    before = list_versions(artifacts)
    assert remove_main(["--artifacts", str(artifacts), "--id", "p0x000", "--keep", "0"]) == EXIT_INPUT
    assert add_main(["--artifacts", str(artifacts), "--keep", "0"]) == EXIT_INPUT
    assert list_versions(artifacts) == before

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(index.remove, "derive", broken)
    with pytest.raises(ZeroDivisionError):
        remove_main(["--artifacts", str(artifacts), "--id", "p0x000"])


@pytest.fixture
def catalogued(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path) -> Path:
    """An artifact root whose version was built with product data (DATA/products.jsonl)."""
    write_product_data(dataset_dir)
    root = tmp_path / "catalogued"
    build(dataset_dir, checkpoint_path, root, device="cpu", workers=0, progress=False)
    return root


def _rows_match_ids(artifact: Artifact) -> None:
    """For every category, catalogue row r names the product of ids.json[r]."""
    assert artifact.catalogue_path is not None
    with Catalogue.open(artifact.catalogue_path) as catalogue:
        assert catalogue.categories() == artifact.categories
        for category in artifact.categories:
            assert catalogue.row_ids(category) == artifact.read_ids(category)
            records = catalogue.by_rows(category, range(artifact.categories[category]))
            assert [record.id for record in records] == artifact.read_ids(category)


def test_remove_renumbers_the_catalogue_rows(catalogued: Path) -> None:
    before = open_artifact(catalogued)
    with Catalogue.open(before.catalogue_path) as catalogue:  # type: ignore[arg-type]
        old = {record.id: record for c in before.categories
               for record in catalogue.by_rows(c, range(before.categories[c]))}
        thumbnails = {pid: catalogue.thumbnail(pid) for pid in old}
    gone = [before.read_ids(SHOES)[1], before.read_ids(PANTS)[0]]
    assert remove_main(["--artifacts", str(catalogued), "--id", gone[0], "--id", gone[1]]) == 0
    after = open_artifact(catalogued)
    _rows_match_ids(after)
    with Catalogue.open(after.catalogue_path) as catalogue:  # type: ignore[arg-type]
        assert len(catalogue) == len(old) - 2 and not catalogue.products(gone)
        for record in catalogue.products(set(old) - set(gone)).values():
            # Same product data, popularity and thumbnail bytes; only the row may move.
            assert record.product == old[record.id].product and record.popularity == old[record.id].popularity
            assert thumbnails[record.id] is not None and catalogue.thumbnail(record.id) == thumbnails[record.id]
    assert catalogue_row(after, SHOES, 1) == before.read_ids(SHOES)[2]  # moved up into the gap
    assert verify(catalogued).ok


def catalogue_row(artifact: Artifact, category: str, row: int) -> str:
    with Catalogue.open(artifact.catalogue_path) as catalogue:  # type: ignore[arg-type]
        return catalogue.by_rows(category, [row])[0].id


def test_add_with_products_stores_their_data_and_thumbnails(catalogued: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = open_artifact(catalogued)
    first, second = tmp_path / "n1.jpg", tmp_path / "n2.jpg"
    draw_image(first, np.random.default_rng(11))
    draw_image(second, np.random.default_rng(12))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "n1", "title": "Blue runner", "price": 55.0, "in_stock": True,
                                "labels": {"color": "blue"}}) + "\n")
    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"id": "p0x000", "title": "Not being added"}) + "\n")
    args = ["--artifacts", str(catalogued), "--device", "cpu", "--id", "n1", "--category", "Shoes", "--image",
            str(first), "--id", "n2", "--category", "Pants", "--image", str(second)]
    assert add_main([*args, "--products", str(stray)]) == 1
    assert "product data for id(s) not being added ['p0x000']" in capsys.readouterr().err
    assert list_versions(catalogued) == [before.version]

    assert add_main([*args, "--products", str(data)]) == 0
    after = open_artifact(catalogued)
    _rows_match_ids(after)
    with Catalogue.open(after.catalogue_path) as catalogue:  # type: ignore[arg-type]
        n1, n2 = catalogue.product("n1"), catalogue.product("n2")
        assert n1 is not None and n2 is not None
        assert (n1.product.title, n1.product.price, n1.product.labels) == ("Blue runner", 55.0, {"color": ("blue",)})
        assert (n1.category, n1.row, n1.popularity) == (SHOES, before.categories[SHOES], 0)
        assert n2.product.title is None and n2.row == before.categories[PANTS]  # no data: a bare row
        assert catalogue.thumbnail("n1") is not None and catalogue.thumbnail("n2") is not None
        kept = catalogue.product("p0x000")
        assert kept is not None and kept.product.title == "Product p0x000"
    assert verify(catalogued).ok


def _strip_catalogue(artifact: Artifact) -> None:
    """Make the version look as if built before catalogues existed."""
    (artifact.path / CATALOGUE_FILE).unlink()
    files = {name: sha for name, sha in artifact.manifest.files.items() if name != CATALOGUE_FILE}
    write_manifest(artifact.path / MANIFEST_FILE, replace(artifact.manifest, files=files))


def test_a_version_without_catalogue_gets_one_only_with_product_data(artifacts: Path, tmp_path: Path) -> None:
    _strip_catalogue(open_artifact(artifacts))
    assert remove_main(["--artifacts", str(artifacts), "--id", "p0x000"]) == 0
    assert open_artifact(artifacts).catalogue_path is None
    image = tmp_path / "n1.jpg"
    draw_image(image, np.random.default_rng(5))
    data = tmp_path / "data.csv"
    data.write_text("id,title,label.color\nn1,Green shoe,green\n")
    assert add_main(["--artifacts", str(artifacts), "--device", "cpu", "--id", "n1", "--category", "Shoes",
                     "--image", str(image), "--products", str(data)]) == 0
    after = open_artifact(artifacts)
    _rows_match_ids(after)
    with Catalogue.open(after.catalogue_path) as catalogue:  # type: ignore[arg-type]
        n1, old = catalogue.product("n1"), catalogue.product("p0x001")
        assert n1 is not None and n1.product.labels == {"color": ("green",)}
        # Products of the old version get bare rows with a thumbnail of their (still reachable) image.
        assert old is not None and old.product.title is None and catalogue.thumbnail("p0x001") is not None
    assert verify(artifacts).ok


def test_an_edit_of_a_root_that_does_not_exist_creates_nothing(tmp_path: Path, capsys) -> None:
    # Found by fuzzing: remove / update on a mistyped --artifacts left an empty root with a .lock behind.
    absent = tmp_path / "no-such-root"
    assert remove_main(["--artifacts", str(absent), "--id", "p0x000"]) != 0
    assert "no artifact root at" in capsys.readouterr().err
    assert not absent.exists()


def test_unknown_ids_are_named_in_one_short_line(artifacts: Path, capsys) -> None:
    # Found by fuzzing: a 100,000-character id was echoed whole.
    ids = ["x" * 100_000, *(f"nope{n}" for n in range(20))]
    assert remove_main(["--artifacts", str(artifacts), *(arg for pid in ids for arg in ("--id", pid))]) == 1
    said = capsys.readouterr().err.strip()
    assert "unknown product id(s)" in said and "(21 in all)" in said and len(said) < 400
