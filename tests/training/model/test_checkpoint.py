import dataclasses

import pytest
import torch

from training.io import file_sha256
from training.model.backbones import load_backbone
from training.model.checkpoint import (
    Checkpoint,
    CheckpointMismatch,
    TrainRecord,
    load_checkpoint,
    load_embedder,
    save_checkpoint,
)
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import Preprocess


def _checkpoint(separate: bool = False) -> tuple[Checkpoint, CompatibilityHead]:
    torch.manual_seed(0)
    backbone = load_backbone("tiny")
    head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, hidden_dim=16, out_dim=8, separate=separate))
    with torch.no_grad():  # non-default BatchNorm statistics, so the round trip must carry buffers too
        head.scene.layers[1].running_mean.uniform_(-1, 1)
    checkpoint = Checkpoint(
        head_config=head.config,
        state_dict=head.state_dict(),
        backbone_name=backbone.name,
        backbone_weights_sha256=backbone.weights_sha256,
        preprocess=Preprocess(backbone.image_size, backbone.mean, backbone.std, context=0.25),
        train_config=TrainRecord(split_seed=3, args={"lr": 0.002, "split_seed": 3}),
        data_fingerprint="abc",
        metrics={"val": {"hr@10": 0.5}},
    )
    return checkpoint, head.eval()


@pytest.mark.parametrize("separate", [False, True])
def test_round_trip_restores_head_and_metadata(tmp_path, separate) -> None:
    checkpoint, head = _checkpoint(separate)
    sha256 = save_checkpoint(tmp_path / "head.pt", checkpoint)
    loaded = load_checkpoint(tmp_path / "head.pt")
    assert sha256 == loaded.sha256 == file_sha256(tmp_path / "head.pt")
    assert loaded.head_config == head.config
    assert loaded.preprocess.context == 0.25
    assert (loaded.train_config, loaded.data_fingerprint, loaded.metrics) == (
        TrainRecord(split_seed=3, args={"lr": 0.002, "split_seed": 3}), "abc", {"val": {"hr@10": 0.5}})
    features = torch.randn(5, head.config.in_dim)
    rebuilt = loaded.build_head()
    for kind in ("scene", "product"):
        assert torch.allclose(rebuilt(features, kind), head(features, kind))
    assert not list(tmp_path.glob(".head.pt.*"))  # no temp file left behind


def test_embedder_from_checkpoint_uses_the_head_and_context(tmp_path) -> None:
    checkpoint, head = _checkpoint()
    save_checkpoint(tmp_path / "head.pt", checkpoint)
    embedder = load_embedder(tmp_path / "head.pt", device="cpu")
    assert embedder.dim == 8 and embedder.preprocess.context == 0.25
    assert embedder.fingerprint()["head_sha256"] == file_sha256(tmp_path / "head.pt")
    features = torch.randn(3, head.config.in_dim)
    assert torch.allclose(torch.as_tensor(embedder.project(features, "product")), head(features, "product"))


def test_mismatched_backbone_is_refused(tmp_path) -> None:
    checkpoint, _ = _checkpoint()
    backbone = load_backbone("tiny")
    checkpoint.check_backbone(backbone)  # the right one passes
    for changed in (dataclasses.replace(checkpoint, backbone_name="efficientnet_lite0"),
                    dataclasses.replace(checkpoint, backbone_weights_sha256="0" * 64)):
        with pytest.raises(CheckpointMismatch, match="trained on backbone"):
            changed.check_backbone(backbone)
    other_size = dataclasses.replace(checkpoint, preprocess=dataclasses.replace(checkpoint.preprocess, image_size=96))
    with pytest.raises(CheckpointMismatch, match="preprocessing"):
        other_size.check_backbone(backbone)
    save_checkpoint(tmp_path / "head.pt", dataclasses.replace(checkpoint, backbone_weights_sha256="0" * 64))
    with pytest.raises(CheckpointMismatch, match="use the backbone it was trained with"):
        load_embedder(tmp_path / "head.pt", device="cpu")


def test_foreign_or_incomplete_files_are_refused(tmp_path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="not a readable head checkpoint") as refused:
        load_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(refused.value)  # torch's dozen lines of advice: one line here (found by fuzzing)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointMismatch, match=r"not a readable head checkpoint \(EOFError"):
        load_checkpoint(tmp_path / "empty.pt")  # was "...checkpoint: " with nothing after it
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatch, match="not a head checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format_version": 1, "head_config": {"in_dim": 4}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointMismatch, match="incomplete"):
        load_checkpoint(tmp_path / "partial.pt")


def test_train_record_reads_the_seed_of_checkpoints_written_before_it() -> None:
    # Older checkpoints kept the seed inside the resolved arguments only.
    assert TrainRecord.from_dict({"args": {"split_seed": 3}}).split_seed == 3
    assert TrainRecord.from_dict({"split_seed": 5, "args": {"split_seed": 3}}).split_seed == 5
    assert TrainRecord.from_dict({}).split_seed == 0
    with pytest.raises(CheckpointMismatch):
        TrainRecord.from_dict({"split_seed": "3"})
