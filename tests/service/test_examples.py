"""GET /examples: the sample scenes the build ships in the version, with their pictures."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image

from index.artifact import open_artifact
from index.examples import read_examples
from service.app import create_app
from tests.service.helpers import make_settings


def test_examples_list_test_split_scenes_with_their_boxes(built) -> None:
    artifact_root = built["root"]
    shipped = read_examples(open_artifact(artifact_root).path)
    assert shipped, "the build ships examples"
    with TestClient(create_app(make_settings(artifact_root))) as client:
        answer = client.get("/examples").json()
        assert [e["id"] for e in answer["examples"]] == [e.id for e in shipped]
        first = answer["examples"][0]
        assert first["category"] == shipped[0].category and tuple(first["bbox"]) == shipped[0].bbox
        image = client.get(first["image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(image.content)).size[0] > 0
        assert client.get("/examples/999/image").status_code == 404
        assert client.get("/examples/../manifest.json/image").status_code == 404


def test_a_corrupt_examples_file_serves_no_examples_not_a_500(built, tmp_path) -> None:
    import shutil

    root = tmp_path / "artifacts"
    shutil.copytree(built["root"], root, symlinks=True)
    (open_artifact(root).path / "examples.json").write_text('[{"id": 1}]')  # found by fuzzing: a 500
    with TestClient(create_app(make_settings(root))) as client:
        answer = client.get("/examples")
        assert answer.status_code == 200 and answer.json()["examples"] == []
        assert client.get("/examples/1/image").status_code == 404
