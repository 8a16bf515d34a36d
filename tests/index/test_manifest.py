"""The typed manifest: old manifest.json files still open and write back unchanged; bad ones fail loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from index.artifact import open_artifact
from index.errors import ArtifactError, CorruptArtifact
from index.manifest import (
    MANIFEST_FILE,
    CategoryEntry,
    Change,
    Manifest,
    Provenance,
    SplitRecord,
    read_manifest,
    write_manifest,
)

SHOES = "Apparel & Accessories|Shoes"
HEAD, WEIGHTS = "038443a99271440529269588b90b40ba7d88ae0bb169809c168a4ce622e8e5ff", "ba6c" * 16
PREPROCESS = '{"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "context": 0.1, "jpeg_draft": false}'
# A manifest.json as the writer before the typed manifest wrote it (one category of `index build` on the
# tiny dataset; hashes shortened), key order included.
OLD_BUILD_MANIFEST = f"""{{
 "format_version": 1, "version": "20261201T094638.915913Z-5aa27730", "created_at": "2026-12-01T09:46:38+00:00",
 "backbone": "tiny", "backbone_weights_sha256": "{WEIGHTS}", "preprocess": {PREPROCESS},
 "head_sha256": "{HEAD}", "checkpoint_file": "model.pt", "dim": 16, "metric": "inner_product",
 "embedder": {{"backbone": "tiny", "backbone_weights_sha256": "{WEIGHTS}", "preprocess": {PREPROCESS},
              "head_sha256": "{HEAD}", "dim": 16, "metric": "inner_product"}},
 "exact_threshold": 50000, "approximate": "ivf", "product_count": 3,
 "categories": {{"{SHOES}": {{
   "slug": "apparel-accessories-shoes-f5ecf0", "index_file": "apparel-accessories-shoes-f5ecf0.faiss",
   "ids_file": "apparel-accessories-shoes-f5ecf0.ids.json",
   "vectors_file": "apparel-accessories-shoes-f5ecf0.vectors.npy", "count": 3, "kind": "exact",
   "factory": "Flat", "search_params": {{}}, "tuning_recall_at_50": 1.0}}}},
 "operation": "build", "parent_version": null, "data_root": "/data/synth",
 "data_fingerprint": "0c122e7c446ce5046ebd4656e69cadb7b321c8b9284184253c51b396018fe25c",
 "checkpoint_source": "/runs/demo/model/head.pt", "checkpoint_source_sha256": "{HEAD}",
 "split": {{"fractions": [0.8, 0.1, 0.1], "seed": 0, "train_pairs": 6}},
 "skipped_products": [], "device": "cpu", "embed_seconds": 0.017, "embed_products_per_second": 289.46,
 "index_seconds": 0.005, "build_seconds": 0.422,
 "files": {{"apparel-accessories-shoes-f5ecf0.faiss": "bf15", "apparel-accessories-shoes-f5ecf0.ids.json": "b862",
           "apparel-accessories-shoes-f5ecf0.vectors.npy": "0ef1", "model.pt": "{HEAD}",
           "popularity.json": "480a", "products.json": "e317"}}
}}"""


def _old_build() -> dict:
    return json.loads(OLD_BUILD_MANIFEST)


def _old_remove() -> dict:
    """What the old `index remove` wrote: the build's inputs inherited, no measurements, a change."""
    raw = _old_build()
    for key in ("skipped_products", "device", "embed_seconds", "embed_products_per_second"):
        del raw[key]
    index_seconds, build_seconds, files = raw.pop("index_seconds"), raw.pop("build_seconds"), raw.pop("files")
    raw.update({"operation": "remove", "parent_version": "20261201T094600.000000Z-00000000",
                "change": {"operation": "remove", "ids": ["p0x003"]}, "index_seconds": index_seconds,
                "build_seconds": build_seconds, "files": files})
    return raw


