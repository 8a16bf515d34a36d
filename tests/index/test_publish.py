"""Atomic publishing: failed or killed builds never disturb the published version; pruning keeps current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import index.publish
import index.writer
from index.artifact import CURRENT_LINK, ArtifactError, current_version, list_versions, open_artifact
from index.build import build
from index.publish import prune, switch_current


def _build(data: Path, checkpoint: Path, root: Path, **kwargs) -> str:
    return build(data, checkpoint, root, device="cpu", workers=0, progress=False, **kwargs)


def test_build_failing_in_the_last_category_leaves_current_intact(
    artifacts: Path, dataset_dir: Path, checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = current_version(artifacts)
    real = index.writer.write_category

    def dies_on_shoes(staging, data, *args, **kwargs):
        if data.category.endswith("Shoes"):  # sorted last: two categories already written
            raise KeyboardInterrupt("killed")
        return real(staging, data, *args, **kwargs)

    monkeypatch.setattr(index.writer, "write_category", dies_on_shoes)
    with pytest.raises(KeyboardInterrupt):
        _build(dataset_dir, checkpoint_path, artifacts)
    leftovers = [p.name for p in artifacts.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers  # the half-written staging dir is removed on the way out, never moved under versions/
    assert current_version(artifacts) == before and list_versions(artifacts) == [before]
    assert sum(i.size for i in open_artifact(artifacts).load_indexes().values()) == 21

    monkeypatch.setattr(index.writer, "write_category", real)
    after = _build(dataset_dir, checkpoint_path, artifacts)
    assert after != before and current_version(artifacts) == after
    assert not [p for p in artifacts.iterdir() if p.name.startswith(".tmp-")]  # cleaned by the next build


def test_killed_between_rename_and_switch_keeps_serving_the_old_version(
    artifacts: Path, dataset_dir: Path, checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = current_version(artifacts)

    def killed(root: Path, version: str) -> None:
        raise SystemExit("killed before the link switch")

    monkeypatch.setattr(index.publish, "switch_current", killed)
    with pytest.raises(SystemExit):
        _build(dataset_dir, checkpoint_path, artifacts)
    assert current_version(artifacts) == before and len(list_versions(artifacts)) == 2
    assert open_artifact(artifacts).version == before


def test_staged_version_that_fails_its_check_is_not_published(
    artifacts: Path, dataset_dir: Path, checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = current_version(artifacts)
    real = index.writer.write_json_atomic

    def drops_a_product(path: Path, payload: object, indent: int | None = 2) -> None:
        if path.name == "products.json":
            payload = payload[1:]  # type: ignore[index]
        real(path, payload, indent)

    monkeypatch.setattr(index.writer, "write_json_atomic", drops_a_product)
    with pytest.raises(ArtifactError, match="products.json lists 20 products"):
        _build(dataset_dir, checkpoint_path, artifacts)
    assert current_version(artifacts) == before and list_versions(artifacts) == [before]


def test_switch_is_a_relative_symlink(artifacts: Path) -> None:
    link = artifacts / CURRENT_LINK
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert not [p for p in artifacts.iterdir() if p.name.startswith(".current-")]


def test_prune_keeps_newest_and_never_current(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path) -> None:
    root = tmp_path / "art"
    versions = [_build(dataset_dir, checkpoint_path, root, keep=2) for _ in range(3)]
    assert list_versions(root) == versions[1:] and current_version(root) == versions[2]
    # Roll back to the oldest kept version, then prune to one: the current (older) one must survive.
    switch_current(root, versions[1])
    assert prune(root, keep=1) == []  # the newest is kept by count, the current by rule
    assert list_versions(root) == versions[1:]
    _build(dataset_dir, checkpoint_path, root, keep=1)
    assert len(list_versions(root)) == 1 and open_artifact(root).version == list_versions(root)[0]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        prune(root, keep=0)


def test_concurrent_build_is_refused(artifacts: Path, dataset_dir: Path, checkpoint_path: Path) -> None:
    with index.publish.build_lock(artifacts):
        with pytest.raises(ArtifactError, match="another index build"):
            _build(dataset_dir, checkpoint_path, artifacts)


def test_a_root_that_cannot_be_written_is_refused_before_anything_is_done(tmp_path: Path) -> None:
    in_the_way = tmp_path / "root"
    in_the_way.write_text("a file where the artifact root should be")
    with pytest.raises(ArtifactError, match="cannot write to the artifact root .* not a directory"):
        with index.publish.build_lock(in_the_way):
            pass
    assert in_the_way.read_text() == "a file where the artifact root should be"


def test_a_publish_that_cannot_rename_is_refused_and_leaves_nothing_behind(
    artifacts: Path, dataset_dir: Path, checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # versions/ not writable (as root, chmod does not stop us: the rename is made to fail instead)
    before = current_version(artifacts)
    real = os.rename

    def refuses_versions(source, target, *args, **kwargs):
        if Path(target).parent.name == "versions":
            raise PermissionError(13, "Permission denied", str(source), None, str(target))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(index.publish.os, "rename", refuses_versions)
    with pytest.raises(ArtifactError, match="cannot publish into .*versions: Permission denied; nothing was published"):
        _build(dataset_dir, checkpoint_path, artifacts)
    assert current_version(artifacts) == before and list_versions(artifacts) == [before]
    assert not [p for p in artifacts.iterdir() if p.name.startswith(".tmp-")]
