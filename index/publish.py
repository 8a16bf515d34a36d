"""Atomic publishing of artifact versions: stage, check, rename, switch `current`, prune.

Every step that changes what a reader sees is a single rename (directory into versions/, symlink onto
`current`), so a build killed at any moment leaves the previous version published and servable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from index.artifact import CURRENT_LINK, PRODUCTS_FILE, Artifact, current_version, list_versions, versions_dir
from index.errors import ArtifactMissing, CorruptArtifact, Refused

LOG = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LINK_PREFIX = ".current-"
LOCK_FILE = ".lock"
DEFAULT_KEEP = 3
SELF_QUERY_K = 20
SELF_QUERIES = 3


@contextmanager
def build_lock(root: Path, create: bool = True) -> Iterator[None]:
    """One writer at a time per artifact root; the OS drops the lock when a killed build's process dies.
    Refused (nothing written) when the root cannot be written: a file in its place, no permission. An edit
    (`create` false) needs the root to exist: ArtifactMissing, rather than an empty root left behind."""
    if not create and not root.is_dir():
        raise ArtifactMissing(f"no artifact root at {root} (nothing to edit); run `python -m index build` first")
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = (root / LOCK_FILE).open("a")
    except OSError as exc:
        problem = ("exists and is not a directory" if root.exists() and not root.is_dir()
                   else exc.strerror or str(exc))
        raise Refused(f"cannot write to the artifact root {root}: {problem}") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"another index build is writing to {root}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def staging_dir(root: Path, version: str) -> Path:
    return root / f"{STAGING_PREFIX}{version}"


@contextmanager
def staged(root: Path, version: str) -> Iterator[Path]:
    """The staging dir of `version`, removed on the way out: published, it was renamed away; failed, it leaves
    nothing half-written behind (`current` still names the old version). A killed process cannot get here:
    the next build's or edit's clean_stale removes its leftovers."""
    staging = staging_dir(root, version)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def clean_stale(root: Path) -> list[str]:
    """Remove what killed builds left behind (staging dirs, half-pruned versions, temp links)."""
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        elif entry.name.startswith(LINK_PREFIX) and entry.is_symlink():
            entry.unlink()
            removed.append(entry.name)
    if removed:
        LOG.info("cleaned up after earlier failed builds: %s", removed)
    return removed


def check_staged(path: Path) -> Artifact:
    """Open a staged version and prove it servable: files match their sha256, counts agree, and a few of
    each category's own vectors find themselves among their top results."""
    artifact = Artifact.from_dir(path)
    problems = artifact.check_files()
    if problems:
        raise CorruptArtifact(f"staged version {artifact.version} is incomplete: " + "; ".join(problems))
    products = artifact.products()
    if len(products) != sum(artifact.categories.values()) or artifact.manifest.product_count != len(products):
        raise CorruptArtifact(f"staged version {artifact.version}: {PRODUCTS_FILE} lists {len(products)} products, "
                            f"the categories hold {sum(artifact.categories.values())}")
    indexes = artifact.load_indexes(verify_checksums=False)  # just verified above
    rng = np.random.default_rng(0)
    for category, index in indexes.items():
        vectors = artifact.read_vectors(category)
        for row in rng.choice(index.size, size=min(SELF_QUERIES, index.size), replace=False):
            hits = index.search(vectors[row], SELF_QUERY_K)[0]
            own_score = float(vectors[row] @ vectors[row])
            found = any(pid == index.product_ids[row] for pid, _ in hits)
            # Identical images give identical vectors: a tie at the top is as good as finding itself.
            tied = bool(hits) and hits[-1][1] >= own_score - 1e-4
            if not (found or tied):
                raise CorruptArtifact(f"staged version {artifact.version}: category {category!r} does not find "
                                    f"product {index.product_ids[row]} with its own vector")
    return artifact


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def switch_current(root: Path, version: str) -> None:
    """Point `current` at versions/<version> with one rename of a fresh symlink over the old one."""
    temporary = root / f"{LINK_PREFIX}{version}"
    if temporary.is_symlink():
        temporary.unlink()
    # Relative target: the artifact root can be moved or mounted elsewhere (docker volumes).
    temporary.symlink_to(Path("versions") / version)
    os.replace(temporary, root / CURRENT_LINK)
    _fsync_dir(root)


def prune(root: Path, keep: int = DEFAULT_KEEP) -> list[str]:
    """Delete all but the newest `keep` versions, never the current one; returns what was deleted."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    current = current_version(root)
    versions = list_versions(root)
    doomed = [version for version in versions[:-keep] if version != current]
    for version in doomed:
        # Rename first: a prune killed mid-delete leaves a .trash dir (cleaned later), never a half version.
        trash = root / f"{TRASH_PREFIX}{version}"
        os.rename(versions_dir(root) / version, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        LOG.info("pruned old versions %s", doomed)
    return doomed


def publish(root: Path, staging: Path, keep: int = DEFAULT_KEEP) -> Artifact:
    """Check the staged version, move it into versions/, make it current, prune old ones."""
    artifact = check_staged(staging)
    target = versions_dir(root) / artifact.version
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise Refused(f"version {artifact.version} already exists under {root}")
    _fsync_dir(staging)
    try:
        os.rename(staging, target)
    except OSError as exc:  # e.g. versions/ not writable: the published version is untouched
        raise Refused(f"cannot publish into {target.parent}: {exc.strerror or exc}; nothing was published") from None
    _fsync_dir(target.parent)
    switch_current(root, artifact.version)
    LOG.info("published index version %s (%d products in %d categories)", artifact.version,
             artifact.manifest.product_count, len(artifact.categories))
    prune(root, keep)
    return Artifact.from_dir(target)
