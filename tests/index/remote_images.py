"""A dataset's images behind a loopback HTTP server, for the builds that read them from a URI (`--images`), and
what a build publishes that depends on the image bytes, to compare two builds."""

from __future__ import annotations

import contextlib
import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from index.artifact import open_artifact
from index.catalogue import Catalogue
from index.examples import read_examples


class _Counting(SimpleHTTPRequestHandler):
    """Serves files quietly and counts the GET requests per path (`Served.requests`)."""

    requests: dict[str, int]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests[self.path] = self.requests.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_images(data: Path, store: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """Move DATA/images to `store`/stl and serve `store` on 127.0.0.1: (the URL of the images base, GET counts
    per path). With the folder gone, a build that read any image from DATA/images would fail."""
    store.mkdir(parents=True, exist_ok=True)
    shutil.move(data / "images", store / "stl")
    requests: dict[str, int] = {}
    handler = type("Handler", (_Counting,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(store)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stl", requests
    finally:
        server.shutdown()
        server.server_close()


def published(root: Path) -> dict:
    """Everything a build publishes that depends on the image bytes: ids and order, vectors, catalogue rows
    (thumbnails, dedup groups), example scenes, the catalogue fingerprint; and the products' image references."""
    artifact = open_artifact(root)
    assert artifact.catalogue_path is not None
    with Catalogue.open(artifact.catalogue_path) as catalogue:
        rows = [(row.product.id, row.category, row.row, row.group_id, row.thumbnail, row.thumbnail_type)
                for row in catalogue.rows()]
    return {
        "ids": {category: artifact.read_ids(category) for category in artifact.categories},
        "vectors": {category: artifact.read_vectors(category) for category in artifact.categories},
        "rows": rows,
        "examples": [(example, (artifact.path / example.file).read_bytes())
                     for example in read_examples(artifact.path)],
        "fingerprint": artifact.manifest.provenance.catalogue_fingerprint,
        "skipped": artifact.manifest.provenance.skipped_products,
        "images": {record["id"]: record["image"] for record in artifact.products()},
    }
