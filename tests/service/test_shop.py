"""Shop the whole look: /detect, /shop and /recommend without a category, on a version with a tiny trained
detector (coloured boxes: a red square is Shoes, a blue bar Bags), and without one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.engine import Engine
from service.launch import wait_until_ready
from service.search import Page, SearchSpec
from service.versions import LoadedVersion
from tests.index.detection import BAGS, SHOES, build_box_shop, scene_bytes, truth
from tests.service.helpers import encode, make_settings, post, scene_jpeg
from training.model.detect_post import box_iou
from training.model.runtimes import installed
from training.model.runtimes.openvino_runtime import cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[2]
# The tiny detector scores its finds 0.4-0.6 and leaves near-duplicate boxes at the default NMS threshold:
# a lower score threshold and a stricter NMS one for it.
DETECT = {"detect_score_threshold": 0.3, "detect_nms_threshold": 0.2, "detect_max_items": 4}


@pytest.fixture(scope="module")
def box_shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_box_shop(tmp_path_factory.mktemp("box-shop"))


@pytest.fixture(scope="module")
def shop_app(box_shop: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(box_shop["root"], **DETECT))) as app:
        yield app


def _image(data: Path, scene: str = "s000") -> dict:
    return {"image": ("scene.jpg", scene_bytes(data, scene), "image/jpeg")}


def _iou(left: list[float], right: list[float]) -> float:
    return float(box_iou(np.array([left]), np.array([right]))[0, 0])


def test_detect_finds_the_items_of_the_photo(shop_app: TestClient, box_shop: dict[str, Path]) -> None:
    response = shop_app.post("/detect", files=_image(box_shop["data"], "s003"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index_version"] and body["took_ms"] > 0
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(score >= 0.3 for score in scores)
    assert 2 <= len(body["items"]) <= DETECT["detect_max_items"]
    for category, box in truth(box_shop["data"], "s003").items():
        best = next(item for item in body["items"] if item["category"] == category)
        assert _iou(best["bbox"], box) > 0.5


def test_shop_answers_every_item_with_its_products_from_one_batch(
        shop_app: TestClient, box_shop: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    embed = LoadedVersion.encode_core
    monkeypatch.setattr(LoadedVersion, "encode_core", lambda self, batch: batches.append(len(batch)) or embed(
        self, batch))
    response = shop_app.post("/shop", data={"k": "3"}, files=_image(box_shop["data"]))
    assert response.status_code == 200, response.text
    body = response.json()
    items = body["items"]
    assert {item["category"] for item in items} == {SHOES, BAGS}
    assert batches == [len(items)]  # every crop of the photo in one forward pass
    for item in items:
        assert item["source"] == "embedding" and len(item["products"]) == 3
        colour = "red" if item["category"] == SHOES else "blue"
        assert all(product["product_id"].startswith(colour) for product in item["products"])
        assert [product["rank"] for product in item["products"]] == [1, 2, 3]


def test_shop_takes_two_trips_to_the_cpu_pool_whatever_the_number_of_items(
        shop_app: TestClient, box_shop: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    trips: list[str] = []
    in_pool = Engine._in_pool

    async def counted(self: Engine, fn: Callable[..., object], *args: object) -> object:
        trips.append(fn.__name__)
        return await in_pool(self, fn, *args)

    monkeypatch.setattr(Engine, "_in_pool", counted)
    body = shop_app.post("/shop", data={"k": "2"}, files=_image(box_shop["data"])).json()
    assert len(body["items"]) >= 2
    assert trips == ["_shop_pre", "_shop_post"]  # decode + detect + crops, then every item's search


def test_an_item_whose_search_fails_is_answered_by_popularity_alone(
        shop_app: TestClient, box_shop: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    search = LoadedVersion.search_page

    def broken_for_shoes(self: LoadedVersion, vector: np.ndarray, spec: SearchSpec) -> Page:
        if spec.category == SHOES:
            raise RuntimeError("a broken index")
        return search(self, vector, spec)

    monkeypatch.setattr(LoadedVersion, "search_page", broken_for_shoes)
    body = shop_app.post("/shop", data={"k": "2"}, files=_image(box_shop["data"])).json()
    by_category = {item["category"]: item for item in body["items"]}
    assert by_category[SHOES]["source"] == "popularity" and len(by_category[SHOES]["products"]) == 2
    assert "RuntimeError" in by_category[SHOES]["fallback_reason"]
    assert by_category[BAGS]["source"] == "embedding" and by_category[BAGS]["fallback_reason"] is None
    assert all(product["product_id"].startswith("blue") for product in by_category[BAGS]["products"])


def test_shop_keeps_only_the_categories_asked_for(shop_app: TestClient, box_shop: dict[str, Path]) -> None:
    body = shop_app.post("/shop", data={"categories": "Shoes"}, files=_image(box_shop["data"])).json()
    assert body["items"] and {item["category"] for item in body["items"]} == {SHOES}
    assert shop_app.post("/shop", data={"categories": "Hats"}, files=_image(box_shop["data"])).status_code == 400
    bad_filter = shop_app.post("/shop", data={"filter": "colour=="}, files=_image(box_shop["data"]))
    assert bad_filter.status_code == 400


def test_recommend_predicts_the_category_of_a_box(shop_app: TestClient, box_shop: dict[str, Path]) -> None:
    boxes = truth(box_shop["data"], "s007")
    for category, box in boxes.items():
        response = post(shop_app, scene_bytes(box_shop["data"], "s007"), category=None, k=2,
                        bbox=",".join(f"{v:.4f}" for v in box))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["category"] == category and body["category_predicted"] is True
        assert 0 < body["category_score"] <= 1 and len(body["items"]) == 2
    named = post(shop_app, scene_bytes(box_shop["data"], "s007"), category="Bags").json()
    assert named["category_predicted"] is False and named["category_score"] is None
    assert post(shop_app, scene_bytes(box_shop["data"], "s007"), category=None).status_code == 422  # no bbox


def test_a_version_without_a_detector_refuses_detection_but_serves(client: TestClient) -> None:
    image = {"image": ("scene.jpg", scene_jpeg(), "image/jpeg")}
    for path in ("/detect", "/shop"):
        response = client.post(path, files=image)
        assert response.status_code == 503
        assert "no item detector" in response.json()["detail"]
    assert post(client, category=None, bbox="0.1,0.1,0.6,0.6").status_code == 503
    assert post(client).status_code == 200
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["detector"] is None and "no item detector" in ready["detector_problem"]


def test_detect_and_shop_need_an_api_key(box_shop: dict[str, Path]) -> None:
    with TestClient(create_app(make_settings(box_shop["root"], api_keys="sekret", **DETECT))) as app:
        for path in ("/detect", "/shop"):
            assert app.post(path, files=_image(box_shop["data"])).status_code == 401
            allowed = app.post(path, files=_image(box_shop["data"]), headers={"X-API-Key": "sekret"})
            assert allowed.status_code == 200


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_the_detector_runs_in_the_precision_asked_for(box_shop: dict[str, Path]) -> None:
    expected = "bf16" if cpu_supports_bf16() else "f32"  # auto: bf16 only where the CPU runs it natively
    for asked, precision in (("auto", expected), ("fp32", "f32")):
        settings = make_settings(box_shop["root"], detect_precision=asked, runtime="openvino", **DETECT)
        with TestClient(create_app(settings)) as app:
            ready = app.get("/readyz").json()
            found = app.post("/detect", files=_image(box_shop["data"], "s003")).json()["items"]
        assert ready["detector"] == "openvino" and ready["detector_precision"] == precision, asked
        assert {item["category"] for item in found} == {SHOES, BAGS}, asked


def test_a_bad_photo_is_refused(shop_app: TestClient) -> None:
    response = shop_app.post("/detect", files={"image": ("x.jpg", b"not an image", "image/jpeg")})
    assert response.status_code == 400


@pytest.mark.parametrize(("path", "fields"), [("/detect", {}), ("/shop", {}), ("/recommend", {"bbox": "0,0,1,1"})])
def test_a_photo_too_small_to_search_is_a_400(shop_app: TestClient, path: str, fields: dict[str, str]) -> None:
    # A valid image only 3 pixels tall: the detector's whole-photo resize has nothing to work on.
    thin = encode(Image.new("RGB", (500, 3), (128, 128, 128)), "PNG")
    response = shop_app.post(path, data=fields, files={"image": ("thin.png", thin, "image/png")})
    assert response.status_code == 400, response.text
    assert "too small" in response.json()["detail"]


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_the_served_process_detects_without_torch(box_shop: dict[str, Path]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "STL_ARTIFACTS": str(box_shop["root"]), "STL_DEVICE": "cpu", "STL_RUNTIME": "auto",
           "STL_DETECT_NMS_THRESHOLD": "0.2", "STL_DETECT_SCORE_THRESHOLD": "0.3"}
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, server, timeout_s=120)
        files = {"image": ("s.jpg", scene_bytes(box_shop["data"]), "image/jpeg")}
        shop = httpx.post(f"{url}/shop", data={"k": "2"}, files=files, timeout=30)
        assert shop.status_code == 200 and {item["category"] for item in shop.json()["items"]} == {SHOES, BAGS}
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        assert ready["detector"] == "openvino" and ready["torch_loaded"] is False
    finally:
        server.terminate()
        server.communicate(timeout=30)
