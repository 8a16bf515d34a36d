"""Incremental add/remove: new versions include/exclude products; bad requests publish nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import index.remove
from index.add import main as add_main
from index.artifact import current_version, list_versions, open_artifact
from index.build import build
from index.remove import main as remove_main
from training.errors import EXIT_INPUT, EXIT_MISMATCH
from training.model.checkpoint import load_embedder

from .conftest import draw_image, make_checkpoint

SHOES = "Apparel & Accessories|Shoes"


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
    ],
)
def test_bad_add_publishes_nothing(artifacts: Path, tmp_path: Path, args: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "ok.jpg"
    draw_image(image, np.random.default_rng(0))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths = {"img": image, "missing": tmp_path / "missing.jpg", "broken": tmp_path / "broken.jpg"}
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
