"""Product data of the synthetic catalogue: titles, labels, brands, prices and stock that match what is drawn.

Each product's `colour` labels name the colours its picture actually shows (by pixel area, largest first),
`pattern` is the drawn pattern, `style` the latent outfit style (palette family + pattern family) that scenes
are composed by, and the title says the same in words ("Red striped sneaker"). Brand, price and stock are
seeded draws: a long-tailed price around a per-category median, ~10 % out of stock.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from training.data.products import Product
from training.data.synth.colours import colour_shares
from training.data.synth.draw import PALETTES, PATTERN_FAMILIES, Look, sprite_layers

LOG = logging.getLogger(__name__)

COLOUR_KEY, PATTERN_KEY, STYLE_KEY = "colour", "pattern", "style"
CURRENCY = "USD"
URL_PREFIX = "https://shop.example/p/"
BRANDS: tuple[str, ...] = (
    "Northwind", "Juniper & Co", "Maison Ardent", "Vellum", "Kestrel", "Oak & Ivy", "Lumen", "Saltmarsh",
    "Brisa", "Cobalt Row", "Fenwick", "Halcyon", "Mirelle", "Ostara", "Pennant", "Quill", "Rowan Lane",
    "Tessellate", "Umber", "Wrenfield",
)
BRAND_ZIPF = 0.8  # a few brands carry much of a catalogue, as in real shops
# Median price (USD) per drawn shape; prices are lognormal around it, so each category has a long tail.
MEDIAN_PRICE: dict[str, float] = {
    "shoes": 79.0, "top": 29.0, "pants": 49.0, "bag": 89.0, "coat": 139.0, "sunglasses": 59.0,
    "shorts": 34.0, "skirt": 44.0, "earrings": 19.0, "necklace": 29.0,
}
PRICE_SIGMA = 0.55  # log-space spread: the 90th percentile is about twice the median
MIN_PRICE = 4.99
PATTERN_WORDS: dict[str, str] = {
    "solid": "", "gradient": "ombre", "colorblock": "colour-block", "stripes": "striped", "checks": "checked",
    "plaid": "plaid", "dots": "polka-dot", "confetti": "confetti-print",
}
# A colour is labelled when it covers at least this share of the item: a shopper filtering by "white" expects
# white to be plain to see, not a thin sole.
MIN_COLOUR_SHARE = 0.2
MAX_COLOURS = 3
COLOUR_RENDER_SIZE = 96  # large enough that a necklace's chain is drawn a few pixels wide, as in the photo

_BRAND_P = 1.0 / np.arange(1, len(BRANDS) + 1) ** BRAND_ZIPF
_BRAND_P /= _BRAND_P.sum()


def product_url(product_id: str) -> str:
    return URL_PREFIX + product_id


def drawn_colours(look: Look) -> tuple[str, ...]:
    """Names of the colours the look's picture shows, by covered area, largest first (at least one)."""
    rgb, alpha, _ = sprite_layers(look, COLOUR_RENDER_SIZE)
    covered = alpha > 0
    shares = colour_shares(rgb[covered], alpha[covered])
    names = [name for name, share in shares.items() if share >= MIN_COLOUR_SHARE][:MAX_COLOURS]
    return tuple(names) or (next(iter(shares)),)


def style_name(look: Look) -> str:
    """The latent outfit style as a label value, e.g. "nautical-lines"."""
    palette = PALETTES[look.palette][0].replace(" ", "-")
    return f"{palette}-{PATTERN_FAMILIES[look.pattern_family][0]}"


def noun(look: Look) -> str:
    """What a shop would call the drawn item, from its shape parameters."""
    s = look.shape_params
    if look.shape == "shoes":
        return "boot" if s["shaft"] > 0.35 else "heel" if s["heel"] > 0.04 else "sneaker"
    if look.shape == "top":
        return "tank top" if s["sleeve"] == 0 else "t-shirt" if s["sleeve"] < 0.2 else "long-sleeve top"
    if look.shape == "coat":
        return "belted coat" if s["belt"] else "coat" if s["length"] > 0.72 else "jacket"
    if look.shape == "pants":
        return "trousers"
    if look.shape == "shorts":
        return "shorts"
    if look.shape == "skirt":
        return "maxi skirt" if s["length"] > 0.65 else "mini skirt" if s["length"] < 0.45 else "midi skirt"
    if look.shape == "bag":
        return ("tote bag", "handbag", "clutch")[int(s["kind"])]
    if look.shape == "sunglasses":
        return ("round sunglasses", "square sunglasses", "cat-eye sunglasses")[int(s["lens"])]
    if look.shape == "earrings":
        return ("hoop earrings", "drop earrings", "tassel earrings")[int(s["kind"])]
    if look.shape == "necklace":
        return ("pendant necklace", "diamond-pendant necklace", "drop-pendant necklace")[int(s["pendant"])]
    raise ValueError(f"no name for shape {look.shape!r}")


def title(look: Look, colours: tuple[str, ...]) -> str:
    words = [colours[0], PATTERN_WORDS[look.pattern], noun(look)]
    text = " ".join(word for word in words if word)
    return text[0].upper() + text[1:]


def price(rng: np.random.Generator, shape: str) -> float:
    """A long-tailed shop price: lognormal around the shape's median, ending in .99."""
    raw = MEDIAN_PRICE[shape] * math.exp(PRICE_SIGMA * float(rng.standard_normal()))
    return max(MIN_PRICE, round(max(1.0, round(raw)) - 0.01, 2))


def describe(product_id: str, look: Look, rng: np.random.Generator, out_of_stock_rate: float) -> Product:
    """The product data of one drawn product; `rng` is the product's own stream."""
    colours = drawn_colours(look)
    return Product(
        id=product_id,
        title=title(look, colours),
        brand=BRANDS[int(rng.choice(len(BRANDS), p=_BRAND_P))],
        price=price(rng, look.shape),
        currency=CURRENCY,
        url=product_url(product_id),
        in_stock=bool(rng.random() >= out_of_stock_rate),
        labels={COLOUR_KEY: colours, PATTERN_KEY: (look.pattern,), STYLE_KEY: (style_name(look),)},
    )


def relist(original: Product, product_id: str, rng: np.random.Generator, out_of_stock_rate: float) -> Product:
    """A second listing of `original` (same picture, title, brand, price and labels): its own id, url and stock."""
    return Product(id=product_id, title=original.title, brand=original.brand, price=original.price,
                   currency=original.currency, url=product_url(product_id),
                   in_stock=bool(rng.random() >= out_of_stock_rate), labels=dict(original.labels))
