"""`python -m index build`: popularity counts the training split the head was trained on; dedup groups; exit codes."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import index.build
from index.artifact import list_versions, open_artifact
from index.build import build, catalogue_fingerprint
from index.build import main as build_main
from index.catalogue import Catalogue
from training.__main__ import main as training_main
from training.data.split import split_by_scene
from training.data.stl import STLDataset
from training.errors import EXIT_INPUT, EXIT_MISMATCH, EXIT_REFUSED

from .conftest import CATEGORIES, make_dataset


def _train_pair_counts(dataset: STLDataset, seed: int) -> dict[str, int]:
    return dict(Counter(pair.product_id for pair in split_by_scene(dataset.pairs, seed=seed).train))


def test_popularity_counts_the_split_of_a_model_trained_with_another_split_seed(tmp_path: Path) -> None:
    # The real train command writes the checkpoint; the build must read its split seed from there.
    data = make_dataset(tmp_path / "data", scenes=40)
    model_dir = tmp_path / "model"
    assert training_main(["train", "--data", str(data), "--out", str(model_dir), "--cache", str(tmp_path / "cache"),
                          "--backbone", "tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "16",
                          "--hidden-dim", "32", "--dim", "16", "--workers", "0", "--no-progress",
                          "--split-seed", "3"]) == 0
    root = tmp_path / "artifacts"
    build(data, model_dir / "head.pt", root, device="cpu", workers=0, progress=False)

    dataset = STLDataset.open(data)
    expected, other = _train_pair_counts(dataset, 3), _train_pair_counts(dataset, 0)
    assert expected != other  # the two splits differ, so the check below can tell them apart
    artifact = open_artifact(root)
    popularity = artifact.popularity
    assert {pid: popularity.count(pid) for pid in dataset.categories.product_to_path
            if popularity.count(pid)} == expected
    split = artifact.manifest.provenance.split
    assert split is not None and split.seed == 3 and split.train_pairs == sum(expected.values())


def test_catalogue_fingerprint_changes_with_an_image(dataset_dir: Path) -> None:
    dataset = STLDataset.open(dataset_dir)
    catalogue = dataset.catalogue()
    before = catalogue_fingerprint(dataset, catalogue)
    assert before == catalogue_fingerprint(dataset, catalogue) and len(before) == 64
    image = dataset.product_path(catalogue[0])
    image.write_bytes(image.read_bytes() + b"\0")
    assert catalogue_fingerprint(dataset, catalogue) != before


def _args(data: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
            "--workers", "0", "--no-progress", *extra]


def test_build_cli_exit_codes(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    assert build_main(_args(dataset_dir, checkpoint_path, out, "--keep", "0")) == EXIT_INPUT
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    assert build_main(_args(dataset_dir, not_a_checkpoint, out)) == EXIT_MISMATCH
    assert "not a readable head checkpoint" in capsys.readouterr().err
    empty = make_dataset(tmp_path / "empty", categories={"Apparel & Accessories|Shoes": 2}, scenes=2)
    for image in (empty / "images" / "products").iterdir():
        image.unlink()
    assert build_main(_args(empty, checkpoint_path, out)) == EXIT_REFUSED
    assert "nothing to index" in capsys.readouterr().err
    assert list_versions(out) == []
    assert build_main(_args(dataset_dir, checkpoint_path, out)) == 0
    assert open_artifact(out).categories == CATEGORIES


def test_build_cli_lets_a_bug_keep_its_traceback(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(index.build, "embed_catalogue", broken)
    with pytest.raises(ZeroDivisionError):
        build_main(_args(dataset_dir, checkpoint_path, tmp_path / "art"))


def _groups(root: Path) -> dict[str, str]:
    artifact = open_artifact(root)
    assert artifact.catalogue_path is not None
    with Catalogue.open(artifact.catalogue_path) as catalogue:
        return {row.product.id: row.group_id for row in catalogue.rows()}  # type: ignore[misc]


def test_build_groups_duplicates_per_category(tmp_path: Path, checkpoint_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    images = data / "images" / "products"
    shutil.copyfile(images / "p0x001.jpg", images / "p0x000.jpg")  # the same file listed twice
    with Image.open(images / "p0x003.jpg") as picture:  # a re-encoded copy: other bytes, nearly the same vector
        picture.save(images / "p0x002.jpg", "JPEG", quality=60)

    build(data, checkpoint_path, tmp_path / "digest", device="cpu", workers=0, progress=False,
          duplicate_threshold=0.0)  # image rule only
    groups = _groups(tmp_path / "digest")
    popularity = open_artifact(tmp_path / "digest").popularity
    leader = min(["p0x000", "p0x001"], key=lambda pid: (-popularity.count(pid), pid))
    assert groups["p0x000"] == groups["p0x001"] == leader
    assert all(group == pid for pid, group in groups.items() if pid not in {"p0x000", "p0x001"})

    # The tiny random head puts every pair of products above 0.997: only a threshold above that tells copies.
    assert build_main(_args(data, checkpoint_path, tmp_path / "vectors", "--duplicate-threshold", "0.99999")) == 0
    groups = _groups(tmp_path / "vectors")
    assert groups["p0x000"] == groups["p0x001"] and groups["p0x002"] == groups["p0x003"] != groups["p0x000"]
    assert len(set(groups.values())) == len(groups) - 2


def test_build_ships_test_split_examples_and_edits_carry_them(tmp_path: Path, checkpoint_path: Path) -> None:
    from index.examples import read_examples
    from index.remove import remove_products
    from training.data.split import split_by_scene
    from training.data.stl import STLDataset

    data = make_dataset(tmp_path / "data")
    build(data, checkpoint_path, tmp_path / "art", device="cpu", workers=0, progress=False, examples=5)
    artifact = open_artifact(tmp_path / "art")
    examples = read_examples(artifact.path)
    dataset = STLDataset.open(data)
    test_scenes = {pair.scene_id for pair in split_by_scene(dataset.pairs, seed=0).test}
    assert 0 < len(examples) <= 5 and len({e.scene_id for e in examples}) == len(examples)
    assert all(e.scene_id in test_scenes for e in examples)  # never a scene the head was trained on
    assert all(e.category == dataset.categories.of(e.product_id) for e in examples)
    assert artifact.check_files() == []  # the example files are covered by the manifest's checksums
    kept = next(pid for pid in dataset.catalogue() if pid not in {e.product_id for e in examples})
    remove_products(tmp_path / "art", [kept])
    assert read_examples(open_artifact(tmp_path / "art").path) == examples
