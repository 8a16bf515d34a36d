import numpy as np
import pytest

from training.eval.metrics import (
    auc,
    auc_per_query,
    binary_accuracy,
    binary_outcomes,
    hit_rate_at_k,
    mean_reciprocal_rank,
    positive_ranks,
    random_hit_rate,
    sample_negatives,
)

# 3 queries x 5 candidates (in product-id order), with ties.
SCORES = np.array([
    [0.1, 0.9, 0.5, 0.5, 0.2],  # positive 2: 0.9 is ahead; the tie at index 3 comes later -> rank 1
    [0.1, 0.9, 0.5, 0.5, 0.2],  # positive 3: 0.9 ahead, and the tie at index 2 comes first -> rank 2
    [0.3, 0.3, 0.3, 0.3, 0.3],  # positive 4: every tie comes first -> rank 4
])
POSITIVES = np.array([2, 3, 4])


def test_ranks_break_ties_by_candidate_order():
    np.testing.assert_array_equal(positive_ranks(SCORES, POSITIVES), [1, 2, 4])
    np.testing.assert_array_equal(positive_ranks(SCORES, np.array([1, 0, 0])), [0, 4, 0])


def test_hit_rate_by_hand():
    ranks = positive_ranks(SCORES, POSITIVES)
    assert hit_rate_at_k(ranks, ks=(1, 2, 3, 5, 100)) == pytest.approx(
        {1: 0.0, 2: 1 / 3, 3: 2 / 3, 5: 1.0, 100: 1.0})
    assert np.isnan(hit_rate_at_k([], ks=(1,))[1])
    assert mean_reciprocal_rank([0, 1, 3]) == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    with pytest.raises(ValueError):
        hit_rate_at_k([0], ks=(0,))


def test_auc_by_hand():
    # q0: below 0.1, 0.2; tie 0.5; above 0.9 -> (2 + 0.5) / 4. q1 the same. q2: four ties -> 0.5.
    np.testing.assert_allclose(auc_per_query(SCORES, POSITIVES), [0.625, 0.625, 0.5])
    assert auc(SCORES, POSITIVES) == pytest.approx((0.625 + 0.625 + 0.5) / 3)
    assert np.isnan(auc_per_query(np.ones((2, 1)), np.array([0, 0]))).all()


def test_binary_accuracy_by_hand():
    negatives = np.array([0, 1, 2])  # q0 wins (0.5 > 0.1), q1 loses (0.5 < 0.9), q2 ties (1/2)
    np.testing.assert_array_equal(binary_outcomes(SCORES, POSITIVES, negatives), [1.0, 0.0, 0.5])
    assert binary_accuracy(SCORES, POSITIVES, negatives) == pytest.approx(0.5)
    # A query without a possible negative is left out, not counted as a loss.
    assert binary_accuracy(SCORES, POSITIVES, np.array([0, -1, -1])) == pytest.approx(1.0)


def test_sample_negatives_is_seeded_uniform_and_never_the_positive():
    positives = np.full(5000, 2)
    first = sample_negatives(positives, 5, np.random.default_rng(7))
    again = sample_negatives(positives, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    assert not np.any(first == 2)
    counts = np.bincount(first, minlength=5)
    assert counts[2] == 0 and all(1100 < c < 1400 for c in counts[[0, 1, 3, 4]])
    np.testing.assert_array_equal(sample_negatives(np.array([0, 0]), 1, np.random.default_rng(0)), [-1, -1])


def test_random_reference():
    # n = 5, 2, 1 candidates: K=1 -> (1/5 + 1/2 + 1) / 3; K=2 -> (2/5 + 1 + 1) / 3; K=10 -> 1.
    assert random_hit_rate([5, 2, 1], ks=(1, 2, 10)) == pytest.approx({1: 1.7 / 3, 2: 2.4 / 3, 10: 1.0})
    with pytest.raises(ValueError):
        random_hit_rate([0, 3], ks=(1,))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="one positive index per query"):
        positive_ranks(SCORES, np.array([0, 1]))
    with pytest.raises(ValueError, match="must lie in"):
        positive_ranks(SCORES, np.array([0, 1, 5]))
