"""The synthetic catalogue's product data: products.jsonl matches what is drawn; duplicate listings; rates."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from training.data.products import PRODUCTS_FILE, read_products
from training.data.stl import STLDataset, short_name
from training.data.synth.colours import COLOUR_TABLE, colour_name, colour_shares
from training.data.synth.draw import SHAPE_OF_CATEGORY, Look, product_image
from training.data.synth.plan import DUPLICATES_FILE, SynthConfig, generate, plan, product_records, read_duplicates
from training.data.synth.products import (
    BRANDS,
    COLOUR_KEY,
    MEDIAN_PRICE,
    PATTERN_KEY,
    PATTERN_WORDS,
    STYLE_KEY,
    drawn_colours,
    noun,
)

TINY = SynthConfig(scenes=6, products=50, seed=3, duplicate_rate=0.04)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-products") / "tiny"
    generate(out, TINY)
    return out


@pytest.mark.parametrize(("rgb", "name"), [
    ((25, 35, 85), "navy"),  # dark, but plainly blue to a shopper; RGB distance to black is smaller than to blue
    ((30, 30, 30), "black"),
    ((128, 128, 130), "grey"),
    ((240, 240, 245), "white"),
    ((190, 35, 45), "red"),
    ((245, 120, 30), "orange"),
    ((250, 210, 40), "yellow"),
    ((120, 80, 45), "brown"),
    ((240, 180, 195), "pink"),
    ((212, 175, 55), "gold"),
    ((192, 192, 198), "silver"),
    ((100, 40, 140), "purple"),
])
def test_colour_name_is_the_perceptually_nearest(rgb: tuple[int, int, int], name: str) -> None:
    assert colour_name(rgb) == name


def test_every_table_colour_names_itself_and_shares_are_ordered() -> None:
    for name, rgb in COLOUR_TABLE:
        assert colour_name(rgb) == name
    pixels = np.array([(200, 30, 40)] * 3 + [(245, 245, 245)] * 5 + [(25, 35, 85)] * 2)
    assert list(colour_shares(pixels).items()) == [("white", 0.5), ("red", 0.3), ("navy", 0.2)]
    assert colour_shares(np.zeros((0, 3))) == {}


def test_drawn_colours_follow_the_picture_not_only_the_primary() -> None:
    shape = {"sleeve": 0.3, "half_width": 0.2, "length": 0.6, "neck": 0.0, "collar": 0.0}
    solid = Look("top", 0, 0, (200, 30, 40), (245, 245, 245), (200, 30, 40), "solid", {}, shape)
    assert drawn_colours(solid) == ("red",)
    # White stripes over 60 % of a red top: white is what a shopper sees most of.
    stripes = Look("top", 0, 1, (200, 30, 40), (245, 245, 245), (200, 30, 40), "stripes",
                   {"angle": 0.0, "period": 0.1, "duty": 0.6}, shape)
    assert drawn_colours(stripes) == ("white", "red")
    assert noun(stripes) == "long-sleeve top"


def test_products_file_covers_the_catalogue_and_reads_back(tiny: Path) -> None:
    dataset = STLDataset.open(tiny, on_error="raise")
    products = {product.id: product for product in read_products(tiny / PRODUCTS_FILE)}
    assert set(products) == set(dataset.categories.product_to_path)
    for product_id, product in products.items():
        assert product.url == f"https://shop.example/p/{product_id}" and product.currency == "USD"
        assert product.brand in BRANDS and product.in_stock in (True, False)
        assert product.price is not None and product.price > 0 and round(product.price * 100) % 100 == 99
        colours, (pattern,), (style,) = (product.labels[key] for key in (COLOUR_KEY, PATTERN_KEY, STYLE_KEY))
        words = " ".join(w for w in (colours[0], PATTERN_WORDS[pattern]) if w)
        assert product.title is not None and product.title.lower().startswith(words.lower() + " ")
        assert style.rsplit("-", 1)[1] in ("plain", "lines", "spots")


def test_labels_name_what_the_product_picture_shows(tiny: Path) -> None:
    catalogue = plan(TINY)
    products = {product.id: product for product in read_products(tiny / PRODUCTS_FILE)}
    # Colours near the border of two names may flip with JPEG rounding: rates, not every product.
    listed, first = 0, 0
    for product_id, path, look in zip(catalogue.product_ids, catalogue.product_paths, catalogue.looks, strict=True):
        product = products[product_id]
        assert product.labels[PATTERN_KEY] == (look.pattern,)
        assert noun(look) in product.title and SHAPE_OF_CATEGORY[short_name(path)] == look.shape
        # The item's own pixels: where two renders on different backgrounds agree; the edge is left out, where
        # the JPEG mixes item and background.
        on_black = np.asarray(product_image(look, TINY.product_size, (0, 0, 0)), dtype=np.int32)
        on_white = np.asarray(product_image(look, TINY.product_size, (255, 255, 255)), dtype=np.int32)
        mask = Image.fromarray(((on_black == on_white).all(axis=2) * 255).astype(np.uint8))
        inside = np.asarray(mask.filter(ImageFilter.MinFilter(5))) > 0
        with Image.open(tiny / "images" / "products" / f"{product_id}.jpg") as image:
            pixels = np.asarray(image.convert("RGB"))[inside]
        assert len(pixels) > 50
        dominant = next(iter(colour_shares(pixels)))
        listed += dominant in product.labels[COLOUR_KEY]
        first += dominant == product.labels[COLOUR_KEY][0]
    assert listed >= 0.95 * TINY.products and first >= 0.8 * TINY.products


def test_duplicates_share_the_picture_and_the_data_but_not_the_scenes(tiny: Path) -> None:
    dataset = STLDataset.open(tiny)
    duplicates = read_duplicates(tiny)
    assert duplicates == json.loads((tiny / DUPLICATES_FILE).read_text())
    assert len(duplicates) == round(TINY.duplicate_rate * TINY.products) == 2
    products = {product.id: product for product in read_products(tiny / PRODUCTS_FILE)}
    in_pairs = {pair.product_id for pair in dataset.pairs}
    for listing, original in duplicates.items():
        assert listing != original and original not in duplicates and listing not in in_pairs
        assert dataset.categories.of(listing) == dataset.categories.of(original)
        assert dataset.product_path(listing).read_bytes() == dataset.product_path(original).read_bytes()
        copy, source = products[listing], products[original]
        assert (copy.title, copy.brand, copy.price, copy.labels) == (source.title, source.brand, source.price,
                                                                      source.labels)
        assert copy.url != source.url


def test_rates_and_prices_on_a_small_catalogue() -> None:
    config = SynthConfig(scenes=1, products=1000, seed=1)
    catalogue = plan(config)
    records = product_records(config, catalogue)
    assert len(records) == 1020 and len({record.id for record in records}) == 1020  # 2 % duplicates
    out_of_stock = sum(not record.in_stock for record in records) / len(records)
    assert 0.07 < out_of_stock < 0.13
    prices: dict[str, list[float]] = defaultdict(list)
    for record, look in zip(records, catalogue.looks, strict=False):
        prices[look.shape].append(record.price)
    medians = {shape: float(np.median(values)) for shape, values in prices.items()}
    assert medians["earrings"] < medians["top"] < medians["shoes"] < medians["coat"]
    for shape, median in medians.items():
        assert 0.7 * MEDIAN_PRICE[shape] < median < 1.4 * MEDIAN_PRICE[shape]
    shoes = np.asarray(prices["shoes"])
    assert np.percentile(shoes, 95) > 2 * np.median(shoes)  # long-tailed
    assert len({record.brand for record in records}) == len(BRANDS)
