"""Backbone registry: real ImageNet weights for efficientnet_lite0, file loading and errors for resnet50."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.model.backbones import BackboneUnavailable, available, load_backbone, state_dict_sha256
from training.model.embedder import Embedder

ESPRESSO, CUP = 967, 968


def test_registry_lists_names_and_rejects_unknown():
    assert {"efficientnet_lite0", "resnet50", "tiny"} <= set(available())
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg'.*efficientnet_lite0.*resnet50.*tiny"):
        load_backbone("vgg")


def test_efficientnet_lite0_remapped_weights_recognise_coffee():
    """Strict remap + the embedder's own preprocessing (crop, resize, mean = std = 0.5) classify correctly."""
    skimage_data = pytest.importorskip("skimage.data")
    backbone = load_backbone("efficientnet_lite0")
    assert backbone.dim == 1280 and backbone.image_size == 224 and backbone.mean == (0.5, 0.5, 0.5)
    embedder = Embedder(backbone, device="cpu")
    image = Image.fromarray(skimage_data.coffee())
    features = embedder.backbone_features(torch.stack([embedder.transform(image)]))
    assert features.shape == (1, 1280) and features.dtype == torch.float32
    with torch.inference_mode():
        logits = backbone.classifier(features)
    top2 = logits[0].topk(2).indices.tolist()
    assert ESPRESSO in top2 or CUP in top2, f"top-2 ImageNet classes {top2}"
    # same weights -> same checksum; the checksum is what cache dirs and checkpoints are keyed by
    assert backbone.weights_sha256 == load_backbone("efficientnet_lite0").weights_sha256


@pytest.mark.slow
def test_resnet50_loads_from_a_weights_file(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    state = resnet50().state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    backbone = load_backbone("resnet50", tmp_path / "resnet50.pth")
    assert backbone.dim == 2048 and backbone.mean == (0.485, 0.456, 0.406)
    assert backbone.weights_sha256 == state_dict_sha256(state)
    assert not backbone.model.training and not any(p.requires_grad for p in backbone.model.parameters())
    embedder = Embedder(backbone, device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    features = embedder.backbone_features(torch.stack([embedder.transform(image, (0.1, 0.1, 0.9, 0.8))]))
    assert features.shape == (1, 2048)
    # the loaded weights are the file's: the classifier reproduces the file's fc layer
    assert torch.equal(backbone.classifier.weight, state["fc.weight"])


def test_resnet50_missing_weights_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("STL_RESNET50_WEIGHTS", raising=False)
    with pytest.raises(BackboneUnavailable) as caught:
        load_backbone("resnet50")
    message = str(caught.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "checkpoints") in message


def test_resnet50_foreign_file_is_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BackboneUnavailable, match="does not hold torchvision ResNet-50 weights"):
        load_backbone("resnet50", tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneUnavailable, match="not a readable"):
        load_backbone("resnet50", tmp_path / "garbage.pth")


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_backbone("tiny")
    after = torch.rand(3)
    second = load_backbone("tiny")
    assert torch.equal(expected, after)
    assert first.weights_sha256 == second.weights_sha256 and first.dim == 32
    batch = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(first.model(batch), second.model(batch))


def test_efficientnet_lite0_foreign_file_is_a_clear_error(tmp_path):
    # Found by fuzzing: a file that is no weights file was torch's dozen-line traceback.
    junk = tmp_path / "photo.jpg"
    junk.write_bytes(b"\xff\xd8 not a state dict")
    with pytest.raises(BackboneUnavailable, match="is not a readable EfficientNet-Lite0 weights file: [^\n]*$"):
        load_backbone("efficientnet_lite0", junk)
    foreign = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(BackboneUnavailable, match="does not hold EfficientNet-Lite0 weights"):
        load_backbone("efficientnet_lite0", foreign)
