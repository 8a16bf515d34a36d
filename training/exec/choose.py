"""`open_executor(engine, ...)`: the executor a CLI's --engine names, alive for a `with` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from training.errors import DataError
from training.exec.executor import ENGINES, Executor, LocalExecutor
from training.exec.ray_executor import RayExecutor


@contextlib.contextmanager
def open_executor(engine: str = "local", ray_address: str | None = None, workers: int = 2) -> Iterator[Executor]:
    """`local`: this process with `workers` decoding processes; `ray`: the cluster at `ray_address` (or
    RAY_ADDRESS), else a local Ray started and stopped with the block."""
    if engine == "local":
        yield LocalExecutor(workers)
    elif engine == "ray":
        with RayExecutor(ray_address) as executor:
            yield executor
    else:
        raise DataError(f"unknown engine {engine!r}; use one of {list(ENGINES)}")
