"""Filters inside the vector search: the exact top-k among the matching products, checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.artifact import open_artifact
from index.catalogue import Catalogue
from index.filters import FilterError, matches, parse_filter
from service.images import parse_bbox
from tests.service.helpers import BAGS, SHOES, post, scene_jpeg
from tests.service.test_fallback import metric
from training.model.checkpoint import load_embedder

LABEL_KEYS = {"colour", "size"}


def allowed_ids(shop: dict, category: str, text: str | None, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Ids (in row order) of the category's products the filter lets through, in-stock default included."""
    condition = Catalogue.effective_filter(parse_filter(text, LABEL_KEYS) if text else None)
    ids = open_artifact(shop["root"]).read_ids(category)
    return [pid for pid in ids
            if pid not in exclude and (condition is None or matches(condition, shop["products"][pid]))]


def brute_force(shop: dict, category: str, query: np.ndarray, text: str | None, k: int, offset: int = 0,
                exclude: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
    """The true top-k: every matching product's stored vector scored against the query (ties: lower row)."""
    artifact = open_artifact(shop["root"])
    ids, vectors = artifact.read_ids(category), artifact.read_vectors(category)
    allowed = set(allowed_ids(shop, category, text, exclude))
    rows = [row for row, pid in enumerate(ids) if pid in allowed]
    scores = vectors[rows] @ np.asarray(query, dtype=np.float32).ravel()
    order = sorted(range(len(rows)), key=lambda i: (-float(scores[i]), rows[i]))
    return [(ids[rows[i]], float(scores[i])) for i in order][offset:offset + k]


def stored_vector(shop: dict, category: str, product_id: str) -> np.ndarray:
    artifact = open_artifact(shop["root"])
    return artifact.read_vectors(category)[artifact.read_ids(category).index(product_id)]


def assert_ranking(items: list[dict], expected: list[tuple[str, float]]) -> None:
    assert [item["product_id"] for item in items] == [pid for pid, _ in expected]
    np.testing.assert_allclose([item["score"] for item in items], [score for _, score in expected], atol=1e-5)


FILTERS = [None, "colour=red", "brand=acme AND price<=50", "NOT colour=blue OR size=s", "in_stock=false",
           'price>30 AND (colour=green OR colour="dark blue")', "brand!=nova AND NOT price<20"]


@pytest.mark.parametrize("text", FILTERS)
def test_filtered_similar_is_the_brute_force_top_k(shop_client: TestClient, shop: dict, text: str | None) -> None:
    start, k = "p0x010", 8
    params = {"k": k, "dedup": "false", **({"filter": text} if text else {})}
    response = shop_client.get(f"/products/{start}/similar", params=params)
    assert response.status_code == 200, response.text
    expected = brute_force(shop, SHOES, stored_vector(shop, SHOES, start), text, k, exclude=frozenset({start}))
    matching = allowed_ids(shop, SHOES, text, frozenset({start}))
    assert len(response.json()["items"]) == min(k, len(matching))  # never fewer than k when k match
    assert set(item["product_id"] for item in response.json()["items"]) <= set(matching)
    assert_ranking(response.json()["items"], expected)


@pytest.mark.parametrize("text", ["colour=red OR colour=black", "size=m AND price>=25"])
def test_filtered_recommend_is_the_brute_force_top_k(shop_client: TestClient, shop: dict, text: str) -> None:
    image, bbox, k = scene_jpeg(seed=21), "0.1,0.1,0.8,0.9", 6
    embedder = load_embedder(open_artifact(shop["root"]).checkpoint_path, "cpu")
    box = parse_bbox(bbox)
    query = embedder.embed_batch(embedder.transform(embedder.load_image(image, box), box)[None], "scene")[0]
    response = post(shop_client, image, category="Shoes", bbox=bbox, k=k, filter=text, dedup="false")
    assert response.status_code == 200, response.text
    assert response.json()["source"] == "embedding"
    assert_ranking(response.json()["items"], brute_force(shop, SHOES, query, text, k))


def test_pages_join_up_to_one_ranking(shop_client: TestClient) -> None:
    image = scene_jpeg(seed=5)
    whole = post(shop_client, image, k=20).json()["items"]
    pages = post(shop_client, image, k=10).json()["items"] + post(shop_client, image, k=10, offset=10).json()["items"]
    assert [(item["product_id"], item["rank"]) for item in pages] == [(item["product_id"], item["rank"])
                                                                      for item in whole]
    assert [item["rank"] for item in whole] == list(range(1, 21))
    similar = shop_client.get("/products/p0x001/similar", params={"k": 12, "filter": "size=m"}).json()["items"]
    halves = [shop_client.get("/products/p0x001/similar", params={"k": 6, "offset": offset, "filter": "size=m"})
              .json()["items"] for offset in (0, 6)]
    assert halves[0] + halves[1] == similar


def test_out_of_stock_is_left_out_unless_the_filter_mentions_it(shop_client: TestClient, shop: dict) -> None:
    items = post(shop_client, k=40, dedup="false").json()["items"]
    assert [item for item in items if item["in_stock"] is False] == []
    assert len(items) == len(allowed_ids(shop, SHOES, None))
    out = post(shop_client, k=40, filter="in_stock=false").json()["items"]
    assert out and all(item["in_stock"] is False for item in out)


def test_nothing_matching_answers_200_with_a_note(shop_client: TestClient) -> None:
    response = post(shop_client, filter="brand=nobody")
    assert response.status_code == 200
    assert response.json()["items"] == [] and "matches the filter" in response.json()["note"]
    past = post(shop_client, k=10, offset=1000)
    assert past.status_code == 200 and past.json()["items"] == [] and "past the end" in past.json()["note"]
    assert post(shop_client, k=3).json()["note"] is None


def test_bad_filters_are_400_with_position_or_known_keys(shop_client: TestClient) -> None:
    syntax = post(shop_client, filter="colour=red AND (size=m")
    assert syntax.status_code == 400 and "position 23" in syntax.json()["detail"]
    unknown = post(shop_client, filter="colour=red AND flavour=mint")
    assert unknown.status_code == 400
    assert "flavour" in unknown.json()["detail"] and "brand, colour, in_stock, price, size" in unknown.json()["detail"]
    similar = shop_client.get("/products/p0x001/similar", params={"filter": "price<<3"})
    assert similar.status_code == 400 and "position" in similar.json()["detail"]


def test_popularity_fallback_honours_the_filter(shop_client: TestClient, shop: dict) -> None:
    text = "colour=blue OR colour=green"
    body = post(shop_client, k=5, strategy="popularity", filter=text, dedup="false").json()
    assert body["source"] == "popularity"
    with Catalogue.open(open_artifact(shop["root"]).catalogue_path) as catalogue:
        records = {record.id: record for record in catalogue.by_rows(SHOES, range(32))}
    allowed = allowed_ids(shop, SHOES, text)
    expected = sorted(allowed, key=lambda pid: (-records[pid].popularity, records[pid].row))[:5]
    assert [item["product_id"] for item in body["items"]] == expected
    assert [item["score"] for item in body["items"]] == [float(records[pid].popularity) for pid in expected]


def test_filtered_requests_are_counted(shop_client: TestClient) -> None:
    def count() -> float:
        return metric(shop_client, "stl_searches_total", endpoint="recommend", filtered="true", dedup="true")

    before = count()
    post(shop_client, k=2, category=BAGS, filter="size=l")
    assert count() == before + 1


def test_the_openapi_schema_documents_filter_offset_and_dedup(shop_client: TestClient) -> None:
    schemas = shop_client.get("/openapi.json").json()["components"]["schemas"]
    form = next(schema for name, schema in schemas.items() if name.startswith("Body_recommend"))["properties"]
    assert "in_stock" in form["filter"]["description"] and "position" not in form["filter"]["description"]
    assert form["offset"]["maximum"] == 1000 and "offset 10" in form["offset"]["description"]
    assert "duplicate" in form["dedup"]["description"]
    assert {"image_url", "labels", "rank", "score"} <= set(schemas["Item"]["properties"])


FILTER_TOKENS = ["brand", "price", "in_stock", "colour", "size", "flavour", "=", "!=", "<", "<=", ">", ">=", "AND",
                 "OR", "NOT", "and", "(", ")", "red", "acme", "30", "-1.5", "1e309", "true", "false", '"dark blue"',
                 "'", '"', "\\", "", "é", "*"]


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(FILTER_TOKENS), max_size=10).map(" ".join) | st.text(max_size=24))
def test_any_filter_string_is_answered_never_a_5xx(shop_client: TestClient, shop: dict, text: str) -> None:
    response = post(shop_client, k=5, filter=text)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert "filter" in response.json()["detail"]
        return
    try:
        condition = Catalogue.effective_filter(parse_filter(text, LABEL_KEYS) if text.strip() else None)
    except FilterError as exc:  # pragma: no cover - the service accepted what the parser refuses
        raise AssertionError(f"{text!r} answered 200 but does not parse: {exc}") from exc
    for item in response.json()["items"]:
        assert condition is None or matches(condition, shop["products"][item["product_id"]])
