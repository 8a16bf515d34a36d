"""Deterministic train/val/test split by scene, so that no test scene is ever seen in training."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from training.data.stl import Pair
from training.errors import DataError

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test: the paper's split, used by every command


@dataclass(frozen=True)
class Split:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]


def _unit(scene_id: str, seed: int) -> float:
    # A hash of (seed, scene) instead of a shuffle: a scene's side does not depend on which other
    # scenes are in the file, so adding data never moves an existing test scene into training.
    digest = hashlib.sha256(f"{seed}:{scene_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_scene(
    pairs: Sequence[Pair], fractions: tuple[float, float, float] = SPLIT_FRACTIONS, seed: int = 0
) -> Split:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    train_cut, val_cut = fractions[0], fractions[0] + fractions[1]
    parts: tuple[list[Pair], list[Pair], list[Pair]] = ([], [], [])
    for pair in pairs:
        u = _unit(pair.scene_id, seed)
        parts[0 if u < train_cut else 1 if u < val_cut else 2].append(pair)
    return Split(*parts)
