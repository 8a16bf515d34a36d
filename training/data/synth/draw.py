"""Drawing for the synthetic catalogue: product looks -> item sprites, product photos and worn-in-scene photos.

A product's identity is its `Look` (category shape parameters, colours, pattern and its parameters). The
same look is drawn twice: alone on a light background (the catalogue photo) and worn by a figure in a
scene with photo-like changes (scale, rotation, perspective, lighting, occlusion, blur, noise), so a scene
crop is recognisably its product without ever being a copy of the product image.
"""

from __future__ import annotations

import colorsys
import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LOG = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# Internal shape keys, in the order of the real STL-Fashion categories' short names.
SHAPE_OF_CATEGORY = {
    "Shoes": "shoes",
    "Shirts & Tops": "top",
    "Pants": "pants",
    "Handbags, Wallets & Cases": "bag",
    "Coats & Jackets": "coat",
    "Sunglasses": "sunglasses",
    "Shorts": "shorts",
    "Skirts": "skirt",
    "Earrings": "earrings",
    "Necklaces": "necklace",
}
BOTTOMS = frozenset({"pants", "shorts", "skirt"})

# Palette families: outfits of one scene share one; products of one family are visually close on purpose.
PALETTES: tuple[tuple[str, tuple[RGB, ...]], ...] = (
    ("earth", ((120, 80, 45), (190, 150, 100), (110, 115, 60), (170, 85, 45))),
    ("pastel", ((240, 180, 195), (170, 205, 235), (180, 230, 200), (205, 185, 235))),
    ("mono", ((25, 25, 28), (235, 235, 232), (128, 128, 130), (70, 70, 75))),
    ("nautical", ((25, 40, 90), (240, 240, 245), (190, 35, 45), (70, 110, 170))),
    ("jewel", ((15, 120, 80), (30, 60, 160), (150, 20, 60), (100, 40, 140))),
    ("bright", ((250, 210, 40), (245, 120, 30), (235, 50, 140), (150, 215, 40))),
    ("denim", ((45, 75, 125), (95, 130, 180), (150, 175, 205), (30, 45, 75))),
    ("warm neutral", ((225, 205, 175), (245, 235, 215), (195, 150, 110), (215, 160, 150))),
)
METALS: tuple[RGB, ...] = ((212, 175, 55), (192, 192, 198), (183, 110, 121), (40, 40, 40))
# Pattern families: the other half of a scene's latent style.
PATTERN_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("plain", ("solid", "gradient", "colorblock")),
    ("lines", ("stripes", "checks", "plaid")),
    ("spots", ("dots", "confetti")),
)
SKIN_TONES: tuple[RGB, ...] = ((241, 204, 177), (224, 172, 138), (198, 134, 94), (141, 85, 54), (92, 58, 40))
HAIR_COLOURS: tuple[RGB, ...] = ((30, 22, 18), (80, 50, 30), (150, 100, 50), (220, 190, 120), (120, 40, 25))


@dataclass
class Look:
    """Everything that makes a product look like itself."""

    shape: str
    palette: int
    pattern_family: int
    primary: RGB
    secondary: RGB
    trim: RGB
    pattern: str
    pattern_params: dict[str, float] = field(default_factory=dict)
    shape_params: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- sampling a look


def _jitter_colour(rng: np.random.Generator, base: RGB, hue: float, sat: float, val: float) -> RGB:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in base))
    h = (h + rng.uniform(-hue, hue)) % 1.0
    s = float(np.clip(s + rng.uniform(-sat, sat), 0.0, 1.0))
    v = float(np.clip(v + rng.uniform(-val, val), 0.05, 1.0))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _pattern_params(rng: np.random.Generator, pattern: str) -> dict[str, float]:
    if pattern == "gradient":
        return {"angle": float(rng.uniform(0, math.pi))}
    if pattern == "colorblock":
        return {"angle": float(rng.choice([0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4])),
                "split": float(rng.uniform(0.3, 0.7))}
    if pattern == "stripes":
        return {"angle": float(rng.choice([0.0, math.pi / 2, math.pi / 4, rng.uniform(0, math.pi)])),
                "period": float(rng.uniform(0.06, 0.22)), "duty": float(rng.uniform(0.25, 0.6))}
    if pattern == "checks":
        return {"cell": float(rng.uniform(0.07, 0.2)), "angle": float(rng.choice([0.0, math.pi / 4]))}
    if pattern == "plaid":
        return {"period": float(rng.uniform(0.12, 0.28)), "width": float(rng.uniform(0.15, 0.35))}
    if pattern == "dots":
        return {"spacing": float(rng.uniform(0.08, 0.2)), "radius": float(rng.uniform(0.18, 0.4)),
                "stagger": float(rng.integers(0, 2))}
    if pattern == "confetti":
        return {"count": float(rng.integers(25, 90)), "size": float(rng.uniform(0.02, 0.06)),
                "seed": float(rng.integers(0, 2**31 - 1))}
    return {}


