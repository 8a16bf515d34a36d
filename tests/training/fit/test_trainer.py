import numpy as np
import pytest
import torch

from training.eval import metrics
from training.fit.mining import HardPoolSampler, RandomCategorySampler, TripletMiner, candidate_mask
from training.fit.trainer import (
    PairFeatures,
    Products,
    TrainConfig,
    embed,
    hit_rates,
    make_loss,
    positive_ranks,
    train_head,
)
from training.model.head import CompatibilityHead, HeadConfig


def synthetic_features(
    n_pairs: int = 1500, n_products: int = 120, n_categories: int = 4, dim: int = 32, seed: int = 0
) -> tuple[PairFeatures, Products]:
    """Products = category centroid + identity; a scene crop sees its product through a fixed random
    linear distortion plus noise and a shared offset (the scene/product domain gap), so raw cosine kNN
    is weak and a learned head has something to learn. Positives follow a Zipf law (popularity)."""
    rng = np.random.default_rng(seed)
    category = np.arange(n_products) % n_categories
    products = 2.0 * rng.normal(size=(n_categories, dim))[category] + rng.normal(size=(n_products, dim))
    distortion = np.eye(dim) + 2.0 * rng.normal(size=(dim, dim)) / np.sqrt(dim)
    popularity = rng.permutation(1.0 / np.arange(1, n_products + 1) ** 0.7)
    positives = rng.choice(n_products, size=n_pairs, p=popularity / popularity.sum())
    scenes = products[positives] @ distortion + 3.0 * rng.normal(size=(n_pairs, dim)) + 3.0 * rng.normal(size=dim)
    return (PairFeatures(scenes.astype(np.float32), positives.astype(np.int64)),
            Products(products.astype(np.float32), category.astype(np.int64)))


def split_pairs(pairs: PairFeatures, fraction: float = 0.8) -> tuple[PairFeatures, PairFeatures]:
    cut = int(fraction * len(pairs))
    return (PairFeatures(pairs.scene_features[:cut], pairs.positives[:cut]),
            PairFeatures(pairs.scene_features[cut:], pairs.positives[cut:]))


def popularity_hit_rate(train: PairFeatures, val: PairFeatures, products: Products, k: int) -> float:
    counts = np.bincount(train.positives, minlength=len(products.category))
    hits = []
    for positive in val.positives:
        members = np.flatnonzero(products.category == products.category[positive])
        hits.append(positive in members[np.argsort(-counts[members], kind="stable")[:k]])
    return float(np.mean(hits))


def fixed_triplet_loss(head: CompatibilityHead, pairs: PairFeatures, products: Products) -> float:
    negatives = RandomCategorySampler(products.category).sample(
        np.arange(len(pairs)), pairs.positives, np.random.default_rng(0))[:, 0]
    with torch.no_grad():
        anchor = head(torch.as_tensor(pairs.scene_features), "scene")
        positive = head(torch.as_tensor(products.features[pairs.positives]), "product")
        negative = head(torch.as_tensor(products.features[negatives]), "product")
        return make_loss("cosine", SMALL.margin)(anchor, positive, negative).item()


SMALL = TrainConfig(epochs=8, batch_size=128, lr=3e-3, patience=8)
HEAD = HeadConfig(in_dim=32, hidden_dim=64, out_dim=16)


@pytest.fixture(scope="module")
def data() -> tuple[PairFeatures, PairFeatures, Products]:
    pairs, products = synthetic_features()
    train, val = split_pairs(pairs)
    return train, val, products


def test_training_lowers_loss_and_beats_popularity_and_knn(data) -> None:
    train, val, products = data
    result = train_head(train, products, HEAD, SMALL, val=val, progress=False)
    first, last = result.history[0], result.history[-1]
    # The "all" miner averages over margin-violating triplets only, so also check fewer violators, and the
    # loss on fixed validation triplets (random same-category negatives) before and after training.
    assert last["loss"] < first["loss"]
    assert last["triplets_per_step"] < first["triplets_per_step"]
    torch.manual_seed(SMALL.seed)
    untrained = CompatibilityHead(HEAD).eval()
    assert fixed_triplet_loss(result.head, val, products) < 0.5 * fixed_triplet_loss(untrained, val, products)
    trained = hit_rates(result.head, val, products, (10,))[10]
    assert result.best_val == pytest.approx(max(r["val_hr@10"] for r in result.history))
    raw = positive_ranks(torch.nn.functional.normalize(torch.as_tensor(val.scene_features), dim=1),
                         torch.nn.functional.normalize(torch.as_tensor(products.features), dim=1),
                         val.positives, products.category)
    assert trained > 1.3 * popularity_hit_rate(train, val, products, 10)
    assert trained > float((raw < 10).mean()) + 0.1
    assert not result.head.training


