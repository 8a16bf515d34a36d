"""The head's training job extracts its features on the executor it is given, with a loader that rebuilds the
driver's embedder on a worker (same preprocessing, so the same cache key)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.fixtures import write_synth_catalogue
from training.data.stl import STLDataset
from training.exec.executor import EmbedChunk, EmbedJob, ImageItem, LocalExecutor
from training.fit.features import scene_key
from training.fit.run import FitOptions, fit_head


class _Recording(LocalExecutor):
    """The local executor, keeping the jobs and items it ran."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(workers=0)
        self.calls: list[tuple[EmbedJob, list[ImageItem]]] = []

    def map_embed(self, job: EmbedJob, items: Sequence[ImageItem]) -> Iterator[EmbedChunk]:
        self.calls.append((job, list(items)))
        yield from super().map_embed(job, items)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synth_catalogue(tmp_path_factory.mktemp("stl") / "tiny", scenes=40, products=24, seed=2)


def test_fit_head_extracts_on_the_given_executor(tiny_data, tmp_path):
    executor = _Recording()
    options = FitOptions(backbone="tiny", epochs=1, batch_size=8, context=0.2)
    fitted = fit_head(tiny_data, tmp_path / "run", options, cache=tmp_path / "cache", device="cpu", workers=0,
                      progress=False, executor=executor)
    assert not fitted.up_to_date and fitted.path.is_file()
    [(job, items)] = executor.calls
    dataset = STLDataset.open(tiny_data)
    assert job.output == "features"
    assert len(items) == len({scene_key(pair) for pair in dataset.pairs}) + len(dataset.catalogue())
    remote = pickle.loads(pickle.dumps(job.load))("cpu")  # what a Ray worker builds from the shipped job
    assert remote.preprocess == fitted.checkpoint.preprocess and remote.preprocess.context == 0.2
    assert remote.backbone.name == "tiny"

    # Up to date: nothing is extracted again, on any executor.
    again = _Recording()
    assert fit_head(tiny_data, tmp_path / "run", options, cache=tmp_path / "cache", device="cpu", workers=0,
                    progress=False, executor=again).up_to_date
    assert again.calls == []