def _shape_params(rng: np.random.Generator, shape: str) -> dict[str, float]:
    u = rng.uniform
    if shape == "shoes":
        return {"heel": float(rng.choice([0.0, 0.0, u(0.06, 0.22)])), "shaft": float(u(0.1, 0.5)),
                "toe": float(u(0, 1)), "sole": float(u(0.025, 0.07)), "laces": float(rng.integers(0, 2))}
    if shape == "top":
        return {"sleeve": float(rng.choice([0.0, 0.13, 0.3])), "half_width": float(u(0.16, 0.24)),
                "length": float(u(0.45, 0.7)), "neck": float(rng.integers(0, 3)), "collar": float(rng.integers(0, 2))}
    if shape == "coat":
        return {"half_width": float(u(0.19, 0.25)), "length": float(u(0.62, 0.8)), "sleeve": float(u(0.36, 0.46)),
                "lapel": float(u(0.15, 0.35)), "buttons": float(rng.integers(0, 5)), "belt": float(rng.integers(0, 2))}
    if shape in ("pants", "shorts"):
        return {"leg": float(u(0.05, 0.14) if shape == "pants" else u(0.09, 0.16)),
                "length": float(u(0.78, 0.86) if shape == "pants" else u(0.36, 0.55)),
                "waist": float(u(0.03, 0.07))}
    if shape == "skirt":
        return {"length": float(u(0.3, 0.8)), "flare": float(u(0.03, 0.25)), "waist": float(u(0.03, 0.07)),
                "pleats": float(rng.integers(0, 2))}
    if shape == "bag":
        return {"kind": float(rng.integers(0, 3)), "width": float(u(0.5, 0.72)), "height": float(u(0.35, 0.55)),
                "handle": float(u(0.02, 0.06)), "flap": float(rng.integers(0, 2))}
    if shape == "sunglasses":
        return {"lens": float(rng.integers(0, 3)), "radius": float(u(0.12, 0.18)), "frame": float(u(0.015, 0.045))}
    if shape == "earrings":
        return {"kind": float(rng.integers(0, 3)), "size": float(u(0.5, 1.0))}
    if shape == "necklace":
        return {"pendant": float(rng.integers(0, 3)), "size": float(u(0.08, 0.16)), "depth": float(u(0.35, 0.6))}
    raise ValueError(f"no drawing for shape {shape!r}")


def sample_look(rng: np.random.Generator, shape: str, palette: int, pattern_family: int) -> Look:
    """A random product look of one shape within one style (palette family + pattern family)."""
    bases = PALETTES[palette][1]
    order = rng.permutation(len(bases))
    primary = _jitter_colour(rng, bases[order[0]], 0.03, 0.12, 0.12)
    # Secondary from the same family (mostly) or a neutral, so products of a family stay close.
    if rng.random() < 0.75:
        secondary = _jitter_colour(rng, bases[order[1]], 0.03, 0.12, 0.12)
    else:
        secondary = _jitter_colour(rng, ((245, 245, 245), (20, 20, 20))[int(rng.integers(0, 2))], 0.0, 0.05, 0.05)
    if shape == "sunglasses":  # tinted lenses are darker than the palette colour
        primary = tuple(int(c * 0.55) for c in primary)  # type: ignore[assignment]
    if shape in ("earrings", "necklace", "sunglasses"):
        trim = _jitter_colour(rng, METALS[int(rng.integers(0, len(METALS)))], 0.01, 0.05, 0.05)
    else:
        trim = secondary if rng.random() < 0.6 else _jitter_colour(rng, bases[order[2]], 0.03, 0.1, 0.1)
    patterns = PATTERN_FAMILIES[pattern_family][1]
    pattern = str(patterns[int(rng.integers(0, len(patterns)))])
    return Look(shape, palette, pattern_family, primary, secondary, trim, pattern,
                _pattern_params(rng, pattern), _shape_params(rng, shape))


# ---------------------------------------------------------------- patterns


