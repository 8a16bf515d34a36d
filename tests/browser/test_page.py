"""The shopper's flow in a real browser: upload the scene, drag the box, pick the category, filter, page on.

The scene holds one product's own picture at a known box (tests/browser/shop.py), so that product must
come first; each test starts from the page as a shopper opens it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.browser.shop import BAGS, SHOES, Shop, product_ids, record_of

pytestmark = pytest.mark.browser

Page = Any  # playwright.sync_api.Page; playwright is an optional dependency, imported by the fixture

CARDS = "#results .card"
BOX_TOLERANCE = 0.01  # a mouse drag lands within a pixel or two of the aimed corners


def answers(page: Page) -> int:
    return int(page.locator("#results").get_attribute("data-answers") or 0)


def await_answer(page: Page, before: int) -> None:
    """Wait until the page has handled one more API answer (results or an error) than `before`."""
    page.wait_for_function(f"Number(document.querySelector('#results').dataset.answers) > {before}")


def upload(page: Page, name: str, data: bytes, mime_type: str = "image/jpeg") -> None:
    page.set_input_files("#photo-input", files=[{"name": name, "mimeType": mime_type, "buffer": data}])


def drag_box(page: Page, box: tuple[float, float, float, float]) -> tuple[float, ...]:
    """Draw `box` (normalised) on the photo with the mouse; returns the box the page says it will send."""
    page.wait_for_function("document.getElementById('scene').complete && "
                           "document.getElementById('scene').naturalWidth > 0")
    frame = page.locator("#scene").bounding_box()
    left, top, right, bottom = box
    page.mouse.move(frame["x"] + left * frame["width"], frame["y"] + top * frame["height"])
    page.mouse.down()
    page.mouse.move(frame["x"] + right * frame["width"], frame["y"] + bottom * frame["height"], steps=6)
    page.mouse.up()
    shown = page.locator("#box-value").inner_text()
    return tuple(float(value) for value in shown.rsplit(" ", 1)[-1].split(","))


def pick_category(page: Page, path: str) -> None:
    page.wait_for_selector(f'#category option[value="{path}"]', state="attached")
    page.select_option("#category", value=path)


def search_the_scene(page: Page, shop: Shop, k: int = 12) -> None:
    """Upload the scene, draw the box around the pasted product, pick its category, wait for the filters, submit."""
    upload(page, "scene.jpg", shop.scene)
    drawn = drag_box(page, shop.box)
    assert all(abs(a - b) <= BOX_TOLERANCE for a, b in zip(drawn, shop.box, strict=True)), (drawn, shop.box)
    pick_category(page, shop.category)
    page.wait_for_selector("#filters:not([hidden]) #colour-options input")
    page.select_option("#page-size", str(k))
    before = answers(page)
    page.click("#search")
    await_answer(page, before)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()


def card_ids(page: Page) -> list[str]:
    return page.locator(CARDS).evaluate_all("cards => cards.map(card => card.dataset.productId)")


def test_the_pasted_product_comes_first_with_its_thumbnail(page: Page, shop: tuple[Shop, Path],
                                                           server_url: str) -> None:
    scene = shop[0]
    examples = httpx.get(f"{server_url}/examples").status_code
    assert page.locator("#examples").is_hidden() == (examples == 404)
    assert page.get_attribute('a[href="docs"]', "href") == "docs"

    search_the_scene(page, scene)

    first = page.locator(CARDS).first
    assert first.get_attribute("data-product-id") == scene.product_id
    assert first.get_attribute("data-rank") == "1"
    record = record_of(scene.product_id)
    assert first.locator(".title").inner_text() == record["title"]
    assert first.locator(".brand").inner_text() == record["brand"]
    assert first.locator(".price").inner_text() == "€35.00"
    assert first.get_attribute("data-colour") == record["labels"]["colour"]
    assert first.locator("img").get_attribute("alt") == record["title"]
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.locator("img").element_handle())
    assert page.locator(CARDS).count() == 12
    assert page.locator("#fallback").is_hidden()  # embeddings answered, not the popularity fallback
    assert "answered in" in page.locator("#took").inner_text() and " ms" in page.locator("#took").inner_text()
    assert page.locator("#brand-options").inner_text().count("Blue Fox") == 1
    assert page.problems == [] or all("Failed to load resource" in p for p in page.problems), page.problems

    target = os.environ.get("STL_PAGE_SCREENSHOT")  # docs/page.png is made with this set (see the report)
    if target:
        page.set_viewport_size({"width": 1100, "height": 860})
        page.screenshot(path=target, full_page=False)
        with Image.open(target) as shot:  # a palette PNG: a fraction of the size, the same look
            shot.convert("RGB").quantize(colors=128).save(target, optimize=True)


def test_keys_move_and_resize_the_box(page: Page, shop: tuple[Shop, Path]) -> None:
    upload(page, "scene.jpg", shop[0].scene)
    left, top, right, bottom = drag_box(page, (0.2, 0.2, 0.5, 0.6))
    page.focus("#box")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("Shift+ArrowUp")
    moved = page.locator("#box-value").inner_text().rsplit(" ", 1)[-1].split(",")
    expected = (left + 0.01, top + 0.01, right + 0.02, bottom)
    assert all(abs(float(a) - b) < 1e-3 for a, b in zip(moved, expected, strict=True)), (moved, expected)
    page.click("#clear-box")
    assert page.locator("#box-value").inner_text() == "Box: the whole photo"


def test_a_colour_and_brand_filter_keeps_only_those_products(page: Page, shop: tuple[Shop, Path]) -> None:
    scene = shop[0]
    search_the_scene(page, scene)
    colour = record_of(scene.product_id)["labels"]["colour"]

    before = answers(page)
    page.check(f'#colour-options input[value="{colour}"]')
    await_answer(page, before)
    assert page.locator("#filter-value").inner_text() == f"colour={colour} AND in_stock=true"
    colours = page.locator(CARDS).evaluate_all("cards => cards.map(card => card.dataset.colour)")
    assert colours and all(found == colour for found in colours), colours
    assert card_ids(page)[0] == scene.product_id  # it has that colour: still first

    before = answers(page)
    page.check('#brand-options input[value="Blue Fox"]')
    await_answer(page, before)
    assert page.locator("#filter-value").inner_text() == f'brand="Blue Fox" AND colour={colour} AND in_stock=true'
    brands = page.locator(f"{CARDS} .brand").all_inner_texts()
    colours = page.locator(CARDS).evaluate_all("cards => cards.map(card => card.dataset.colour)")
    assert brands and set(brands) == {"Blue Fox"} and set(colours) == {colour}, (brands, colours)
    assert scene.product_id not in card_ids(page)  # a Zed shoe


def test_show_more_appends_the_next_page_without_duplicates(page: Page, shop: tuple[Shop, Path]) -> None:
    scene = shop[0]
    search_the_scene(page, scene, k=4)
    first_page = card_ids(page)
    assert len(first_page) == 4 and first_page[0] == scene.product_id

    before = answers(page)
    page.click("#more")
    await_answer(page, before)
    shown = card_ids(page)
    assert shown[:4] == first_page and len(shown) == 8 and len(set(shown)) == 8, shown
    ranks = page.locator(CARDS).evaluate_all("cards => cards.map(card => Number(card.dataset.rank))")
    assert ranks == list(range(1, 9))

    # Filtered, the same: the shoes of one colour in stock, page after page, until a short last page.
    colour = record_of(scene.product_id)["labels"]["colour"]
    before = answers(page)
    page.check(f'#colour-options input[value="{colour}"]')
    await_answer(page, before)
    while page.locator("#more").is_visible():
        before = answers(page)
        page.click("#more")
        await_answer(page, before)
    shown = card_ids(page)
    expected = sorted(pid for pid in product_ids(SHOES) if record_of(pid)["labels"]["colour"] == colour
                      and record_of(pid)["in_stock"])
    assert sorted(shown) == expected, (shown, expected)


def test_more_like_this_lists_other_products_of_its_category(page: Page, shop: tuple[Shop, Path]) -> None:
    scene = shop[0]
    search_the_scene(page, scene, k=4)
    before = answers(page)
    page.locator(CARDS).first.locator("button.similar").click()
    await_answer(page, before)
    shown = card_ids(page)
    assert len(shown) == 4 and scene.product_id not in shown and all(pid in product_ids(SHOES) for pid in shown), shown
    assert page.locator("#mode").inner_text().startswith(f"More like {record_of(scene.product_id)['title']}")


def test_a_file_that_is_not_a_photo_shows_the_api_error(page: Page, server_url: str) -> None:
    fake = b"this is a text file, renamed\n"
    expected = httpx.post(f"{server_url}/recommend", data={"category": BAGS},
                          files={"image": ("not-a-photo.jpg", fake, "image/jpeg")})
    assert expected.status_code == 400

    upload(page, "not-a-photo.jpg", fake)
    page.wait_for_selector("#no-preview:not([hidden])")
    pick_category(page, BAGS)
    before = answers(page)
    page.click("#search")
    await_answer(page, before)
    assert page.locator("#error").inner_text() == expected.json()["detail"]
    assert page.locator(CARDS).count() == 0


def test_a_401_asks_for_the_key_and_the_key_is_sent(page: Page, shop: tuple[Shop, Path]) -> None:
    """The service answers 401 (stubbed here: this one needs no key) until the page sends the key."""
    seen: list[str | None] = []

    def guarded(route: Any) -> None:
        key = route.request.headers.get("authorization")
        seen.append(key)
        if key != "Bearer s3cret":
            route.fulfill(status=401, json={"detail": "missing or wrong API key"})
        else:  # FastAPI's own 422 shape: a list of problems
            route.fulfill(status=422, json={"detail": [
                {"type": "less_than_equal", "loc": ["body", "k"], "msg": "Input should be less than or equal to 100"},
                {"type": "missing", "loc": ["body", "category"], "msg": "Field required"}]})

    page.route("**/recommend", guarded)
    upload(page, "scene.jpg", shop[0].scene)
    pick_category(page, SHOES)
    before = answers(page)
    page.click("#search")
    await_answer(page, before)
    assert page.locator("#error").inner_text() == "missing or wrong API key"
    assert page.locator("#key-prompt").is_visible() and page.locator("#api-key").is_visible()

    page.fill("#api-key", "s3cret")
    before = answers(page)
    page.click("#search")
    await_answer(page, before)
    assert seen == [None, "Bearer s3cret"]
    assert page.locator("#error").inner_text() == ("k: Input should be less than or equal to 100; "
                                                   "category: Field required")


def test_a_popularity_answer_shows_its_badge_and_note(page: Page, shop: tuple[Shop, Path]) -> None:
    answer = {"category": SHOES, "source": "popularity", "fallback_reason": "no model for this version",
              "items": [{"product_id": "x1", "score": 7.0, "rank": 1}], "offset": 0,
              "note": "only one product can be shown", "index_version": None, "took_ms": 1.25}
    page.route("**/recommend", lambda route: route.fulfill(json=answer))
    upload(page, "scene.jpg", shop[0].scene)
    pick_category(page, SHOES)
    before = answers(page)
    page.click("#search")
    await_answer(page, before)
    assert page.locator("#fallback").inner_text() == "Popular picks: no model for this version"
    assert page.locator("#note").inner_text() == "only one product can be shown"
    assert page.locator("#took").inner_text() == "· answered in 1.3 ms"
    card = page.locator(CARDS)
    assert card.count() == 1 and card.locator(".title").inner_text() == "x1"  # no title: the id
    assert card.locator("img").count() == 0 and page.locator("#more").is_hidden()  # no image_url: no picture


def test_an_example_scene_loads_its_box_and_category_and_searches(page: Page, server_url: str) -> None:
    shipped = httpx.get(f"{server_url}/examples").json()["examples"]
    assert shipped, "the index build ships sample scenes"
    page.locator("#example-list .example").first.wait_for()
    before = answers(page)
    page.locator("#example-list .example").first.click()
    await_answer(page, before)
    assert page.locator("#category").input_value() == shipped[0]["category"]
    assert page.locator(CARDS).count() > 0 and page.locator("#error").is_hidden()
    shown = page.locator("#box-value").inner_text().rsplit(" ", 1)[-1].split(",")
    assert [round(float(v), 3) for v in shown] == [round(v, 3) for v in shipped[0]["bbox"]]  # the example's box


def _photo(width: int, height: int) -> bytes:
    gradient = Image.linear_gradient("L").resize((width, height))
    buffer = io.BytesIO()
    Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient)).save(
        buffer, "JPEG", quality=90)
    return buffer.getvalue()


# Wraps the page's fetch to note each upload's image (its bytes and decoded size): Playwright does not expose
# the body of a multipart request that carries a Blob.
RECORD_UPLOADS = """() => {
  window.uploads = [];
  const send = window.fetch;
  window.fetch = async (url, options) => {
    const image = options && options.body instanceof FormData ? options.body.get("image") : null;
    if (image) {
      const bitmap = await createImageBitmap(image);
      window.uploads.push({url: String(url), type: image.type, bytes: image.size,
                           width: bitmap.width, height: bitmap.height});
    }
    return send(url, options);
  };
}"""


def test_a_big_photo_is_sent_downscaled_and_a_small_one_as_it_is(page: Page, shop: tuple[Shop, Path]) -> None:
    page.evaluate(RECORD_UPLOADS)
    upload(page, "phone.jpg", _photo(2400, 1800))
    page.wait_for_function("window.uploads.length === 1")
    big = page.evaluate("window.uploads[0]")
    assert big["url"].endswith("/detect") and big["type"] == "image/jpeg"
    assert (big["width"], big["height"]) == (1600, 1200)  # the longer side at the page's limit, aspect kept

    small = _photo(640, 480)
    upload(page, "small.jpg", small)
    page.wait_for_function("window.uploads.length === 2")
    sent = page.evaluate("window.uploads[1]")
    assert (sent["width"], sent["height"], sent["bytes"]) == (640, 480, len(small))  # the file as chosen
