"""The synthetic catalogue: STL format, determinism, realistic statistics and cheap learnability proxies."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.split import split_by_scene
from training.data.stl import Pair, STLDataset, short_name
from training.data.synth import plan as synth_plan
from training.data.synth.draw import BOTTOMS, SHAPE_OF_CATEGORY, render_scene, sample_look
from training.data.synth.plan import FALLBACK_CATEGORIES, SynthConfig, generate, load_category_counts, plan
from training.errors import DataError

TINY = SynthConfig(scenes=30, products=40, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(out, TINY)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_in_parallel_too_and_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", TINY, workers=2)
    assert _files(tmp_path / "again") == _files(tiny)
    assert again.pairs == len((tiny / "pairs.jsonl").read_text().splitlines())
    other = SynthConfig(scenes=TINY.scenes, products=TINY.products, seed=1)
    generate(tmp_path / "other", other)
    other_files, tiny_files = _files(tmp_path / "other"), _files(tiny)
    assert other_files["pairs.jsonl"] != tiny_files["pairs.jsonl"]
    assert set(other_files) != set(tiny_files)  # ids derive from the seed


def test_loads_with_the_real_stl_loader(tiny: Path) -> None:
    dataset = STLDataset.open(tiny, on_error="raise")
    assert dataset.report.skipped == 0
    listings = TINY.products + round(TINY.duplicate_rate * TINY.products)  # the duplicates are catalogue-only
    assert len(dataset.categories) == listings
    assert len(dataset.catalogue()) == listings
    assert len(list((tiny / "images" / "scenes").glob("*.jpg"))) == TINY.scenes
    assert len(dataset.pairs) >= 2 * TINY.scenes * 0.9  # 2-5 items per scene, a few may be out of frame
    hex_id = re.compile(r"^[0-9a-f]{32}$")
    assert all(hex_id.match(pid) for pid in dataset.categories.product_to_path)
    assert all(hex_id.match(pair.scene_id) for pair in dataset.pairs)
    with Image.open(dataset.scene_path(dataset.pairs[0].scene_id)) as scene:
        assert scene.size == (TINY.scene_width, TINY.scene_height) and scene.format == "JPEG"
    with Image.open(dataset.product_path(dataset.pairs[0].product_id)) as product:
        assert product.size == (TINY.product_size, TINY.product_size)
    record = json.loads((tiny / "synth.json").read_text())
    assert SynthConfig.from_dict(record["config"]) == TINY
    assert record["summary"]["pairs"] == len(dataset.pairs)


def test_bboxes_are_valid_and_not_degenerate(tiny: Path) -> None:
    pairs = STLDataset.open(tiny).pairs
    for pair in pairs:
        left, top, right, bottom = pair.bbox
        assert 0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0
        assert (right - left) * TINY.scene_width >= 6 and (bottom - top) * TINY.scene_height >= 6


def test_scenes_hold_distinct_categories_and_one_bottom_at_most(tiny: Path) -> None:
    dataset = STLDataset.open(tiny)
    by_scene: dict[str, list[str]] = {}
    for pair in dataset.pairs:
        by_scene.setdefault(pair.scene_id, []).append(dataset.categories.of(pair.product_id))
    assert len(by_scene) == TINY.scenes
    for categories in by_scene.values():
        assert len(categories) == len(set(categories))
        assert sum(SHAPE_OF_CATEGORY[short_name(c)] in BOTTOMS for c in categories) <= 1


def test_category_mix_follows_the_real_relative_sizes() -> None:
    catalogue = plan(SynthConfig(scenes=1, products=2000))
    counts = Counter(catalogue.product_paths)
    real_total = sum(count for _, count in FALLBACK_CATEGORIES)
    assert set(counts) == {path for path, _ in FALLBACK_CATEGORIES}
    for path, real in FALLBACK_CATEGORIES:
        assert abs(counts[path] - 2000 * real / real_total) <= 1.5
    assert counts.most_common(1)[0][0].endswith("|Shoes")


def test_category_source_file_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "fashion-cat.json"
    prefix = "Apparel & Accessories|"
    source.write_text(json.dumps({f"{i:032x}": prefix + ("Shoes" if i < 3 else "Jewelry|Earrings") for i in range(4)}))
    assert load_category_counts(source) == ((prefix + "Shoes", 3), (prefix + "Jewelry|Earrings", 1))
    assert load_category_counts(None) == FALLBACK_CATEGORIES  # ../shared's file or the built-in copy: same counts
    monkeypatch.setattr(synth_plan, "DEFAULT_CATEGORIES_SOURCE", tmp_path / "no-shared" / "fashion-cat.json")
    assert load_category_counts(None) == FALLBACK_CATEGORIES
    with pytest.raises(ValueError, match="does not exist"):
        load_category_counts(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="unknown categories"):
        SynthConfig(categories=(("Home|Sofas", 10),), products=10)


def test_category_source_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    # The fuzzer's case: a Latin-1 category file was a UnicodeDecodeError traceback.
    source = tmp_path / "fashion-cat.json"
    source.write_bytes(b'{"' + b"a" * 32 + b'": "Apparel & Accessories|Sho\xe9s"}')
    with pytest.raises(DataError, match=r"fashion-cat\.json:1: not UTF-8 text \(byte 0xe9 at position 63\)"):
        load_category_counts(source)


def test_popularity_is_long_tailed_but_far_from_perfect() -> None:
    config = SynthConfig(scenes=3000, products=2000)
    catalogue = plan(config)
    uses = Counter(i for items in catalogue.scene_items for i in items)
    ranked = sorted((uses.get(i, 0) for i in range(config.products)), reverse=True)
    top_share = sum(ranked[: config.products // 10]) / sum(ranked)
    assert top_share > 0.25  # 10% of the products hold well over 10% of the pairs
    assert ranked.count(0) > 0.02 * config.products  # cold-start products exist

    pairs = [Pair(catalogue.scene_ids[j], catalogue.product_ids[i], (0.0, 0.0, 1.0, 1.0))
             for j, items in enumerate(catalogue.scene_items) for i in items]
    split = split_by_scene(pairs, (0.8, 0.1, 0.1), seed=0)
    train_uses = Counter(pair.product_id for pair in split.train)
    category_of = dict(zip(catalogue.product_ids, catalogue.product_paths, strict=True))
    members: dict[str, list[str]] = {}
    for pid, path in category_of.items():
        members.setdefault(path, []).append(pid)
    rank = {pid: r for pids in members.values()
            for r, pid in enumerate(sorted(pids, key=lambda p: (-train_uses[p], p)))}
    hits = np.array([rank[pair.product_id] < 50 for pair in split.test])
    random_hr = np.mean([min(1.0, 50 / len(members[category_of[pair.product_id]])) for pair in split.test])
    assert random_hr + 0.1 < hits.mean() < 0.6


def _histogram(image: Image.Image, ignore: tuple[int, int, int] | None = None) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB").resize((48, 48)), dtype=np.int32).reshape(-1, 3)
    if ignore is not None:  # the product photo's plain background says nothing about the product
        pixels = pixels[np.abs(pixels - np.asarray(ignore)).sum(axis=1) > 30]
    bins = pixels // 64
    counts = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def test_scene_crops_are_not_copies_yet_match_their_product(tiny: Path) -> None:
    dataset = STLDataset.open(tiny)
    rng = np.random.default_rng(0)
    closer, total = 0, 0
    for pair in dataset.pairs:
        with Image.open(dataset.scene_path(pair.scene_id)) as scene:
            left, top, right, bottom = pair.bbox
            crop = scene.convert("RGB").crop((round(left * scene.width), round(top * scene.height),
                                              round(right * scene.width), round(bottom * scene.height)))
        with Image.open(dataset.product_path(pair.product_id)) as product:
            own = product.convert("RGB")
        difference = np.asarray(crop.resize((64, 64)), np.float32) - np.asarray(own.resize((64, 64)), np.float32)
        mse = float(np.mean(difference**2))
        assert mse > 500.0  # never a copy: distortions, context and occlusion change the pixels
        others = [p for p in dataset.categories.products_in(dataset.categories.of(pair.product_id))
                  if p != pair.product_id]
        if not others:
            continue
        with Image.open(dataset.product_path(others[int(rng.integers(0, len(others)))])) as product:
            other = product.convert("RGB")
        crop_histogram = _histogram(crop)
        distance_own = np.abs(crop_histogram - _histogram(own, own.getpixel((0, 0)))).sum()
        distance_other = np.abs(crop_histogram - _histogram(other, other.getpixel((0, 0)))).sum()
        closer += distance_own < distance_other
        total += 1
    assert total > 50 and closer / total > 0.65


def test_render_scene_refuses_two_items_of_one_shape() -> None:
    rng = np.random.default_rng(0)
    looks = [sample_look(rng, "shoes", 0, 0), sample_look(rng, "shoes", 1, 1)]
    with pytest.raises(ValueError, match="distinct"):
        render_scene(looks, rng, 128, 160)


def test_a_catalogue_too_big_to_plan_is_refused_not_run_out_of_memory() -> None:
    # Found by fuzzing: --products 100000000000 grew to 24 GB and was killed by the kernel.
    with pytest.raises(DataError, match="--products at most 10,000,000"):
        SynthConfig(products=100_000_000_000)