def pattern_image(look: Look, size: int) -> np.ndarray:
    """The look's fabric as a float32 [size, size, 3] array in 0..255, in the item's own unit coordinates."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(grid, grid)
    a = np.asarray(look.primary, dtype=np.float32)
    b = np.asarray(look.secondary, dtype=np.float32)
    p = look.pattern_params
    if look.pattern == "solid":
        t = np.zeros_like(u)
    elif look.pattern == "gradient":
        proj = u * math.cos(p["angle"]) + v * math.sin(p["angle"])
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    elif look.pattern == "colorblock":
        proj = (u - 0.5) * math.cos(p["angle"]) + (v - 0.5) * math.sin(p["angle"]) + 0.5
        t = (proj > p["split"]).astype(np.float32)
    elif look.pattern == "stripes":
        proj = u * math.cos(p["angle"]) + v * math.sin(p["angle"])
        t = (np.mod(proj / p["period"], 1.0) < p["duty"]).astype(np.float32)
    elif look.pattern == "checks":
        c, s = math.cos(p["angle"]), math.sin(p["angle"])
        x, y = (u * c - v * s) / p["cell"], (u * s + v * c) / p["cell"]
        t = np.mod(np.floor(x) + np.floor(y), 2).astype(np.float32)
    elif look.pattern == "plaid":
        band_u = np.mod(u / p["period"], 1.0) < p["width"]
        band_v = np.mod(v / p["period"], 1.0) < p["width"]
        t = 0.5 * band_u.astype(np.float32) + 0.5 * band_v.astype(np.float32)
    elif look.pattern == "dots":
        s = p["spacing"]
        x = u / s + (0.5 * np.floor(v / s) if p["stagger"] else 0.0)
        y = v / s
        dist = np.hypot(np.mod(x, 1.0) - 0.5, np.mod(y, 1.0) - 0.5)
        t = (dist < p["radius"]).astype(np.float32)
    elif look.pattern == "confetti":
        local = np.random.default_rng(int(p["seed"]))
        t = np.zeros_like(u)
        centres = local.uniform(0, 1, size=(int(p["count"]), 2)).astype(np.float32)
        for cx, cy in centres:
            t = np.maximum(t, (np.abs(u - cx) + np.abs(v - cy) < p["size"]).astype(np.float32))
    else:
        raise ValueError(f"unknown pattern {look.pattern!r}")
    return a * (1.0 - t[..., None]) + b * t[..., None]


# ---------------------------------------------------------------- shapes


class _Canvas:
    """Two masks in unit coordinates: `main` is filled with the pattern, `trim` with the trim colour."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.main = Image.new("L", (size, size), 0)
        self.trim = Image.new("L", (size, size), 0)
        self._draw = {"main": ImageDraw.Draw(self.main), "trim": ImageDraw.Draw(self.trim)}

    def _pts(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.size, y * self.size) for x, y in points]

    def polygon(self, layer: str, points: list[tuple[float, float]], fill: int = 255) -> None:
        self._draw[layer].polygon(self._pts(points), fill=fill)

    def ellipse(self, layer: str, box: tuple[float, float, float, float], fill: int | None = 255,
                outline: int | None = None, width: float = 0.0) -> None:
        x0, y0, x1, y1 = (c * self.size for c in box)
        self._draw[layer].ellipse((x0, y0, x1, y1), fill=fill, outline=outline,
                                  width=max(1, int(round(width * self.size))) if outline is not None else 1)

    def line(self, layer: str, points: list[tuple[float, float]], width: float, fill: int = 255) -> None:
        self._draw[layer].line(self._pts(points), fill=fill, width=max(1, int(round(width * self.size))))

    def arc(self, layer: str, box: tuple[float, float, float, float], start: float, end: float, width: float) -> None:
        x0, y0, x1, y1 = (c * self.size for c in box)
        self._draw[layer].arc((x0, y0, x1, y1), start, end, fill=255, width=max(1, int(round(width * self.size))))


def _draw_shoe(c: _Canvas, s: dict[str, float]) -> None:
    g, h, sole, shaft, toe = 0.8, s["heel"], s["sole"], s["shaft"], s["toe"]
    c.polygon("main", [
        (0.1, g - h - sole), (0.11, g - h - sole - shaft), (0.36, g - h * 0.5 - sole - shaft * 0.8),
        (0.55, g - sole - 0.17 - 0.04 * toe), (0.8, g - sole - 0.1 - 0.05 * toe), (0.93 - 0.03 * toe, g - sole - 0.02),
        (0.9, g - sole), (0.55, g - sole),
    ])
    c.polygon("trim", [(0.1, g - h - sole), (0.55, g - sole), (0.93, g - sole), (0.93, g), (0.55, g), (0.1, g - h)])
    if h > 0.04:
        c.polygon("trim", [(0.1, g - h), (0.2, g - h), (0.17, g), (0.13, g)])
    if s["laces"]:
        for i in range(3):
            x = 0.42 + 0.07 * i
            y = g - sole - 0.16 - 0.02 * (2 - i) + 0.02 * i
            c.line("trim", [(x - 0.03, y - 0.04), (x + 0.03, y + 0.02)], 0.02)


def _draw_top(c: _Canvas, s: dict[str, float], coat: bool = False) -> None:
    hw, length, sleeve = s["half_width"], s["length"], s["sleeve"]
    top = 0.12
    c.polygon("main", [(0.5 - hw - 0.02, top), (0.5 + hw + 0.02, top), (0.5 + hw, top + length),
                       (0.5 - hw, top + length)])
    if sleeve > 0:
        dx, dy = math.sin(math.radians(32)), math.cos(math.radians(32))
        for side in (-1, 1):
            shoulder = (0.5 + side * (hw + 0.02), top)
            armpit = (0.5 + side * hw, top + 0.17)
            end_s = (shoulder[0] + side * dx * (sleeve + 0.08), shoulder[1] + dy * (sleeve + 0.08))
            end_a = (armpit[0] + side * dx * sleeve, armpit[1] + dy * sleeve)
            c.polygon("main", [shoulder, end_s, end_a, armpit])
            if coat:
                c.line("trim", [end_s, end_a], 0.03)
    if coat:
        lapel = s["lapel"]
        c.polygon("trim", [(0.5 - 0.07, top), (0.5, top + lapel + 0.1), (0.5 - 0.12, top + lapel * 0.6)])
        c.polygon("trim", [(0.5 + 0.07, top), (0.5, top + lapel + 0.1), (0.5 + 0.12, top + lapel * 0.6)])
        c.line("trim", [(0.5, top + lapel + 0.1), (0.5, top + length)], 0.012)
        for i in range(int(s["buttons"])):
            y = top + lapel + 0.14 + i * 0.08
            if y < top + length - 0.03:
                c.ellipse("trim", (0.52, y - 0.015, 0.55, y + 0.015))
        if s["belt"]:
            y = top + length * 0.5
            c.polygon("trim", [(0.5 - hw, y), (0.5 + hw, y), (0.5 + hw, y + 0.035), (0.5 - hw, y + 0.035)])
        return
    neck = int(s["neck"])
    if neck == 0:
        c.ellipse("main", (0.43, top - 0.05, 0.57, top + 0.06), fill=0)
    elif neck == 1:
        c.polygon("main", [(0.42, top - 0.01), (0.58, top - 0.01), (0.5, top + 0.14)], fill=0)
    else:
        c.polygon("main", [(0.4, top - 0.01), (0.6, top - 0.01), (0.58, top + 0.03), (0.42, top + 0.03)], fill=0)
    if s["collar"]:
        c.polygon("trim", [(0.5 - hw, top + length - 0.04), (0.5 + hw, top + length - 0.04),
                           (0.5 + hw, top + length), (0.5 - hw, top + length)])


