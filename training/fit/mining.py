"""Negative sampling and triplet mining, always within the anchor's category.

Two separate strategies, passed to the trainer as objects (the pytorch-metric-learning split):
- a *sampler* draws extra negative products per pair from the pair's category (uniformly, or from a
  pool of the products the current model ranks highest for that scene);
- a *miner* picks which (anchor, negative) triplets of a batch the loss sees, from the distances.

A negative is valid only when it is in the anchor's category and is not the anchor's positive: the
model only ever ranks products of one category, so cross-category negatives teach it nothing useful.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

LOG = logging.getLogger(__name__)

MinerKind = Literal["all", "semihard", "hard", "hardest", "random"]


def category_members(product_category: np.ndarray) -> list[np.ndarray]:
    """Product rows of each category id 0..C-1."""
    order = np.argsort(product_category, kind="stable")
    counts = np.bincount(product_category, minlength=int(product_category.max(initial=-1)) + 1)
    return np.split(order, np.cumsum(counts)[:-1])


class NegativeSampler(Protocol):
    k: int

    def sample(self, pair_rows: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[B, k] product rows, each in the category of its pair's positive and never that positive."""
        ...


class RandomCategorySampler:
    """k negatives per pair drawn uniformly from the positive's category (the paper's sampling)."""

    def __init__(self, product_category: np.ndarray, k: int = 1) -> None:
        self.k = k
        self.product_category = np.asarray(product_category, dtype=np.int64)
        self.members = category_members(self.product_category)
        sizes = np.array([len(m) for m in self.members])
        lonely = np.flatnonzero(sizes == 1)
        if len(lonely):
            LOG.warning("%d categories have a single product: their pairs get no negatives", len(lonely))

    def sample(self, pair_rows: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((len(positives), self.k), dtype=np.int64)
        categories = self.product_category[positives]
        for category in np.unique(categories):
            rows = np.flatnonzero(categories == category)
            members = self.members[category]
            # Draw from the category minus the positive: index in [0, n-1) and skip over the positive.
            n = len(members)
            if n < 2:
                out[rows] = positives[rows, None]  # marked invalid by the miner (same product)
                continue
            # members are ascending (stable argsort of the category ids), so searchsorted finds the positive
            positions = np.searchsorted(members, positives[rows])
            draw = rng.integers(0, n - 1, size=(len(rows), self.k))
            draw += draw >= positions[:, None]
            out[rows] = members[draw]
        return out


class HardPoolSampler:
    """Negatives from each pair's pool: the `pool_size` same-category products the current model scores
    highest for that scene (its near misses), refreshed once per epoch; until the first refresh, and
    for a `random_fraction` of draws, it falls back to uniform same-category negatives."""

    def __init__(
        self, product_category: np.ndarray, k: int = 1, pool_size: int = 20, random_fraction: float = 0.5
    ) -> None:
        self.k = k
        self.pool_size = pool_size
        self.random_fraction = random_fraction
        self.product_category = np.asarray(product_category, dtype=np.int64)
        self.uniform = RandomCategorySampler(product_category, k)
        self.pools: np.ndarray | None = None  # [n_pairs, pool_size] product rows, -1 = none

    @torch.no_grad()
    def refresh(self, scene_embeddings: torch.Tensor, product_embeddings: torch.Tensor, positives: np.ndarray) -> None:
        """Score every training scene against the products of its category with the current model."""
        device = scene_embeddings.device
        category = torch.as_tensor(self.product_category, device=device)
        positive_rows = torch.as_tensor(positives, device=device)
        pools = []
        for start in range(0, len(positives), 4096):
            rows = positive_rows[start : start + 4096]
            scores = scene_embeddings[start : start + 4096] @ product_embeddings.T
            wrong = (category[None, :] != category[rows][:, None]) | (
                torch.arange(len(category), device=device)[None, :] == rows[:, None]
            )
            scores = scores.masked_fill(wrong, float("-inf"))
            top = scores.topk(min(self.pool_size, scores.shape[1]), dim=1)
            pools.append(torch.where(torch.isinf(top.values), -1, top.indices).cpu())
        self.pools = torch.cat(pools).numpy()

    def sample(self, pair_rows: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = self.uniform.sample(pair_rows, positives, rng)
        if self.pools is None:
            return out
        pools = self.pools[pair_rows]
        picks = pools[np.arange(len(pair_rows))[:, None], rng.integers(0, pools.shape[1], size=out.shape)]
        use_pool = (rng.random(out.shape) >= self.random_fraction) & (picks >= 0)
        return np.where(use_pool, picks, out)


@dataclass
class TripletMiner:
    """Which (anchor, candidate-negative) pairs of a batch become triplets, by their distances.

    all: every valid triplet that violates the margin (batch-all without the zero-loss ones);
    semihard: d(a,p) < d(a,n) < d(a,p) + margin; hard: d(a,n) < d(a,p) + margin restricted to those
    closer than the positive, falling back to semihard; hardest: the closest valid negative per anchor;
    random: one random valid negative per anchor.
    """

    kind: MinerKind = "all"
    margin: float = 0.2
    # At most this many triplets per anchor (a random subset): batch-all on a 512-batch selects ~10^5
    # triplets, whose gathered [T, D] tensors cost far more than the head itself, for little extra signal.
    max_per_anchor: int | None = 32

    def __call__(
        self, distance_ap: torch.Tensor, distance_an: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (anchor) and column (candidate) indices of the chosen triplets."""
        gap = distance_an - distance_ap[:, None]  # > 0: the negative is already farther than the positive
        if self.kind == "all":
            chosen = valid & (gap < self.margin)
        elif self.kind == "semihard":
            chosen = valid & (gap > 0) & (gap < self.margin)
        elif self.kind == "hard":
            chosen = valid & (gap <= 0)
            chosen |= valid & (gap < self.margin) & ~chosen.any(dim=1, keepdim=True)
        elif self.kind in ("hardest", "random"):
            if self.kind == "hardest":
                score = distance_an.masked_fill(~valid, float("inf"))
            else:
                noise = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device)
                score = noise.masked_fill(~valid, float("inf"))
            columns = score.argmin(dim=1)
            rows = torch.nonzero(valid.any(dim=1)).flatten()
            return rows, columns[rows]
        else:
            raise ValueError(f"unknown miner kind {self.kind!r}")
        if self.max_per_anchor is not None and chosen.shape[1] > self.max_per_anchor:
            noise = torch.rand(chosen.shape, generator=generator, device="cpu").to(chosen.device)
            top = noise.masked_fill(~chosen, -1.0).topk(self.max_per_anchor, dim=1)
            keep = top.values >= 0
            rows = torch.arange(chosen.shape[0], device=chosen.device)[:, None].expand_as(top.indices)
            return rows[keep], top.indices[keep]
        rows, columns = torch.nonzero(chosen, as_tuple=True)
        return rows, columns


def candidate_mask(
    anchor_category: torch.Tensor, anchor_positive: torch.Tensor, candidate_category: torch.Tensor,
    candidate_product: torch.Tensor,
) -> torch.Tensor:
    """[B, C] True where candidate c is a valid negative for anchor b: same category, other product."""
    return (anchor_category[:, None] == candidate_category[None, :]) & (
        anchor_positive[:, None] != candidate_product[None, :]
    )


MINER_KINDS: Sequence[str] = ("all", "semihard", "hard", "hardest", "random")
