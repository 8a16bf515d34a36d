"""GET /examples and their pictures: the sample scenes the serving version ships (see index/examples.py).

Read from the serving version's own folder, so a hot reload switches the examples with the index.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel

from index.artifact import versions_dir
from index.errors import CorruptArtifact
from index.examples import Example, read_examples
from service.deps import EngineDep, VersionDep

LOG = logging.getLogger(__name__)

examples_router = APIRouter(tags=["examples"])

CACHE_CONTROL = "public, max-age=3600"  # an example of a version never changes


class ExampleInfo(BaseModel):
    id: str
    image_url: str
    category: str
    bbox: tuple[float, float, float, float]


class ExamplesResponse(BaseModel):
    index_version: str | None
    examples: list[ExampleInfo]


@functools.lru_cache(maxsize=8)
def _examples(folder: Path) -> dict[str, Example]:
    try:
        return {example.id: example for example in read_examples(folder)}
    except CorruptArtifact as exc:  # the page's "try an example" is a convenience: none, rather than a 500
        LOG.warning("no examples served: %s", exc)
        return {}


def _folder(engine: EngineDep, version: VersionDep) -> Path | None:
    return None if version.version is None else versions_dir(Path(engine.settings.artifacts)) / version.version


@examples_router.get("/examples", response_model=ExamplesResponse,
                     summary="Sample scenes of the catalogue (test-split photos with an item's box), for trying it out")
async def examples(engine: EngineDep, version: VersionDep) -> ExamplesResponse:
    folder = _folder(engine, version)
    found = _examples(folder) if folder is not None else {}
    return ExamplesResponse(index_version=version.version, examples=[
        ExampleInfo(id=example.id, image_url=f"/examples/{example.id}/image", category=example.category,
                    bbox=example.bbox)
        for example in found.values()
    ])


@examples_router.get("/examples/{example_id}/image", response_class=Response,
                     responses={200: {"content": {"image/jpeg": {}}}, 404: {}}, summary="An example's photo")
async def example_image(example_id: str, engine: EngineDep, version: VersionDep) -> Response:
    folder = _folder(engine, version)
    example = _examples(folder).get(example_id) if folder is not None else None
    if example is None:
        raise HTTPException(404, f"no example {example_id!r}")
    return Response((folder / example.file).read_bytes(), media_type="image/jpeg",
                    headers={"Cache-Control": CACHE_CONTROL})