def _draw_legs(c: _Canvas, s: dict[str, float]) -> None:
    leg, length, waist = s["leg"] * 0.85, s["length"], s["waist"]
    top, hip, half = 0.08, 0.3, 0.17
    bottom = top + waist + length
    c.polygon("main", [(0.5 - half, top + waist), (0.5 + half, top + waist), (0.5 + half + 0.01, hip),
                       (0.5 - half - 0.01, hip)])
    for side in (-1, 1):
        inner = 0.5 + side * 0.01
        c.polygon("main", [(0.5 + side * half, top + waist), (0.5 + side * (half + 0.01), hip),
                           (inner + side * 2 * leg, bottom), (inner, bottom), (inner, hip), (0.5, hip - 0.02)])
    c.polygon("trim", [(0.5 - half, top), (0.5 + half, top), (0.5 + half, top + waist), (0.5 - half, top + waist)])


def _draw_skirt(c: _Canvas, s: dict[str, float]) -> None:
    top, waist, length, flare = 0.1, s["waist"], s["length"], s["flare"]
    hw = 0.19
    bottom = top + waist + length
    c.polygon("main", [(0.5 - hw, top + waist), (0.5 + hw, top + waist), (0.5 + hw + flare, bottom),
                       (0.5 - hw - flare, bottom)])
    c.polygon("trim", [(0.5 - hw, top), (0.5 + hw, top), (0.5 + hw, top + waist), (0.5 - hw, top + waist)])
    if s["pleats"]:
        for i in range(1, 6):
            f = i / 6
            c.line("trim", [(0.5 - hw + 2 * hw * f, top + waist + 0.05),
                            (0.5 - hw - flare + 2 * (hw + flare) * f, bottom - 0.01)], 0.008)


def _draw_bag(c: _Canvas, s: dict[str, float]) -> None:
    kind, w, h, handle = int(s["kind"]), s["width"], s["height"], s["handle"]
    top, bottom = 0.9 - h, 0.9
    slant = 0.06 if kind == 1 else 0.0
    c.polygon("main", [(0.5 - w / 2 + slant, top), (0.5 + w / 2 - slant, top), (0.5 + w / 2, bottom),
                       (0.5 - w / 2, bottom)])
    if kind != 2:  # a clutch has no handle
        reach = 0.28 if kind == 0 else 0.18
        c.arc("trim", (0.5 - w * 0.3, top - reach, 0.5 + w * 0.3, top + reach), 180, 360, handle)
    if s["flap"]:
        c.polygon("trim", [(0.5 - w / 2 + slant, top), (0.5 + w / 2 - slant, top), (0.5, top + h * 0.45)])


def _draw_sunglasses(c: _Canvas, s: dict[str, float]) -> None:
    lens, r, frame = int(s["lens"]), s["radius"], s["frame"]
    for side in (-1, 1):
        cx, cy = 0.5 + side * (r + 0.045), 0.5
        box = (cx - r, cy - r * 0.8, cx + r, cy + r * 0.8)
        if lens == 0:
            c.ellipse("trim", box)
            c.ellipse("main", (box[0] + frame, box[1] + frame, box[2] - frame, box[3] - frame))
        else:
            lift = 0.06 if lens == 2 else 0.0
            outer = [(box[0], box[1] - lift), (box[2], box[1]), (box[2] - 0.02, box[3]), (box[0] + 0.02, box[3])]
            if side < 0 and lens == 2:
                outer = [(box[0], box[1]), (box[2], box[1] - lift), (box[2] - 0.02, box[3]), (box[0] + 0.02, box[3])]
            c.polygon("trim", outer)
            inner = [(x + (frame if x < cx else -frame), y + (frame if y < cy else -frame)) for x, y in outer]
            c.polygon("main", inner)
        c.line("trim", [(cx + side * r, 0.45), (cx + side * (r + 0.04), 0.42)], frame)
    c.line("trim", [(0.5 - 0.05, 0.45), (0.5, 0.43), (0.5 + 0.05, 0.45)], frame)


