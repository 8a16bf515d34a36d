"""File helpers, one of each: atomic writes (temp file beside the target, then rename) and file checksums."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; it replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp, temp.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def write_bytes_atomic(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    with atomic_path(path) as temp, temp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and indexes can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: object, indent: int | None = 2) -> None:
    """JSON (with a trailing newline) written atomically and fsynced."""
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def copy_atomic(source: str | Path, dest: str | Path) -> None:
    """Copy a file so that `dest` is either the old file or the whole new one (no-op onto itself)."""
    source, dest = Path(source), Path(dest)
    if dest.exists() and os.path.samefile(source, dest):
        return
    with atomic_path(dest) as temp:
        shutil.copyfile(source, temp)
