"""A tiny shop for the browser test: a dataset with product data, and a scene with one product pasted into it.

With the random `tiny` backbone nothing is "similar" in a human sense, but a crop of a scene that is (almost)
exactly a product's picture embeds next to that product's own vector: so the product pasted at a known box
is the one the page must show first.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.fixtures import save_picture, write_tiny_dataset

SHOES = "Apparel & Accessories|Shoes"
BAGS = "Apparel & Accessories|Handbags"
CATEGORIES = {SHOES: 16, BAGS: 6}
BRANDS = ("Acme", "Blue Fox", "Zed")  # "Blue Fox": a value the page must quote in the filter
COLOURS = ("red", "blue")
TRUE_PRODUCT = "p0x005"  # a shoe, blue, in stock
SCENE_SIZE = (320, 240)
PASTE_BOX = (150, 50, 270, 170)  # pixels (left, top, right, bottom) of the pasted product picture
PRODUCT_PICTURE = 64  # pixels a side of the product pictures (the thumbnails are made from them)


@dataclass(frozen=True)
class Shop:
    data: Path
    scene: bytes  # JPEG
    product_id: str
    category: str
    box: tuple[float, float, float, float]  # normalised: the drawn box whose context-grown crop is the picture


def product_record(number: int, product_id: str) -> dict[str, object]:
    """Every product is in stock but every seventh; colours alternate, so a colour filter keeps about half."""
    return {"id": product_id, "title": f"Shoe {product_id}" if product_id.startswith("p0") else f"Bag {product_id}",
            "brand": BRANDS[number % len(BRANDS)], "price": 10.0 + 5 * number, "currency": "EUR",
            "in_stock": number % 7 != 3, "labels": {"colour": COLOURS[number % 2]}}


def drawn_box(context: float = 0.1) -> tuple[float, float, float, float]:
    """The box that, grown by `context` of its size on each side (the embedder's crop), is the pasted picture."""
    left, top, right, bottom = PASTE_BOX
    width, height = SCENE_SIZE
    inset_x, inset_y = (right - left) * context / (1 + 2 * context), (bottom - top) * context / (1 + 2 * context)
    return ((left + inset_x) / width, (top + inset_y) / height, (right - inset_x) / width, (bottom - inset_y) / height)


def write_shop(root: Path, seed: int = 0) -> Shop:
    data = write_tiny_dataset(root, CATEGORIES, scenes=12, items_per_scene=2, seed=seed)
    written = sorted(json.loads((data / "categories.json").read_text()))
    assert written == product_ids(), "write_tiny_dataset numbers products differently now"
    rng = np.random.default_rng(seed + 1)
    for product_id in written:  # bigger pictures than the fixture's, so the thumbnails are worth looking at
        save_picture(data / "images" / "products" / f"{product_id}.jpg", rng, size=PRODUCT_PICTURE)
    records = [product_record(number, product_id) for number, product_id in enumerate(written)]
    (data / "products.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    scene = Image.new("RGB", SCENE_SIZE, (236, 232, 226))
    left, top, right, bottom = PASTE_BOX
    picture = Image.open(data / "images" / "products" / f"{TRUE_PRODUCT}.jpg").convert("RGB")
    scene.paste(picture.resize((right - left, bottom - top), Image.Resampling.BILINEAR), (left, top))
    buffer = io.BytesIO()
    scene.save(buffer, "JPEG", quality=95)
    return Shop(data, buffer.getvalue(), TRUE_PRODUCT, SHOES, drawn_box())


def product_ids(category: str | None = None) -> list[str]:
    """The ids write_tiny_dataset gives the products (of one category), sorted: the numbering of product_record."""
    return sorted(f"p{c}x{i:03d}" for c, (path, count) in enumerate(CATEGORIES.items()) for i in range(count)
                  if category is None or path == category)


def record_of(product_id: str) -> dict[str, object]:
    """The product data write_shop wrote for a product id."""
    return product_record(product_ids().index(product_id), product_id)