def _draw_earring(c: _Canvas, s: dict[str, float]) -> None:
    kind, k = int(s["kind"]), s["size"]
    c.ellipse("trim", (0.46, 0.1, 0.54, 0.18))
    if kind == 0:  # hoop with a bead
        c.ellipse("trim", (0.5 - 0.25 * k, 0.16, 0.5 + 0.25 * k, 0.16 + 0.5 * k), fill=None, outline=255, width=0.04)
        c.ellipse("main", (0.5 - 0.1 * k, 0.16 + 0.4 * k, 0.5 + 0.1 * k, 0.16 + 0.6 * k))
    elif kind == 1:  # drop
        c.line("trim", [(0.5, 0.16), (0.5, 0.3)], 0.025)
        c.polygon("main", [(0.5, 0.28), (0.5 + 0.2 * k, 0.3 + 0.45 * k), (0.5, 0.3 + 0.65 * k),
                           (0.5 - 0.2 * k, 0.3 + 0.45 * k)])
    else:  # tassel
        c.line("trim", [(0.5, 0.16), (0.5, 0.26)], 0.025)
        c.polygon("main", [(0.5 - 0.06 * k, 0.26), (0.5 + 0.06 * k, 0.26), (0.5 + 0.16 * k, 0.3 + 0.6 * k),
                           (0.5 - 0.16 * k, 0.3 + 0.6 * k)])


def _draw_necklace(c: _Canvas, s: dict[str, float]) -> None:
    kind, size, depth = int(s["pendant"]), s["size"], s["depth"]
    c.arc("trim", (0.18, 0.15 - depth, 0.82, 0.15 + depth), 0, 180, 0.02)
    cy = 0.15 + depth + size * 0.8
    if kind == 0:
        c.ellipse("main", (0.5 - size, cy - size, 0.5 + size, cy + size))
    elif kind == 1:
        c.polygon("main", [(0.5, cy - size * 1.2), (0.5 + size, cy), (0.5, cy + size * 1.2), (0.5 - size, cy)])
    else:
        c.polygon("main", [(0.5 - size, cy - size), (0.5 + size, cy - size), (0.5, cy + size * 1.3)])
    c.ellipse("trim", (0.485, 0.15 + depth - 0.015, 0.515, 0.15 + depth + 0.03))


def sprite_layers(look: Look, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The item's unshaded colours [size, size, 3] (0..255), its coverage and its interior (coverage less the
    one-pixel rim that `render_sprite` darkens), both [size, size] in 0..1."""
    canvas = _Canvas(size)
    drawers = {"shoes": _draw_shoe, "top": _draw_top, "pants": _draw_legs, "shorts": _draw_legs,
               "skirt": _draw_skirt, "bag": _draw_bag, "sunglasses": _draw_sunglasses,
               "earrings": _draw_earring, "necklace": _draw_necklace}
    if look.shape == "coat":
        _draw_top(canvas, look.shape_params, coat=True)
    else:
        drawers[look.shape](canvas, look.shape_params)
    main = np.asarray(canvas.main, dtype=np.float32) / 255.0
    trim = np.asarray(canvas.trim, dtype=np.float32) / 255.0
    rgb = pattern_image(look, size) * (1.0 - trim[..., None]) + np.asarray(look.trim, np.float32) * trim[..., None]
    alpha = np.maximum(main, trim)
    eroded = alpha.copy()
    eroded[1:] = np.minimum(eroded[1:], alpha[:-1])
    eroded[:-1] = np.minimum(eroded[:-1], alpha[1:])
    eroded[:, 1:] = np.minimum(eroded[:, 1:], alpha[:, :-1])
    eroded[:, :-1] = np.minimum(eroded[:, :-1], alpha[:, 1:])
    return rgb, alpha, eroded


def render_sprite(look: Look, size: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The item alone as RGBA cropped to its content, and that crop's box in the canvas' unit coordinates."""
    rgb, alpha, eroded = sprite_layers(look, size)
    # A darker rim keeps the silhouette readable on any background, as seams and shadows do in photos.
    rgb *= 1.0 - 0.35 * (alpha - eroded)[..., None]
    rgba = np.dstack([np.clip(rgb, 0, 255), alpha * 255.0]).astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    box = image.getchannel("A").getbbox() or (0, 0, size, size)
    return image.crop(box), (box[0] / size, box[1] / size, box[2] / size, box[3] / size)


