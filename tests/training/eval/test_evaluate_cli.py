import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.popularity import Popularity
from training.data.split import split_by_scene
from training.data.stl import Pair, STLDataset, write_pairs
from training.eval.rankers import EmbeddingRanker, PopularityRanker, candidates_by_category, evaluate_models, main
from training.model.backbones import load_backbone
from training.model.checkpoint import Checkpoint, save_checkpoint
from training.model.embedder import Embedder
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import load_image

CATEGORIES = {
    **{f"shoe{i}": "Apparel|Shoes" for i in range(7)},
    **{f"pant{i}": "Apparel|Clothing|Pants" for i in range(4)},
    "ring0": "Apparel|Jewelry|Rings",  # a one-product category: HR is 1, no negative exists
}
PRODUCTS = sorted(CATEGORIES)
COLD_PRODUCT = "shoe6"  # paired with test scenes only: a cold-start product
N_SCENES = 80


def _jpeg(path, colour, size=(24, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)


def make_dataset(root):
    """A tiny STL-format dataset: solid-colour images, a skewed pair distribution over products."""
    rng = np.random.default_rng(0)
    for index, product in enumerate(PRODUCTS):
        _jpeg(root / "images" / "products" / f"{product}.jpg", (20 * index, 255 - 20 * index, 90))
    warm = [p for p in PRODUCTS if p != COLD_PRODUCT]
    weights = 1.0 / np.array([1 + int(p[-1]) for p in warm]) ** 2  # product 0 of each category most popular
    weights /= weights.sum()
    pairs = []
    for scene in range(N_SCENES):
        scene_id = f"scene{scene:03d}"
        _jpeg(root / "images" / "scenes" / f"{scene_id}.jpg", (scene * 3, 128, 255 - scene * 3), (32, 32))
        for product in rng.choice(warm, size=int(rng.integers(1, 3)), replace=False, p=weights):
            pairs.append(Pair(scene_id, str(product), (0.1, 0.2, 0.6, 0.9)))
    test_scenes = sorted({p.scene_id for p in split_by_scene(pairs, seed=0).test})
    pairs += [Pair(scene_id, COLD_PRODUCT, (0.2, 0.1, 0.8, 0.7)) for scene_id in test_scenes[:2]]
    write_pairs(root / "pairs.jsonl", pairs)
    (root / "categories.json").write_text(json.dumps(CATEGORIES))
    return root


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


def test_evaluate_models_with_embedding_ranker(dataset_dir):
    """A fake feature cache whose scene features point at the true product: a perfect model."""
    dataset = STLDataset.open(dataset_dir)
    split = split_by_scene(dataset.pairs, seed=0)
    one_hot = {pid: np.eye(len(PRODUCTS), dtype=np.float32)[i] for i, pid in enumerate(PRODUCTS)}

    class FakeFeatures:
        def scene_features(self, pairs):
            return np.stack([one_hot[p.product_id] * 3.0 for p in pairs])

        def product_features(self, product_ids):
            return np.stack([one_hot[pid] for pid in product_ids])

    class NormaliseOnly:  # Embedder(backbone, head=None).project: L2 normalisation
        def project(self, features, kind):
            features = np.asarray(features, dtype=np.float32)
            return features / np.linalg.norm(features, axis=1, keepdims=True)

    perfect = EmbeddingRanker("perfect", NormaliseOnly(), FakeFeatures())
    results = evaluate_models(dataset, split, [perfect, PopularityRanker(Popularity.from_pairs(
        split.train, dataset.categories))], ks=(1, 3), seed=0, part="test")
    metrics = results["models"]["perfect"]
    assert metrics["hr"] == {1: 1.0, 3: 1.0}
    assert metrics["auc"] == 1.0 and metrics["binary_accuracy"] == 1.0
    assert results["models"]["popularity"]["hr"][1] < 1.0  # the baseline is not perfect on this data
    assert results["n_queries"] == len(split.test)
    # The validation part is evaluated on its own pairs (what the trainer's early stopping uses).
    val = evaluate_models(dataset, split, [perfect], ks=(10,), part="val")
    assert val["models"]["perfect"]["n_test"] == len(split.val) and val["models"]["perfect"]["hr"][10] == 1.0


def test_models_share_the_same_negatives(dataset_dir):
    dataset = STLDataset.open(dataset_dir)
    split = split_by_scene(dataset.pairs, seed=0)
    popularity = Popularity.from_pairs(split.train, dataset.categories)

    class Reversed:  # popularity upside down: every comparison flips, except ties
        name = "reversed"

        def score(self, queries, candidates):
            return np.tile(-popularity.scores(candidates), (len(queries), 1))

    results = evaluate_models(dataset, split, [PopularityRanker(popularity), PopularityRanker(popularity, "again"),
                                               Reversed()], seed=3)
    first, again, flipped = (results["models"][name] for name in ("popularity", "again", "reversed"))
    assert first == again  # same negatives for every model, not a fresh draw per model
    # On the same triplets a strict win becomes a loss and a tie stays a tie: the two accuracies sum to 1.
    assert first["binary_accuracy"] + flipped["binary_accuracy"] == pytest.approx(1.0)
    assert first["auc"] + flipped["auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate_models(dataset, split, [PopularityRanker(popularity), PopularityRanker(popularity)])
    assert candidates_by_category(dataset)["Apparel|Shoes"] == [f"shoe{i}" for i in range(7)]


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
