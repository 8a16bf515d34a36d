"""`open_executor`: the engine a CLI's --engine names; a Ray one joins its cluster only when a job needs it."""

from __future__ import annotations

import pytest

from training.errors import DataError
from training.exec.choose import open_executor
from training.exec.executor import LocalExecutor
from training.exec.ray_executor import RayExecutor


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def test_local_is_this_process_with_its_decoding_workers():
    with open_executor("local", workers=3) as executor:
        assert isinstance(executor, LocalExecutor) and executor.workers == 3 and executor.name == "local"


def test_ray_takes_the_address_or_ray_address_and_connects_only_when_used(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.9.8.7:6379")
    with open_executor("ray") as executor:
        assert isinstance(executor, RayExecutor) and executor.address == "10.9.8.7:6379"
    with open_executor("ray", "10.1.2.3:6379") as executor:
        assert executor.address == "10.1.2.3:6379"  # the flag wins over the environment
        assert not _ray_running()  # nothing connected: an unreachable address costs nothing until a job runs
    assert not _ray_running()


def test_an_unknown_engine_is_bad_input():
    with pytest.raises(DataError, match="unknown engine 'spark'"), open_executor("spark"):
        pass