def test_same_seed_same_weights_other_seed_differs(data) -> None:
    train, val, products = data
    config = TrainConfig(epochs=2, batch_size=128, seed=3)
    first = train_head(train, products, HEAD, config, val=val, progress=False).head.state_dict()
    again = train_head(train, products, HEAD, config, val=val, progress=False).head.state_dict()
    other = train_head(train, products, HEAD, TrainConfig(epochs=2, batch_size=128, seed=4), val=val,
                       progress=False).head.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["scene.layers.0.weight"], other["scene.layers.0.weight"])


@pytest.mark.parametrize("kwargs", [{"miner": "semihard", "loss": "l2", "margin": 0.4},
                                    {"miner": "hardest", "hard_pool": 10, "categories_per_batch": 0}])
def test_other_strategies_train(data, kwargs) -> None:
    train, val, products = data
    result = train_head(train, products, HeadConfig(32, 64, 16, separate=True),
                        TrainConfig(epochs=3, batch_size=128, **kwargs), val=val, progress=False)
    assert len(result.history) == 3
    assert result.best_val > popularity_hit_rate(train, val, products, 10) * 0.8
    assert set(result.head.state_dict()) >= {"scene.layers.0.weight", "product.layers.0.weight"}


def test_early_stopping_keeps_the_best_epoch(data) -> None:
    train, val, products = data
    # A huge learning rate makes validation fall after the first epochs; patience 1 stops early.
    result = train_head(train, products, HEAD, TrainConfig(epochs=12, batch_size=128, lr=0.5, patience=1,
                                                             warmup_epochs=0), val=val, progress=False)
    assert result.best_epoch == max(result.history, key=lambda r: r["val_hr@10"])["epoch"]
    assert hit_rates(result.head, val, products, (10,))[10] == pytest.approx(result.best_val)


def test_wrong_feature_dimension_is_a_clear_error(data) -> None:
    train, _, products = data
    with pytest.raises(ValueError, match="head expects 64-d"):
        train_head(train, products, HeadConfig(in_dim=64), SMALL, progress=False)


def test_random_sampler_negatives_are_same_category_and_never_the_positive() -> None:
    category = np.array([0, 1, 0, 2, 1, 0, 2, 0, 1, 1])
    sampler = RandomCategorySampler(category, k=7)
    positives = np.array([0, 1, 3, 5, 9, 7, 4])
    negatives = sampler.sample(np.arange(len(positives)), positives, np.random.default_rng(0))
    assert negatives.shape == (7, 7)
    assert np.all(category[negatives] == category[positives][:, None])
    assert np.all(negatives != positives[:, None])
    # category 2 has two products: the only negative of product 3 is product 6
    assert set(negatives[2]) == {6}


def test_hard_pool_sampler_draws_the_models_near_misses() -> None:
    category = np.array([0, 0, 0, 0, 1, 1])
    sampler = HardPoolSampler(category, k=50, pool_size=1, random_fraction=0.0)
    products = torch.eye(6)
    scenes = torch.tensor([[1.0, 0, 0.9, 0.5, 1.0, 0], [0, 0, 0, 0, 0.2, 1.0]])  # near misses: 2, then 4
    sampler.refresh(scenes, products, np.array([0, 5]))
    negatives = sampler.sample(np.array([0, 1]), np.array([0, 5]), np.random.default_rng(0))
    assert set(negatives[0]) == {2}  # product 4 scores as high but is another category
    assert set(negatives[1]) == {4}


def test_candidate_mask_and_miners() -> None:
    valid = candidate_mask(torch.tensor([0, 0]), torch.tensor([10, 11]), torch.tensor([0, 0, 1, 0]),
                           torch.tensor([10, 11, 12, 13]))
    assert valid.tolist() == [[False, True, False, True], [True, False, False, True]]
    distance_ap = torch.tensor([0.5, 0.5])
    distance_an = torch.tensor([[9.0, 0.4, 0.1, 0.6], [0.8, 9.0, 0.1, 0.55]])
    generator = torch.Generator().manual_seed(0)

    def pairs(kind: str) -> set[tuple[int, int]]:
        rows, columns = TripletMiner(kind, margin=0.2)(distance_ap, distance_an, valid, generator)  # type: ignore[arg-type]
        return set(zip(rows.tolist(), columns.tolist(), strict=True))

    assert pairs("all") == {(0, 1), (0, 3), (1, 3)}
    assert pairs("semihard") == {(0, 3), (1, 3)}
    assert pairs("hard") == {(0, 1), (1, 3)}  # row 1 has no hard negative: falls back to semihard
    assert pairs("hardest") == {(0, 1), (1, 3)}
    assert {row for row, _ in pairs("random")} == {0, 1}


