import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.process import retain_freed_memory

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
