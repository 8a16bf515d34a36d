"""The local executor: with an exported runtime it decodes in threads of its own process, and gives the same
values, positions and errors as decoding in DataLoader worker processes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures import write_feature_dataset
from training.exec.executor import EmbedJob, ImageItem, LocalExecutor
from training.fit.features import backbone_loader
from training.model.batch_runtime import batch_runtime

pytest.importorskip("openvino")
LOAD = backbone_loader("tiny", context=0.1)


def _collect(executor: LocalExecutor, job: EmbedJob, items: list[ImageItem]):
    values, errors, chunks = {}, {}, 0
    for chunk in executor.map_embed(job, items):
        chunks += 1
        values.update(zip(chunk.positions.tolist(), chunk.values, strict=True))
        errors.update({position: transient for position, _, transient in chunk.errors})
    return values, errors, chunks


@pytest.mark.parametrize("workers", [1, 2])
def test_threads_decode_like_worker_processes(tmp_path, workers, monkeypatch):
    dataset = write_feature_dataset(tmp_path / "data")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    items = [ImageItem(dataset.product_location(pid)) for pid in dataset.catalogue()]
    items += [ImageItem(str(tmp_path / "absent.jpg")), ImageItem(str(tmp_path / "bad.jpg"))]
    items += [ImageItem(dataset.scene_location(pair.scene_id), pair.bbox) for pair in dataset.pairs]
    embedder = LOAD("cpu")
    with batch_runtime(embedder, "openvino") as runtime:
        job = EmbedJob("features", LOAD, "openvino", batch_size=3, loaded=embedder, opened=runtime)
        threaded = _collect(LocalExecutor(workers), job, items)
        # The same job through DataLoader worker processes (the path torch takes) as the reference.
        monkeypatch.setattr(LocalExecutor, "_decoded_in_threads", LocalExecutor._decoded_in_workers)
        in_workers = _collect(LocalExecutor(workers), job, items)
    values, errors, chunks = threaded
    assert chunks == -(-len(items) // 3)  # one chunk per batch, none lost or merged
    assert sorted(values) == sorted(in_workers[0]) == [i for i in range(len(items)) if i not in (4, 5)]
    assert errors == in_workers[1] == {4: True, 5: False}  # missing: transient; undecodable: recorded
    for position, value in values.items():
        np.testing.assert_array_equal(value, in_workers[0][position])