def product_image(look: Look, size: int, background: RGB) -> Image.Image:
    """The catalogue photo: the item centred on a plain light background (earrings as a pair)."""
    sprite, _ = render_sprite(look, 2 * size)
    if look.shape == "earrings":
        pair = Image.new("RGBA", (sprite.width * 3, sprite.height), (0, 0, 0, 0))
        pair.paste(sprite, (0, 0))
        pair.paste(sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (sprite.width * 2, 0))
        sprite = pair
    scale = 0.84 * size / max(sprite.width, sprite.height)
    w, h = max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale))
    sprite = sprite.resize((w, h), Image.Resampling.LANCZOS)
    photo = Image.new("RGB", (size, size), background)
    photo.paste(sprite, ((size - w) // 2, (size - h) // 2), sprite)
    return photo


# ---------------------------------------------------------------- scenes

# Painting order: later items cover earlier ones, as clothes do (the coat over the top, the bag over both).
LAYER_ORDER = ("shoes", "pants", "shorts", "skirt", "top", "coat", "necklace", "sunglasses", "earrings", "bag")
MIN_BOX_PIXELS = 6
NOISE_TILE = 1024  # an item clipped to fewer pixels than this a side is not labelled


@dataclass(frozen=True)
class Figure:
    """Body landmarks of the person in a scene, in pixels."""

    cx: float
    top: float
    unit: float  # one head height; the figure is 8 units tall
    skin: RGB
    hair: RGB
    long_hair: bool
    facing: int  # -1 or 1: the side whose ear shows the earring

    def y(self, units: float) -> float:
        return self.top + units * self.unit

    def x(self, units: float) -> float:
        return self.cx + units * self.unit


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    # Sensor noise is cut from one fixed tile at a random offset: the same bytes for a seed, and far
    # cheaper than drawing fresh normals for every pixel of every scene.
    return np.random.default_rng(20240611).standard_normal(size=(NOISE_TILE, NOISE_TILE, 3), dtype=np.float32)


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    tile = _noise_tile()
    if height > NOISE_TILE or width > NOISE_TILE:
        return rng.standard_normal(size=(height, width, 3), dtype=np.float32)
    y, x = int(rng.integers(0, NOISE_TILE - height + 1)), int(rng.integers(0, NOISE_TILE - width + 1))
    return tile[y:y + height, x:x + width]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = rng.uniform(60, 230, size=3).astype(np.float32)
    other = np.clip(base + rng.normal(0, 45, size=3), 0, 255).astype(np.float32)
    kind = int(rng.integers(0, 3))
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    if kind == 0:  # smooth gradient
        t = np.broadcast_to(ys, (height, width, 1))
    elif kind == 1:  # blotchy low-frequency texture, like a wall or foliage out of focus
        coarse = rng.uniform(0, 1, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height),
                       Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255.0
    else:  # wall and floor
        horizon = rng.uniform(0.6, 0.85)
        t = np.broadcast_to((ys > horizon).astype(np.float32), (height, width, 1))
    image = base * (1.0 - t) + other * t
    return image + rng.uniform(2, 8) * _noise(rng, height, width)[..., :1]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """A few out-of-focus shapes: furniture, plants, passers-by that are not products."""
    for _ in range(int(rng.integers(0, 4))):
        colour = tuple(int(c) for c in rng.uniform(30, 230, size=3))
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.5) * width, y0 + rng.uniform(0.1, 0.6) * height
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)


def _sample_figure(rng: np.random.Generator, width: int, height: int) -> Figure:
    fig_height = height * rng.uniform(0.8, 0.95)
    top = rng.uniform(0.01, 0.99) * (height - fig_height)
    cx = width * (0.5 + rng.uniform(-0.12, 0.12))
    return Figure(cx, top, fig_height / 8.0, SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))],
                  HAIR_COLOURS[int(rng.integers(0, len(HAIR_COLOURS)))], bool(rng.random() < 0.5),
                  int(rng.choice([-1, 1])))


def _draw_body(draw: ImageDraw.ImageDraw, f: Figure) -> None:
    skin, u = f.skin, f.unit
    if f.long_hair:
        draw.rectangle((f.x(-0.5), f.y(0.3), f.x(0.5), f.y(1.7)), fill=f.hair)
    for side in (-1, 1):  # legs, then arms in a relaxed A pose
        draw.polygon([(f.x(side * 0.05), f.y(3.6)), (f.x(side * 0.7), f.y(3.4)), (f.x(side * 0.45), f.y(7.6)),
                      (f.x(side * 0.15), f.y(7.6))], fill=skin)
        draw.polygon([(f.x(side * 0.85), f.y(1.35)), (f.x(side * 1.05), f.y(1.5)), (f.x(side * 1.45), f.y(3.9)),
                      (f.x(side * 1.2), f.y(4.0))], fill=skin)
        draw.ellipse((f.x(side * 1.33) - 0.17 * u, f.y(3.95) - 0.17 * u, f.x(side * 1.33) + 0.17 * u,
                      f.y(3.95) + 0.2 * u), fill=skin)
    draw.polygon([(f.x(-0.9), f.y(1.3)), (f.x(0.9), f.y(1.3)), (f.x(0.65), f.y(3.0)), (f.x(0.75), f.y(3.7)),
                  (f.x(-0.75), f.y(3.7)), (f.x(-0.65), f.y(3.0))], fill=skin)
    draw.rectangle((f.x(-0.15), f.y(0.8), f.x(0.15), f.y(1.35)), fill=skin)
    draw.ellipse((f.x(-0.38), f.y(0.0), f.x(0.38), f.y(1.0)), fill=skin)
    draw.ellipse((f.x(-0.48), f.y(0.35), f.x(-0.3), f.y(0.68)), fill=skin)  # ears
    draw.ellipse((f.x(0.3), f.y(0.35), f.x(0.48), f.y(0.68)), fill=skin)
    draw.chord((f.x(-0.42), f.y(-0.08), f.x(0.42), f.y(0.75)), 180, 360, fill=f.hair)