def test_miner_keeps_at_most_max_per_anchor_valid_triplets() -> None:
    generator = torch.Generator().manual_seed(0)
    valid = torch.rand(6, 40, generator=generator) < 0.5
    valid[0] = False
    valid[1, :] = False
    valid[1, :3] = True
    rows, columns = TripletMiner("all", margin=10.0, max_per_anchor=5)(
        torch.zeros(6), torch.ones(6, 40), valid, generator)
    per_row = torch.bincount(rows, minlength=6).tolist()
    assert per_row[0] == 0 and per_row[1] == 3 and all(count == 5 for count in per_row[2:])
    assert bool(valid[rows, columns].all())
    assert len(set(zip(rows.tolist(), columns.tolist(), strict=True))) == len(rows)


def test_losses_are_torch_triplet_losses_on_squared_l2_and_cosine() -> None:
    anchor = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    positive = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    negative = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [1.0, 0.0]]), dim=1)
    cos_ap, cos_an = (anchor * positive).sum(1), (anchor * negative).sum(1)
    expected_cosine = torch.clamp((1 - cos_ap) - (1 - cos_an) + 0.3, min=0).mean()
    expected_l2 = torch.clamp((2 - 2 * cos_ap) - (2 - 2 * cos_an) + 0.3, min=0).mean()
    assert make_loss("cosine", 0.3)(anchor, positive, negative).item() == pytest.approx(expected_cosine.item())
    assert make_loss("l2", 0.3)(anchor, positive, negative).item() == pytest.approx(expected_l2.item())
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge", 0.3)


def test_positive_ranks_break_ties_by_product_id_and_ignore_other_categories() -> None:
    scenes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    products = torch.tensor([[0.9, 0, 0], [1.0, 0, 0], [0.9, 0, 0], [5.0, 0, 0], [0, 1.0, 0]])
    ranks = positive_ranks(scenes, products, np.array([0, 4, 2]), np.array([0, 0, 0, 1, 0]))
    # Positive 0: product 1 beats it, product 2 ties but comes later; product 3 is another category.
    # Positive 2: product 1 beats it and product 0 ties and comes first (evaluate's rule).
    assert ranks.tolist() == [1, 0, 2]


def _evaluate_ranks(scenes: np.ndarray, products: np.ndarray, positives: np.ndarray,
                    category: np.ndarray) -> np.ndarray:
    """Ranks the way `evaluate` gets them: per query, the scores of its category's products (id order)."""
    ranks = []
    for scene, positive in zip(scenes, positives, strict=True):
        members = np.flatnonzero(category == category[positive])
        scores = (products[members] @ scene)[None, :]
        ranks.append(int(metrics.positive_ranks(scores, np.array([np.searchsorted(members, positive)]))[0]))
    return np.array(ranks)


def test_trainer_ranks_are_evaluates_ranks_ties_included() -> None:
    rng = np.random.default_rng(0)
    # Halves and small integers: every dot product is exact in float32, so ties are real ties.
    scenes = rng.integers(0, 3, size=(200, 4)).astype(np.float32) / 2
    products = rng.integers(0, 3, size=(30, 4)).astype(np.float32) / 2
    category = np.arange(30) % 3
    positives = rng.integers(0, 30, size=200)
    trained = positive_ranks(torch.as_tensor(scenes), torch.as_tensor(products), positives, category, chunk=7)
    expected = _evaluate_ranks(scenes, products, positives, category)
    np.testing.assert_array_equal(trained, expected)
    ties_against = np.array([int(((products[category == category[p]] @ s) >= products[p] @ s).sum()) - 1
                             for s, p in zip(scenes, positives, strict=True)])
    assert (ties_against > expected).any()  # the data has ties, so the old rule would have differed


def test_validation_hr_is_the_hr_evaluate_reports(data) -> None:
    train, val, products = data
    # Twin products (same features, same category): every scene ties them, so the tie rule matters.
    twins = products.features.copy()
    twins[60:] = twins[:60]  # rows j and j + 60 share a category (j % 4)
    products = Products(twins, products.category)
    config = TrainConfig(epochs=2, batch_size=128)
    result = train_head(train, products, HEAD, config, val=val, progress=False)
    ks = (1, 5, 10)
    scenes = embed(result.head, val.scene_features, "scene", torch.device("cpu")).numpy()
    vectors = embed(result.head, products.features, "product", torch.device("cpu")).numpy()
    expected = metrics.hit_rate_at_k(_evaluate_ranks(scenes, vectors, val.positives, products.category), ks)
    assert hit_rates(result.head, val, products, ks) == pytest.approx(expected, abs=1e-12)
    assert result.best_val == pytest.approx(expected[config.eval_k], abs=1e-12)
