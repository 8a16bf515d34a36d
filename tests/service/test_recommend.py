"""The happy path: embedding search in the requested category, consistent with a direct search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.artifact import open_artifact
from service.app import create_app
from service.images import parse_bbox
from tests.service.helpers import BAGS, CATEGORIES, PANTS, SHOES, make_settings, post, scene_jpeg
from training.model.checkpoint import load_embedder


def direct_search(root: Path, image: bytes, bbox: str | None, category: str, k: int) -> list[tuple[str, float]]:
    """What the service should answer, computed without it: shared embedder + that category's index."""
    artifact = open_artifact(root)
    embedder = load_embedder(artifact.checkpoint_path, "cpu")
    box = parse_bbox(bbox)
    crop = embedder.transform(embedder.load_image(image, box), box)
    vector = embedder.embed_batch(crop[None], "scene")
    return artifact.load_indexes()[category].search(vector, k)[0]


@pytest.mark.parametrize(("name", "bbox", "k"),
                         [("Shoes", "0.1,0.2,0.7,0.9", 5), (BAGS, None, 10), ("Pants", "0,0,1,1", 3)])
def test_recommend_matches_direct_search(client: TestClient, built: dict, name: str, bbox: str | None, k: int) -> None:
    image = scene_jpeg(seed=11)
    response = post(client, image, category=name, bbox=bbox, k=k)
    assert response.status_code == 200, response.text
    body = response.json()
    full = {"Shoes": SHOES, BAGS: BAGS, "Pants": PANTS}[name]
    assert body["category"] == full
    assert body["source"] == "embedding" and body["fallback_reason"] is None
    assert body["index_version"] == open_artifact(built["root"]).version
    assert body["took_ms"] > 0
    items = body["items"]
    assert len(items) == min(k, CATEGORIES[full])
    assert [item["rank"] for item in items] == list(range(1, len(items) + 1))
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    # Every product is of the requested category (index build gives category c ids "p{c}x...").
    prefix = f"p{list(CATEGORIES).index(full)}x"
    assert all(item["product_id"].startswith(prefix) for item in items)
    expected = direct_search(built["root"], image, bbox, full, k)
    assert [item["product_id"] for item in items] == [pid for pid, _ in expected]
    np.testing.assert_allclose(scores, [score for _, score in expected], atol=1e-5)


def test_bbox_changes_the_answer(client: TestClient) -> None:
    image = scene_jpeg(seed=3)
    whole = post(client, image, k=9).json()["items"]
    corner = post(client, image, k=9, bbox="0.0,0.0,0.3,0.3").json()["items"]
    assert [i["score"] for i in whole] != [i["score"] for i in corner]


def test_png_and_webp_are_accepted(client: TestClient) -> None:
    from PIL import Image

    from tests.service.helpers import draw, encode

    picture: Image.Image = draw(np.random.default_rng(5), 80)
    for image_format in ("PNG", "WEBP"):
        response = post(client, encode(picture, image_format), k=2)
        assert response.status_code == 200, (image_format, response.text)
        assert response.json()["source"] == "embedding"


def test_categories_and_health(client: TestClient, built: dict) -> None:
    body = client.get("/categories").json()
    assert body["index_version"] == open_artifact(built["root"]).version
    listed = {c["path"]: c for c in body["categories"]}
    assert set(listed) == set(CATEGORIES)
    assert listed[SHOES]["name"] == "Shoes" and listed[SHOES]["products"] == CATEGORIES[SHOES]
    assert all(c["indexed"] for c in listed.values())
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["model_loaded"] is True
    assert ready.json()["categories"] == 3 and ready.json()["indexed_categories"] == 3


def test_openapi_documents_the_contract(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/recommend" in spec["paths"] and "/admin/reload" in spec["paths"]
    schema = spec["components"]["schemas"]["RecommendResponse"]
    assert schema["properties"]["source"]["enum"] == ["embedding", "popularity"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("inline", [True, False])
def test_crops_made_on_the_batcher_or_in_the_pool_give_the_same_answer(built: dict, inline: bool) -> None:
    image, bbox = scene_jpeg(seed=5), "0.2,0.1,0.8,0.7"
    settings = make_settings(built["root"], preprocess_inline=inline)
    with TestClient(create_app(settings)) as app:
        body = post(app, image, category="Shoes", bbox=bbox, k=4).json()
        bad = post(app, b"not an image", category="Shoes")
        tiny = post(app, image, category="Shoes", bbox="0.5,0.5,0.51,0.51")
    assert body["source"] == "embedding"
    expected = direct_search(built["root"], image, bbox, SHOES, 4)
    assert [item["product_id"] for item in body["items"]] == [pid for pid, _ in expected]
    assert bad.status_code == 400 and "not an image" in bad.json()["detail"]
    assert tiny.status_code == 400 and "too small" in tiny.json()["detail"]