def _plain_garment(shape: str, rng: np.random.Generator) -> Look:
    """An unlabelled neutral garment, so a figure without a product top or bottom is still dressed."""
    grey = int(rng.choice([30, 60, 200, 235]))
    colour = (grey, grey, grey + int(rng.integers(-10, 10)))
    params = _shape_params(rng, shape)
    return Look(shape, 2, 0, colour, colour, colour, "solid", {}, params)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Anchor:
    """Where a shape is worn: the point (pixels) its content's top, center or bottom goes to, the width of
    its whole drawing canvas (so a sleeveless top is narrower than a long-sleeved one), and a vertical stretch."""

    x: float
    y: float
    canvas: float
    mode: str
    stretch: float = 1.0


def _anchor(shape: str, f: Figure) -> _Anchor:
    u = f.unit
    table = {
        "shoes": _Anchor(f.cx, f.y(8.0), 1.2 * u, "bottom"),
        "pants": _Anchor(f.cx, f.y(2.85), 4.5 * u, "top", 1.08),
        "shorts": _Anchor(f.cx, f.y(2.85), 4.5 * u, "top"),
        "skirt": _Anchor(f.cx, f.y(2.85), 4.0 * u, "top"),
        "top": _Anchor(f.cx, f.y(1.25), 4.3 * u, "top"),
        "coat": _Anchor(f.cx, f.y(1.2), 4.4 * u, "top"),
        "necklace": _Anchor(f.cx, f.y(1.05), 1.2 * u, "top"),
        "sunglasses": _Anchor(f.cx, f.y(0.48), 1.3 * u, "center"),
        "earrings": _Anchor(f.x(0.4 * f.facing), f.y(0.58), 0.8 * u, "top"),
        "bag": _Anchor(f.x(1.35 * f.facing), f.y(3.75), 2.0 * u, "top"),
    }
    return table[shape]


def _perspective_coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> list[float]:
    """PIL PERSPECTIVE data mapping output points `dst` to input points `src`."""
    rows, rhs = [], []
    for (x, y), (sx, sy) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -sx * x, -sx * y])
        rows.append([0, 0, 0, x, y, 1, -sy * x, -sy * y])
        rhs.extend([sx, sy])
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64)).tolist()


