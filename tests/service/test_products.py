"""Product data in every answer, the product endpoints, facets, dedup, and versions built before catalogues."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from fastapi.testclient import TestClient

from index.artifact import open_artifact
from index.catalogue import CATALOGUE_FILE, Catalogue
from service.app import create_app
from tests.service.helpers import SHOES, SHOP_DUPLICATE, make_settings, post
from tests.service.test_filters import allowed_ids, brute_force, stored_vector

PRODUCT_FIELDS = ("title", "brand", "price", "currency", "url", "in_stock")


def test_every_item_carries_its_product_data(shop_client: TestClient, shop: dict) -> None:
    items = post(shop_client, k=10).json()["items"]
    assert len(items) == 10
    for item in items:
        product = shop["products"][item["product_id"]]
        assert [item[name] for name in PRODUCT_FIELDS] == [getattr(product, name) for name in PRODUCT_FIELDS]
        assert item["labels"] == {key: list(values) for key, values in product.labels.items()}
        assert item["image_url"] == f"/products/{product.id}/image"
    assert any(item["price"] is None for item in post(shop_client, k=40).json()["items"])  # missing stays null


def test_product_endpoint(shop_client: TestClient, shop: dict) -> None:
    body = shop_client.get("/products/p0x005").json()
    product = shop["products"]["p0x005"]
    assert body["product_id"] == "p0x005" and body["category"] == SHOES and body["title"] == product.title
    assert body["group_id"] == "p0x004"  # the duplicate picture: grouped with its more popular twin
    assert body["labels"] == {"colour": ["red"], "size": ["s", "m"]} and body["popularity"] == 0
    assert body["index_version"] == open_artifact(shop["root"]).version
    missing = shop_client.get("/products/nope")
    assert missing.status_code == 404 and "unknown product" in missing.json()["detail"]


def test_image_endpoint_with_etag_and_304(shop_client: TestClient) -> None:
    image = shop_client.get("/products/p0x003/image")
    assert image.status_code == 200 and image.headers["content-type"] in ("image/webp", "image/jpeg")
    assert image.content[:4] in (b"RIFF", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
    etag = image.headers["etag"]
    assert etag.startswith('"') and "max-age" in image.headers["cache-control"]
    again = shop_client.get("/products/p0x003/image", headers={"If-None-Match": f'W/"other", {etag}'})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    stale = shop_client.get("/products/p0x003/image", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.content == image.content
    assert shop_client.get("/products/p0x004/image").headers["etag"] != etag
    assert shop_client.get("/products/nope/image").status_code == 404


def test_similar_endpoint(shop_client: TestClient, shop: dict) -> None:
    body = shop_client.get("/products/p0x020/similar", params={"k": 5}).json()
    assert body["category"] == SHOES and body["source"] == "embedding"
    assert "p0x020" not in [item["product_id"] for item in body["items"]]
    assert [item["rank"] for item in body["items"]] == [1, 2, 3, 4, 5]
    assert shop_client.get("/products/nope/similar").status_code == 404
    for bad in ({"k": 0}, {"k": 101}, {"offset": -1}, {"offset": 1001}, {"k": "many"}):
        assert shop_client.get("/products/p0x020/similar", params=bad).status_code == 422, bad
    assert post(shop_client, offset=1001).status_code == 422


def test_dedup_shows_each_group_once_unless_turned_off(shop_client: TestClient, shop: dict) -> None:
    start, everything = "p0x010", 40
    twins = set(SHOP_DUPLICATE)
    off = shop_client.get(f"/products/{start}/similar", params={"k": everything, "dedup": "false"}).json()["items"]
    on = shop_client.get(f"/products/{start}/similar", params={"k": everything}).json()["items"]
    assert twins <= {item["product_id"] for item in off}
    assert [item["product_id"] for item in on if item["product_id"] in twins] == ["p0x004"]  # the most popular
    assert len(on) == len(off) - 1
    expected = [pid for pid, _ in brute_force(shop, SHOES, stored_vector(shop, SHOES, start), None, everything,
                                              exclude=frozenset({start}))]
    assert [item["product_id"] for item in on] == [pid for pid in expected if pid != "p0x005"]
    # A full page even though a group collapsed inside it, and pages still join up.
    twin_rank = next(i for i, pid in enumerate(expected) if pid in twins)
    page = shop_client.get(f"/products/{start}/similar", params={"k": twin_rank + 3}).json()["items"]
    assert len(page) == twin_rank + 3
    halves = [shop_client.get(f"/products/{start}/similar", params={"k": 4, "offset": offset}).json()["items"]
              for offset in (0, 4)]
    assert halves[0] + halves[1] == on[:8]
    # "More like this" of a duplicate leaves out its twin too.
    of_twin = shop_client.get("/products/p0x004/similar", params={"k": everything}).json()["items"]
    assert twins.isdisjoint(item["product_id"] for item in of_twin)


def test_facets(shop_client: TestClient, shop: dict) -> None:
    body = shop_client.get("/facets", params={"category": "Shoes"}).json()
    products = [shop["products"][pid] for pid in open_artifact(shop["root"]).read_ids(SHOES)]
    assert body["category"] == SHOES and body["products"] == len(products) == 32
    assert body["in_stock"] == sum(product.in_stock is True for product in products)
    prices = [product.price for product in products if product.price is not None]
    assert body["price"] == {"min": min(prices), "max": max(prices)}
    assert body["labels"]["colour"] == dict(Counter(product.labels["colour"][0] for product in products))
    assert body["brands"] == dict(Counter(product.brand for product in products))
    assert {"brand", "price", "in_stock", "colour", "size"} <= set(body["keys"])
    red = shop_client.get("/facets", params={"category": "Shoes", "filter": "colour=red"}).json()
    assert red["products"] == body["labels"]["colour"]["red"]
    assert shop_client.get("/facets", params={"category": "Hats"}).status_code == 400
    assert shop_client.get("/facets", params={"category": "Shoes", "filter": "hue=1"}).status_code == 400
    assert len(allowed_ids(shop, SHOES, "colour=red")) <= red["products"]


def test_a_version_without_catalogue_still_answers(built: dict, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(built["root"], root, symlinks=True)
    (open_artifact(root).path / CATALOGUE_FILE).unlink()
    assert open_artifact(root).catalogue_path is None
    with TestClient(create_app(make_settings(root))) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        items = post(client, k=4).json()["items"]
        assert len(items) == 4
        assert all(item[name] is None for item in items for name in (*PRODUCT_FIELDS, "labels", "image_url"))
        refused = post(client, k=4, filter="brand=acme")
        assert refused.status_code == 400 and "catalogue" in refused.json()["detail"]
        product = client.get(f"/products/{items[0]['product_id']}").json()
        assert product["category"] == SHOES and product["title"] is None
        assert client.get(f"/products/{items[0]['product_id']}/image").status_code == 404
        similar = client.get(f"/products/{items[0]['product_id']}/similar", params={"k": 3}).json()
        assert similar["source"] == "embedding" and len(similar["items"]) == 3
        facets = client.get("/facets", params={"category": "Shoes"}).json()
        assert facets["keys"] == [] and facets["products"] == 9 and facets["in_stock"] is None
        popular = post(client, k=3, strategy="popularity", offset=1).json()["items"]
        assert [item["rank"] for item in popular] == [2, 3, 4]


def test_catalogue_is_left_open_for_requests_in_flight_after_a_reload(shop: dict) -> None:
    # A reload swaps the version; the old catalogue is not closed, so a request still holding it can read.
    with TestClient(create_app(make_settings(shop["root"]))) as client:
        holder = client.app.state.engine.holder
        old = holder.current
        assert holder.reload(force=True).status == "reloaded" and holder.current is not old
        assert isinstance(old.catalogue, Catalogue) and old.catalogue.product("p0x001") is not None
        assert post(client, k=2).json()["items"][0]["title"] is not None
