"""The Ray executor in local mode (2 CPUs): the same features as the local executor, and a worker that dies
mid-job is restarted and its batch retried, so the cache is still complete."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import write_feature_dataset
from training.exec.executor import EmbedJob, ImageItem, LocalExecutor
from training.fit.features import backbone_loader, cache_features
from training.model.embedder import Embedder

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from training.exec.ray_executor import RayExecutor, _EmbedActor  # noqa: E402  (needs ray)

pytestmark = pytest.mark.ray

LOAD = backbone_loader("tiny", context=0.1)


@pytest.fixture(scope="module")
def executor() -> Iterator[RayExecutor]:
    with RayExecutor(num_cpus=2) as started:
        yield started
    assert not ray.is_initialized()  # a local Ray stops with the executor


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return LOAD("cpu")


class _DiesOnce(_EmbedActor):
    """Exits its process on its first batch while the marker file is absent (and creates it): a lost worker."""

    marker = Path(os.environ.get("STL_RAY_TEST_MARKER", "/nonexistent"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_pool_leaves_a_cpu_for_the_driver(executor):
    assert executor.pool() == {"actors": 1, "num_gpus": 0, "num_cpus": 1, "threads": 2}


def test_ray_features_equal_local_features(executor, embedder, tmp_path):
    dataset = write_feature_dataset(tmp_path / "data")
    local = cache_features(dataset, embedder, tmp_path / "local", batch_size=2, workers=0, progress=False,
                           runtime="torch")
    remote = cache_features(dataset, embedder, tmp_path / "ray", batch_size=2, progress=False, runtime="torch",
                            executor=executor, load=LOAD)
    assert remote.computed == local.computed == 8 and remote.n_scenes == 4 and remote.n_products == 4
    np.testing.assert_allclose(remote.scene_features(dataset.pairs), local.scene_features(dataset.pairs), atol=1e-5)
    products = dataset.catalogue()
    np.testing.assert_allclose(remote.product_features(products), local.product_features(products), atol=1e-5)


def test_map_embed_reports_unreadable_items_like_the_local_executor(executor, embedder, tmp_path):
    dataset = write_feature_dataset(tmp_path / "data")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    items = [ImageItem(dataset.product_location("p1")), ImageItem(str(tmp_path / "absent.jpg")),
             ImageItem(str(tmp_path / "bad.jpg")), ImageItem(dataset.scene_location("s1"), (0.1, 0.1, 0.5, 0.6))]
    job = EmbedJob("features", LOAD, "torch", batch_size=3, loaded=embedder)

    def collect(runner) -> tuple[dict[int, np.ndarray], dict[int, bool]]:
        values, errors = {}, {}
        for chunk in runner.map_embed(job, items):
            values.update(zip(chunk.positions.tolist(), chunk.values, strict=True))
            errors.update({position: transient for position, _, transient in chunk.errors})
        return values, errors

    local_values, local_errors = collect(LocalExecutor(0))
    ray_values, ray_errors = collect(executor)
    assert sorted(ray_values) == sorted(local_values) == [0, 3]
    assert ray_errors == local_errors == {1: True, 2: False}  # missing: retried later; undecodable: recorded
    for position in (0, 3):
        np.testing.assert_allclose(ray_values[position], local_values[position], atol=1e-5)


def test_a_worker_that_dies_is_retried_and_the_cache_is_complete(executor, embedder, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    _DiesOnce.marker = marker  # pickled by value below, so the actor sees this path
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    dataset = write_feature_dataset(tmp_path / "data")
    expected = cache_features(dataset, embedder, tmp_path / "local", batch_size=2, workers=0, progress=False,
                              runtime="torch")
    dying = RayExecutor(max_retries=2, actor_class=_DiesOnce)
    with dying:  # joins the running Ray: its actors are the dying kind
        cached = cache_features(dataset, embedder, tmp_path / "ray", batch_size=2, progress=False,
                                runtime="torch", executor=dying, load=LOAD)
    assert marker.exists()  # an actor really died
    assert cached.computed == 8 and cached.n_scenes == 4 and cached.n_products == 4
    np.testing.assert_allclose(cached.scene_features(dataset.pairs), expected.scene_features(dataset.pairs),
                               atol=1e-5)
    assert ray.is_initialized()  # joining did not stop the Ray it joined


def _quotient_and_pid(a: int, b: int) -> tuple[tuple[int, int], int]:
    return divmod(a, b), os.getpid()


def test_map_tasks_runs_calls_in_order_in_workers(executor):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    results = executor.map_tasks(_quotient_and_pid, [(7, 2), (9, 4), (1, 1)])
    assert [quotient for quotient, _ in results] == [(3, 1), (2, 1), (1, 0)]
    assert os.getpid() not in {pid for _, pid in results}  # ran in Ray workers, not here