def _lit(sprite: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Per-item light: a gain, a colour cast and soft fabric folds."""
    array = np.asarray(sprite, dtype=np.float32)
    h, w = array.shape[:2]
    gain = rng.uniform(0.82, 1.1) * rng.uniform(0.94, 1.06, size=3)
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    folds = 1.0 + rng.uniform(0.0, 0.12) * np.sin(2 * math.pi * rng.uniform(1.0, 3.5) * xs + rng.uniform(0, 6.3))
    array[..., :3] = np.clip(array[..., :3] * gain[None, None, :] * folds[..., None], 0, 255)
    return Image.fromarray(array.astype(np.uint8), "RGBA")


def _place(scene: Image.Image, sprite: Image.Image, rng: np.random.Generator, x: float, y: float, width: float,
           height: float, mode: str) -> tuple[int, int, int, int] | None:
    """Warp `sprite` (scale, rotation, perspective) onto `scene` at an anchor; return its pixel box."""
    width *= rng.uniform(0.92, 1.08)
    height *= rng.uniform(0.92, 1.08)
    x += rng.uniform(-0.04, 0.04) * width
    y += rng.uniform(-0.03, 0.03) * height
    left = x - width / 2
    top = {"top": y, "center": y - height / 2, "bottom": y - height}[mode]
    sprite = _lit(sprite.resize((max(2, round(width)), max(2, round(height))), Image.Resampling.LANCZOS), rng)
    angle = math.radians(rng.uniform(-6, 6))
    cx, cy = left + width / 2, top + height / 2
    corners = []
    for px, py in ((0, 0), (width, 0), (width, height), (0, height)):
        dx, dy = px - width / 2 + rng.uniform(-0.05, 0.05) * width, py - height / 2 + rng.uniform(-0.05, 0.05) * height
        cos, sin = math.cos(angle), math.sin(angle)
        corners.append((cx + dx * cos - dy * sin, cy + dx * sin + dy * cos))
    x0, y0 = math.floor(min(p[0] for p in corners)), math.floor(min(p[1] for p in corners))
    x1, y1 = math.ceil(max(p[0] for p in corners)), math.ceil(max(p[1] for p in corners))
    local = [(px - x0, py - y0) for px, py in corners]
    src = [(0, 0), (sprite.width, 0), (sprite.width, sprite.height), (0, sprite.height)]
    patch = sprite.transform((x1 - x0, y1 - y0), Image.Transform.PERSPECTIVE, _perspective_coeffs(local, src),
                             Image.Resampling.BILINEAR)
    scene.paste(patch, (x0, y0), patch)
    box = patch.getchannel("A").point(lambda a: 255 if a > 40 else 0).getbbox()
    if box is None:
        return None
    bx0, by0 = max(0, x0 + box[0]), max(0, y0 + box[1])
    bx1, by1 = min(scene.width, x0 + box[2]), min(scene.height, y0 + box[3])
    if bx1 - bx0 < MIN_BOX_PIXELS or by1 - by0 < MIN_BOX_PIXELS:
        return None
    return bx0, by0, bx1, by1


def _union(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    if not boxes:
        return None
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def _worn_sprite(look: Look, anchor: _Anchor, rng: np.random.Generator, open_front: bool
                 ) -> tuple[Image.Image, float, float, float]:
    """The lit sprite, its size in the scene and the x of its content's centre."""
    # Drawn a little larger than in the scene, then reduced: anti-aliased at little cost.
    size = int(min(256, max(48, 1.3 * anchor.canvas)))
    sprite, (x0, y0, x1, y1) = render_sprite(look, size)
    if open_front:  # a coat worn open over a top shows the top down the middle
        alpha = np.asarray(sprite.getchannel("A")).copy()
        gap = rng.uniform(0.14, 0.22) * sprite.width
        alpha[:, int(sprite.width / 2 - gap): int(sprite.width / 2 + gap) + 1] = 0
        sprite.putalpha(Image.fromarray(alpha))
    width, height = anchor.canvas * (x1 - x0), anchor.canvas * (y1 - y0) * anchor.stretch
    return sprite, width, height, anchor.x + anchor.canvas * ((x0 + x1) / 2 - 0.5)


def render_scene(looks: list[Look], rng: np.random.Generator, width: int, height: int
                 ) -> tuple[Image.Image, list[tuple[float, float, float, float] | None]]:
    """A photo of a person wearing `looks` (distinct shapes) and each item's normalised bbox (None if unseen)."""
    shapes = [look.shape for look in looks]
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"a scene needs items of distinct shapes, got {shapes}")
    # The background is drawn at a quarter of the size, blurred and enlarged: a shallow depth of field, cheaply.
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    backdrop = Image.fromarray(np.clip(_background(rng, small_w, small_h), 0, 255).astype(np.uint8), "RGB")
    _clutter(ImageDraw.Draw(backdrop), rng, small_w, small_h)
    backdrop = backdrop.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    scene = backdrop.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(scene)
    figure = _sample_figure(rng, width, height)
    _draw_body(draw, figure)

    worn = dict(zip(shapes, looks, strict=True))
    if not BOTTOMS & set(worn):
        worn["pants"] = _plain_garment("pants", rng)
    if "top" not in worn and "coat" not in worn:
        worn["top"] = _plain_garment("top", rng)
    if "shoes" not in worn:
        worn["shoes"] = _plain_garment("shoes", rng)
    boxes: dict[str, tuple[int, int, int, int] | None] = {}
    for shape in LAYER_ORDER:
        if shape not in worn:
            continue
        anchor = _anchor(shape, figure)
        sprite, item_w, item_h, x = _worn_sprite(worn[shape], anchor, rng, shape == "coat" and "top" in worn)
        if shape == "shoes":
            mirrored = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pair = [_place(scene, mirrored, rng, x - 0.45 * figure.unit, anchor.y, item_w, item_h, anchor.mode),
                    _place(scene, sprite, rng, x + 0.45 * figure.unit, anchor.y, item_w, item_h, anchor.mode)]
            boxes[shape] = _union([box for box in pair if box is not None])
            continue
        if shape == "earrings":  # the far ear's earring, half hidden by the head
            _place(scene, sprite, rng, figure.x(-0.4 * figure.facing), anchor.y, item_w * 0.7, item_h * 0.7,
                   anchor.mode)
        boxes[shape] = _place(scene, sprite, rng, x, anchor.y, item_w, item_h, anchor.mode)
    if rng.random() < 0.3:  # a hand across the waist hides part of whatever is there
        side = figure.facing * -1
        draw = ImageDraw.Draw(scene)
        draw.polygon([(figure.x(side * 1.2), figure.y(2.2)), (figure.x(side * 1.0), figure.y(2.0)),
                      (figure.x(side * -0.1), figure.y(2.9)), (figure.x(side * 0.0), figure.y(3.2))], fill=figure.skin)
    scene = _photo_effects(scene, rng)
    normalised = []
    for shape in shapes:
        box = boxes.get(shape)
        normalised.append(None if box is None else (box[0] / width, box[1] / height, box[2] / width, box[3] / height))
    return scene, normalised


def _photo_effects(scene: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera and light: exposure, white balance, contrast, a light falloff, blur and sensor noise."""
    if rng.random() < 0.7:
        scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
    array = np.asarray(scene, dtype=np.float32)
    h, w = array.shape[:2]
    gain = rng.uniform(0.82, 1.15) * rng.uniform(0.92, 1.08, size=3)
    mean = array.mean()
    array = (array - mean) * rng.uniform(0.85, 1.12) + mean
    angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.3)
    xs = (np.arange(w, dtype=np.float32) / w - 0.5) * math.cos(angle) * strength
    ys = (np.arange(h, dtype=np.float32) / h - 0.5) * math.sin(angle) * strength
    array *= gain.astype(np.float32)[None, None, :]
    array *= (1.0 + ys[:, None] + xs[None, :])[..., None]
    array += rng.uniform(1.0, 5.0) * _noise(rng, h, w)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")
