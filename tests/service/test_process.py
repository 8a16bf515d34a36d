"""Process tuning: malloc thresholds, the OpenMP spin default, thread roles, the faiss thread limit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import pytest

from service.process import FaissThreads, retain_freed_memory, run_in_own_thread

ROOT = Path(__file__).resolve().parents[2]
glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc malloc only"
)

# A worker thread allocates a forward pass's worth of buffers, frees them, and does it again: the page
# faults of the repeats are what the batcher thread pays on every batch.
_PROBE = """
import resource, sys, threading
import numpy as np
from service.process import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "tuned" else False
faults = []
def passes():
    count = lambda: resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(3):
        [np.ones(3 << 20, np.uint8) for _ in range(6)]
    before = count()
    for _ in range(5):
        [np.ones(3 << 20, np.uint8) for _ in range(6)]
    faults.append((count() - before) / 5)
worker = threading.Thread(target=passes)
worker.start()
worker.join()
print(applied, faults[0])
"""


def _faults_per_pass(mode: str, **env: str) -> tuple[bool, float]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, check=True)
    applied, faults = done.stdout.split()
    return applied == "True", float(faults)


@glibc_only
def test_freed_buffers_are_reused_without_page_faults() -> None:
    applied, tuned = _faults_per_pass("tuned")
    _, default = _faults_per_pass("default")
    assert applied
    assert tuned < 50  # 18 MiB a pass would be ~4,600 pages
    assert tuned < default / 10


@glibc_only
def test_an_operators_malloc_environment_wins() -> None:
    applied, _ = _faults_per_pass("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied


def test_other_platforms_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert retain_freed_memory() is False


def _alive(name: str) -> bool:
    return any(thread.name == name for thread in threading.enumerate())


def test_result_and_exception_come_back_and_the_thread_ends() -> None:
    # Loads run in a thread of their own that ends with them (so its OpenMP team goes away).
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    def fail() -> None:
        raise KeyError("broken")

    async def main() -> int:
        value = await run_in_own_thread(work, "stl-test-work")
        with pytest.raises(KeyError, match="broken"):
            await run_in_own_thread(fail, "stl-test-fail")
        return value

    assert asyncio.run(main()) == 42
    assert seen[0] is not threading.main_thread() and seen[0].name == "stl-test-work"
    seen[0].join(5)
    assert not seen[0].is_alive() and not _alive("stl-test-fail")


def test_faiss_is_held_to_its_threads_during_the_call_only() -> None:
    before = faiss.omp_get_max_threads()
    inside = FaissThreads(1).call(faiss.omp_get_max_threads)
    assert inside == 1 and faiss.omp_get_max_threads() == before
    with pytest.raises(ZeroDivisionError):
        FaissThreads(1).call(lambda: 1 / 0)
    assert faiss.omp_get_max_threads() == before  # restored after a failing call too
    assert FaissThreads(0).call(faiss.omp_get_max_threads) == before  # 0: faiss's own default


_START = """
import json, os, sys
import service.__main__
print(json.dumps({"spin": os.environ.get("GOMP_SPINCOUNT"),
                  "heavy": sorted(n for n in ("torch", "faiss", "timm", "torchvision") if n in sys.modules)}))
"""


@pytest.mark.parametrize(("env", "spin"), [({}, "20000"), ({"GOMP_SPINCOUNT": "7"}, "7")])
def test_the_entry_point_sets_the_spin_default_before_anything_heavy(env: dict, spin: str) -> None:
    clean = {name: value for name, value in os.environ.items() if name != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", _START], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, check=True)
    # Nothing heavy is imported yet, so torch, imported later, reads the value; an operator's own wins.
    assert json.loads(done.stdout) == {"spin": spin, "heavy": []}
