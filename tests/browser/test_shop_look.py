"""Shop the whole look in a real browser: the detected items appear as boxes on the photo, tapping one
searches it, and "Shop the whole look" shows every item's products (a tiny detector trained in the fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from tests.browser.test_page import answers, await_answer, upload
from tests.fixtures import serving
from tests.index.detection import BAGS, SHOES, build_box_shop, scene_bytes
from tests.service.helpers import make_settings

pytestmark = pytest.mark.browser

Page = Any


@pytest.fixture(scope="module")
def box_shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_box_shop(tmp_path_factory.mktemp("browser-box-shop"))


@pytest.fixture(scope="module")
def server_url(box_shop: dict[str, Path]) -> Iterator[str]:
    """Overrides the page's server: the box shop, whose version has a detector."""
    settings = make_settings(box_shop["root"], detect_score_threshold=0.3, detect_nms_threshold=0.2,
                             detect_max_items=4)
    with serving(create_app(settings)) as url:
        yield url


def _detected(page: Page) -> list[dict]:
    page.wait_for_selector("#detections .detection", state="attached")
    return page.locator("#detections .detection").evaluate_all(
        "boxes => boxes.map(box => ({category: box.dataset.category, index: box.dataset.index}))")


def test_detected_items_appear_and_tapping_one_searches_it(page: Page, box_shop: dict[str, Path]) -> None:
    upload(page, "scene.jpg", scene_bytes(box_shop["data"], "s002"))
    found = _detected(page)
    assert {item["category"] for item in found} >= {SHOES, BAGS}
    assert "tap one" in page.locator("#detect-status").inner_text()
    assert page.locator("#shop-look").is_visible()
    page.wait_for_selector(f'#category option[value="{SHOES}"]', state="attached")

    shoes = next(item for item in found if item["category"] == SHOES)
    outline = page.locator(f'#detections .detection[data-index="{shoes["index"]}"]').bounding_box()
    before = answers(page)
    page.mouse.click(outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] / 2)
    await_answer(page, before)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    assert page.locator("#category").input_value() == SHOES
    assert "Box (left, top, right, bottom)" in page.locator("#box-value").inner_text()
    ids = page.locator("#results .card").evaluate_all("cards => cards.map(card => card.dataset.productId)")
    assert ids and all(pid.startswith("red") for pid in ids)


def test_shop_the_whole_look_groups_the_products_per_item(page: Page, box_shop: dict[str, Path]) -> None:
    upload(page, "scene.jpg", scene_bytes(box_shop["data"], "s004"))
    _detected(page)
    before = answers(page)
    page.click("#shop-look")
    await_answer(page, before)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    groups = page.locator("#results .shop-group")
    categories = groups.evaluate_all("groups => groups.map(group => group.dataset.category)")
    assert set(categories) == {SHOES, BAGS}
    for position, category in enumerate(categories):
        ids = groups.nth(position).locator(".card").evaluate_all("cards => cards.map(card => card.dataset.productId)")
        assert ids and all(pid.startswith("red" if category == SHOES else "blue") for pid in ids)
    assert "The whole look" in page.locator("#mode").inner_text()
