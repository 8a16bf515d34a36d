"""Shopper colour names for drawn colours: the nearest of a fixed table by CIELAB distance.

RGB distance calls a dark navy "black" and a light pink "grey" far too often; CIELAB (CIE76 distance) is close
enough to what people see that the nearest name is the one a shopper would type.
"""

from __future__ import annotations

import logging

import numpy as np

LOG = logging.getLogger(__name__)

# One representative sRGB colour per name. Several names exist only because the synthetic palettes use those
# colours (charcoal, rose gold, lime, mint, lilac): without them those colours would fall halfway between two
# names, and a label would flip with a little lighting.
COLOUR_TABLE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (20, 20, 20)),
    ("charcoal", (70, 70, 72)),
    ("grey", (128, 128, 128)),
    ("silver", (192, 192, 198)),
    ("white", (245, 245, 245)),
    ("beige", (225, 205, 170)),
    ("tan", (195, 150, 105)),
    ("brown", (120, 75, 40)),
    ("red", (200, 30, 40)),
    ("burgundy", (128, 20, 50)),
    ("pink", (240, 165, 190)),
    ("fuchsia", (230, 50, 140)),
    ("orange", (240, 120, 30)),
    ("yellow", (245, 210, 40)),
    ("gold", (212, 175, 55)),
    ("rose gold", (183, 110, 121)),
    ("olive", (110, 115, 50)),
    ("green", (30, 140, 70)),
    ("lime", (150, 215, 40)),
    ("mint", (175, 230, 200)),
    ("light blue", (160, 195, 230)),
    ("blue", (50, 95, 190)),
    ("navy", (25, 35, 85)),
    ("purple", (110, 45, 145)),
    ("lilac", (200, 175, 230)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOUR_TABLE)

_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in 0..255, any leading shape [..., 3]."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_TABLE_LAB = rgb_to_lab(np.array([rgb for _, rgb in COLOUR_TABLE]))


def nearest_colour_index(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOUR_TABLE of the nearest name of each colour of [..., 3] (0..255)."""
    lab = rgb_to_lab(rgb)
    distances = ((lab[..., None, :] - _TABLE_LAB) ** 2).sum(axis=-1)
    return np.argmin(distances, axis=-1)


def colour_name(rgb: tuple[int, int, int] | np.ndarray) -> str:
    """The shopper colour name nearest to one sRGB colour."""
    return COLOUR_NAMES[int(nearest_colour_index(np.asarray(rgb)))]


def colour_shares(pixels: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Share of each colour name among `pixels` [N, 3] (optionally weighted), largest first, ties by name."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    weights = np.ones(len(pixels)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(pixels) == 0 or weights.sum() <= 0:
        return {}
    totals = np.bincount(nearest_colour_index(pixels), weights=weights, minlength=len(COLOUR_NAMES))
    totals /= totals.sum()
    order = sorted((index for index in range(len(COLOUR_NAMES)) if totals[index] > 0),
                   key=lambda index: (-totals[index], COLOUR_NAMES[index]))
    return {COLOUR_NAMES[index]: float(totals[index]) for index in order}