@pytest.mark.parametrize("old", [_old_build(), _old_remove()], ids=["build", "remove"])
def test_old_manifest_opens_and_writes_back_unchanged(old: dict, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(old))
    manifest = read_manifest(tmp_path / MANIFEST_FILE)
    assert manifest.version == "20261201T094638.915913Z-5aa27730"
    assert manifest.embedder.head_sha256 == HEAD and manifest.embedder.dim == 16
    assert manifest.categories[SHOES] == CategoryEntry.named("apparel-accessories-shoes-f5ecf0", 3,
                                                             manifest.categories[SHOES].spec, 1.0)
    assert manifest.provenance.split == SplitRecord((0.8, 0.1, 0.1), 0, 6)
    assert manifest.provenance.catalogue_fingerprint == old["data_fingerprint"]
    assert manifest.export is None and manifest.provenance.embed_runtime is None  # built before issue 14
    # Same keys, same order, same values: an edit of an old version writes what the old code wrote.
    written = tmp_path / "again.json"
    write_manifest(written, manifest)
    again = json.loads(written.read_text())
    assert again == old and list(again) == list(old)
    assert read_manifest(written) == manifest


def test_old_remove_manifest_keeps_its_change_and_parent() -> None:
    provenance = Manifest.from_dict(_old_remove()).provenance
    assert provenance.operation == "remove" and provenance.parent_version == "20261201T094600.000000Z-00000000"
    assert provenance.change == Change("remove", ["p0x003"]) and provenance.device is None


# Keys added since: the runtime that embedded the catalogue (issue 14) and the exported model's record.
NEW_KEYS = ("embed_runtime", "export")


def test_the_writer_writes_the_old_keys_in_the_old_order(artifacts: Path) -> None:
    written = json.loads((open_artifact(artifacts).path / MANIFEST_FILE).read_text())
    assert [key for key in written if key not in NEW_KEYS] == list(_old_build())
    assert set(NEW_KEYS) <= set(written)
    shoes = written["categories"][SHOES]
    assert list(shoes) == list(_old_build()["categories"][SHOES])
    assert written["embedder"] == {key: written[key] for key in written["embedder"]}


def test_derive_inherits_the_build_inputs() -> None:
    build = Manifest.from_dict(_old_build()).provenance
    derived = build.derive("parent", Change("add", ["n1"]))
    assert derived == Provenance("add", "parent", build.data_root, build.catalogue_fingerprint,
                                 build.checkpoint_source, build.checkpoint_source_sha256, build.split,
                                 change=Change("add", ["n1"]))
    assert derived.to_dict()["change"] == {"operation": "add", "ids": ["n1"]}
    assert "device" not in derived.to_dict() and derived.to_dict()["parent_version"] == "parent"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda m: m.pop("version"), "lacks the field 'version'"),
        (lambda m: m.update(format_version=2), "not an index manifest of format 1"),
        (lambda m: m.update(dim=32), "top-level 'dim' 32 contradicts"),
        (lambda m: m["embedder"].pop("head_sha256"), "embedder lacks the field 'head_sha256'"),
        (lambda m: m["categories"][SHOES].update(count="3"), "'count' should be an integer"),
        (lambda m: m["categories"][SHOES].update(kind="fuzzy"), "'kind' should be one of"),
        (lambda m: m.update(approximate="lsh"), "'approximate' should be one of"),
        (lambda m: m["split"].update(fractions=[0.9, 0.1]), "'fractions' should be three numbers"),
        (lambda m: m.update(files=["model.pt"]), "'files' should be an object"),
    ],
)
def test_a_bad_manifest_fails_loudly(spoil, message: str) -> None:
    raw = _old_build()
    spoil(raw)
    with pytest.raises(CorruptArtifact, match=message):
        Manifest.from_dict(raw)


def test_unreadable_or_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(CorruptArtifact, match="is missing"):
        read_manifest(tmp_path / MANIFEST_FILE)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2")
    with pytest.raises(CorruptArtifact, match="is unreadable"):
        read_manifest(tmp_path / MANIFEST_FILE)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected an object"):
        read_manifest(tmp_path / MANIFEST_FILE)


def test_round_trip_of_a_built_manifest(artifacts: Path, tmp_path: Path) -> None:
    manifest = open_artifact(artifacts).manifest
    write_manifest(tmp_path / MANIFEST_FILE, manifest)
    assert read_manifest(tmp_path / MANIFEST_FILE) == manifest
    assert manifest.provenance.operation == "build" and manifest.provenance.skipped_products == []
