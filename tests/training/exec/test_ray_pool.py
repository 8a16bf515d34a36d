"""How the Ray executor sizes its actor pool from the cluster's resources (a fake cluster: no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from training.exec import ray_executor
from training.exec.ray_executor import RayExecutor


def _cluster(monkeypatch, nodes: list[dict[str, float]]) -> None:
    totals: dict[str, float] = {}
    for resources in nodes:
        for key, value in resources.items():
            totals[key] = totals.get(key, 0) + value
    fake = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: totals,
                           nodes=lambda: [{"Alive": True, "Resources": resources} for resources in nodes]
                           + [{"Alive": False, "Resources": {"CPU": 1.0, "GPU": 1.0}}])  # a dead node counts not
    monkeypatch.setattr(ray_executor, "_ray", lambda: fake)


def test_gpu_actors_decode_with_the_cpus_beside_their_gpu(monkeypatch):
    _cluster(monkeypatch, [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 12.0, "GPU": 1.0}])
    # One actor per GPU; the node with the fewest CPUs per GPU (16 / 2) sets every actor's decode threads.
    assert RayExecutor().pool() == {"actors": 3, "num_gpus": 1, "num_cpus": 1, "threads": 8}


@pytest.mark.parametrize(("cpus", "actors", "threads"), [(2.0, 1, 2), (4.0, 3, 1), (16.0, 15, 1)])
def test_cpu_actors_leave_one_cpu_for_the_driver(monkeypatch, cpus, actors, threads):
    _cluster(monkeypatch, [{"CPU": cpus}])
    assert RayExecutor().pool() == {"actors": actors, "num_gpus": 0, "num_cpus": 1, "threads": threads}
    assert RayExecutor(actors=1).pool()["threads"] == int(cpus)
