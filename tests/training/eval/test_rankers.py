import numpy as np
import pytest

from tests.fixtures import RANKING_PRODUCTS as PRODUCTS
from tests.fixtures import write_ranking_dataset as make_dataset
from training.data.popularity import Popularity
from training.data.split import split_by_scene
from training.data.stl import STLDataset
from training.eval.rankers import EmbeddingRanker, PopularityRanker, candidates_by_category, evaluate_models


@pytest.fixture
def dataset_dir(tmp_path):
    return make_dataset(tmp_path / "stl")


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
