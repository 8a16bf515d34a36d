"""`python -m training evaluate`: metrics.json and the plot, shared feature extraction, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import write_ranking_dataset as make_dataset
from training.cli.evaluate import main
from training.data.popularity import Popularity
from training.data.split import split_by_scene
from training.data.stl import STLDataset
from training.model.backbones import load_backbone
from training.model.checkpoint import Checkpoint, save_checkpoint
from training.model.embedder import Embedder
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import load_image


@pytest.fixture
def dataset_dir(tmp_path):
    return make_dataset(tmp_path / "stl")


def test_cli_popularity_end_to_end(dataset_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["--data", str(dataset_dir), "--model", "popularity", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "popularity" in printed and "random" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"models", "random", "config"}
    model = metrics["models"]["popularity"]
    assert {"hr", "per_category", "binary_accuracy", "auc", "cold_start_share", "hr_warm", "hr_cold",
            "n_test"} <= set(model)
    assert list(model["hr"]) == ["1", "5", "10", "20", "50", "100"]
    for value in [*model["hr"].values(), *metrics["random"].values(), model["binary_accuracy"], model["auc"],
                  model["cold_start_share"]]:
        assert 0.0 <= value <= 1.0
    hr = [model["hr"][k] for k in model["hr"]]
    assert hr == sorted(hr) and hr[-1] == 1.0  # 12 products: every positive is in the top 100

    # Recompute independently: the popularity rank is the positive's place in Popularity.top().
    dataset = STLDataset.open(dataset_dir)
    split = split_by_scene(dataset.pairs, seed=0)
    popularity = Popularity.from_pairs(split.train, dataset.categories)
    assert model["n_test"] == len(split.test) > 0
    ranks, sizes = [], []
    for pair in split.test:
        category = dataset.categories.of(pair.product_id)
        order = [pid for pid, _ in popularity.top(category, 1000)]
        ranks.append(order.index(pair.product_id))
        sizes.append(len(order))
    for k in (1, 5, 10):
        assert model["hr"][str(k)] == pytest.approx(np.mean(np.array(ranks) < k))
        assert metrics["random"][str(k)] == pytest.approx(np.mean(np.minimum(k, sizes) / np.array(sizes)))
    cold = [popularity.count(pair.product_id) == 0 for pair in split.test]
    assert model["cold_start_share"] == pytest.approx(np.mean(cold)) and any(cold)
    # The cold product has no training pair and the largest id of its 7 shoes: popularity ranks it last.
    assert model["hr_cold"] == {"1": 0.0, "5": 0.0, "10": 1.0, "20": 1.0, "50": 1.0, "100": 1.0}
    assert model["hr_warm"]["1"] == pytest.approx(np.mean([r < 1 for r, c in zip(ranks, cold, strict=True) if not c]))
    assert sum(c["n_test"] for c in model["per_category"].values()) == model["n_test"]
    assert metrics["config"]["split_seed"] == 0 and metrics["config"]["models"] == ["popularity"]

    with Image.open(out / "hr_at_k.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_cli_knn_and_checkpoint_share_one_feature_extraction(dataset_dir, tmp_path):
    """knn (untrained tiny backbone) and a head checkpoint on the same backbone, through the real cache."""
    dataset = STLDataset.open(dataset_dir)
    test = split_by_scene(dataset.pairs, seed=0).test
    # An undecodable product image gets no features: it must leave the candidates of EVERY model.
    broken = next(f"shoe{i}" for i in range(6) if f"shoe{i}" not in {p.product_id for p in test})
    dataset.product_path(broken).write_bytes(b"not a jpeg")
    backbone = load_backbone("tiny")
    config = HeadConfig(in_dim=backbone.dim, hidden_dim=16, out_dim=8)
    torch.manual_seed(0)
    checkpoint = tmp_path / "runs" / "head.pt"
    save_checkpoint(checkpoint, Checkpoint(config, CompatibilityHead(config).state_dict(), backbone.name,
                                           backbone.weights_sha256, Embedder(backbone, device="cpu").preprocess))
    out, cache = tmp_path / "eval", tmp_path / "cache"
    argv = ["--data", str(dataset_dir), "--model", "popularity", "--model", "knn", "--model", str(checkpoint),
            "--backbone", "tiny", "--device", "cpu", "--out", str(out), "--cache", str(cache), "--workers", "0",
            "--no-progress", "--ks", "1", "3", "10"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["popularity", "knn", "head"]
    for name in ("knn", "head"):
        model = metrics["models"][name]
        assert model["n_test"] == metrics["models"]["popularity"]["n_test"] > 0
        assert all(0.0 <= v <= 1.0 for v in model["hr"].values()) and model["hr"]["10"] == 1.0
        assert 0.0 <= model["auc"] <= 1.0 and 0.0 <= model["binary_accuracy"] <= 1.0
    assert len(list(cache.iterdir())) == 1  # same backbone and preprocessing: one extraction
    for name in ("popularity", "knn", "head"):
        assert metrics["models"][name]["per_category"]["Apparel|Shoes"]["n_candidates"] == 6

    # The knn numbers are those of the raw backbone features, ranked by cosine similarity.
    embedder = Embedder(backbone, device="cpu")
    ranks = []
    for pair in test:
        products = [pid for pid in dataset.categories.products_in(dataset.categories.of(pair.product_id))
                    if pid != broken]
        scene = embedder.embed([load_image(dataset.scene_path(pair.scene_id))], [pair.bbox], "scene")
        vectors = embedder.embed([load_image(dataset.product_path(pid)) for pid in products], None, "product")
        scores = (vectors @ scene[0]).round(5)
        ranks.append(int(np.sum(scores > scores[products.index(pair.product_id)])))
    assert metrics["models"]["knn"]["hr"]["1"] == pytest.approx(np.mean(np.array(ranks) < 1))


def test_cli_bad_input_is_a_clear_error(dataset_dir, tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nowhere"), "--model", "popularity", "--out", str(tmp_path / "o")]) == 2
    assert "cannot open dataset" in capsys.readouterr().err
    assert main(["--data", str(dataset_dir), "--model", "missing.pt", "--out", str(tmp_path / "o")]) == 2
    assert "not 'popularity', 'knn' or an existing checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()
