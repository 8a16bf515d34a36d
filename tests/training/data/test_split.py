from training.data.split import split_by_scene
from training.data.stl import Pair


def _pairs(n_scenes: int) -> list[Pair]:
    return [
        Pair(f"{s:032x}", f"{(s * 7 + i) % 50:032x}", (0.1, 0.1, 0.5, 0.5)) for s in range(n_scenes) for i in range(3)
    ]


def test_no_scene_is_in_two_parts() -> None:
    split = split_by_scene(_pairs(500), seed=3)
    scenes = [{pair.scene_id for pair in part} for part in (split.train, split.val, split.test)]
    assert not scenes[0] & scenes[1] and not scenes[0] & scenes[2] and not scenes[1] & scenes[2]
    assert sum(len(part) for part in (split.train, split.val, split.test)) == 1500


def test_fractions_are_respected() -> None:
    split = split_by_scene(_pairs(2000), seed=0)
    assert 0.77 < len(split.train) / 6000 < 0.83
    assert 0.08 < len(split.test) / 6000 < 0.12


def test_stable_for_a_seed_and_independent_of_order() -> None:
    pairs = _pairs(300)
    first = split_by_scene(pairs, seed=1)
    again = split_by_scene(list(reversed(pairs)), seed=1)
    assert {p.scene_id for p in first.test} == {p.scene_id for p in again.test}
    other = split_by_scene(pairs, seed=2)
    assert {p.scene_id for p in first.test} != {p.scene_id for p in other.test}


def test_adding_scenes_never_moves_existing_ones() -> None:
    small = split_by_scene(_pairs(200), seed=0)
    large = split_by_scene(_pairs(400), seed=0)
    assert {p.scene_id for p in small.test} <= {p.scene_id for p in large.test}
