import json

import numpy as np
import pytest

from training.data.popularity import Popularity
from training.data.stl import CategoryMap, Pair

BOX = (0.1, 0.1, 0.9, 0.9)


def _categories() -> CategoryMap:
    return CategoryMap({
        "s1": "Apparel|Shoes", "s2": "Apparel|Shoes", "s3": "Apparel|Shoes", "s4": "Apparel|Shoes",
        "p1": "Apparel|Clothing|Pants", "p2": "Apparel|Clothing|Pants",
    })


def _popularity() -> Popularity:
    pairs = [Pair("a", "s3", BOX), Pair("b", "s3", BOX), Pair("c", "s4", BOX), Pair("d", "s1", BOX),
             Pair("e", "p2", BOX), Pair("f", "ghost", BOX)]
    return Popularity.from_pairs(pairs, _categories())


def test_top_orders_by_count_then_id_and_includes_unseen_products():
    popularity = _popularity()
    # s1 and s4 tie at 1 pair: id order decides; s2 has no pair but is still a candidate.
    assert popularity.top("Shoes", 10) == [("s3", 2.0), ("s1", 1.0), ("s4", 1.0), ("s2", 0.0)]
    assert popularity.top("Pants", 5) == [("p2", 1.0), ("p1", 0.0)]


def test_top_accepts_short_and_full_names_and_truncates():
    popularity = _popularity()
    assert popularity.top("Apparel|Shoes", 2) == popularity.top("Shoes", 2) == [("s3", 2.0), ("s1", 1.0)]
    assert popularity.top("Shoes", 0) == []
    with pytest.raises(KeyError, match="unknown category"):
        popularity.top("Hats", 3)
    with pytest.raises(ValueError):
        popularity.top("Shoes", -1)


def test_counts_scores_and_categories():
    popularity = _popularity()
    assert popularity.count("s3") == 2 and popularity.count("s2") == 0
    assert popularity.count("ghost") == 0  # a product without a category is never ranked
    scores = popularity.scores(["s2", "s3", "p2", "unknown"])
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [0.0, 2.0, 1.0, 0.0])
    assert popularity.categories() == ["Apparel|Clothing|Pants", "Apparel|Shoes"]


def test_json_round_trip(tmp_path):
    popularity = _popularity()
    path = tmp_path / "artifact" / "popularity.json"
    popularity.to_json(path)
    loaded = Popularity.from_json(path)
    assert loaded.categories() == popularity.categories()
    for category in popularity.categories():
        assert loaded.top(category, 100) == popularity.top(category, 100)
    assert loaded.top("Shoes", 1) == [("s3", 2.0)]
    raw = json.loads(path.read_text())
    assert raw["counts"] == {"p2": 1, "s1": 1, "s3": 2, "s4": 1}
    assert raw["categories"]["s2"] == "Apparel|Shoes"


def test_from_json_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Popularity.from_json(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a popularity table"):
        Popularity.from_json(other)
