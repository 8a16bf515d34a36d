"""The embedder: crop geometry, one vector per input whichever path computes it, fingerprints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from training.model.backbones import load_backbone
from training.model.checkpoint import Checkpoint, CheckpointMismatch, load_embedder, save_checkpoint
from training.model.embedder import METRIC, Embedder
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import CropTooSmall, Preprocess, bbox_to_pixels, load_image, to_tensor


def _image(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _head(in_dim: int = 32, out_dim: int = 16) -> CompatibilityHead:
    torch.manual_seed(1)
    head = CompatibilityHead(HeadConfig(in_dim=in_dim, hidden_dim=24, out_dim=out_dim, dropout=0.5))
    # Non-trivial running statistics, so eval mode and train mode give visibly different outputs.
    head.scene.layers[1].running_mean.uniform_(-1.0, 1.0)
    head.scene.layers[1].running_var.uniform_(0.5, 2.0)
    return head


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


# --- crop geometry -------------------------------------------------------------------------------------


def test_bbox_to_pixels_exact_on_known_size():
    assert bbox_to_pixels(200, 100, (0.25, 0.1, 0.75, 0.9)) == (50, 10, 150, 90)
    # 0.7 * 10 is 7.000000000000001 in floating point: must stay 7, not grow to 8.
    assert bbox_to_pixels(10, 10, (0.3, 0.3, 0.7, 0.7)) == (3, 3, 7, 7)


def test_context_grows_box_on_each_side():
    tight = bbox_to_pixels(200, 100, (0.25, 0.25, 0.75, 0.75), context=0.0)
    grown = bbox_to_pixels(200, 100, (0.25, 0.25, 0.75, 0.75), context=0.1)
    assert tight == (50, 25, 150, 75)
    # 10% of the 100x50 box on each side: 10 px horizontally, 5 px vertically.
    assert grown == (40, 20, 160, 80)


def test_context_is_clamped_at_image_edges():
    assert bbox_to_pixels(100, 100, (0.0, 0.05, 0.5, 1.0), context=0.2) == (0, 0, 60, 100)


def test_none_bbox_is_whole_image_whatever_the_context():
    assert bbox_to_pixels(37, 23, None, context=0.5) == (0, 0, 37, 23)


def test_tiny_crop_raises():
    with pytest.raises(CropTooSmall, match="at least 4x4"):
        bbox_to_pixels(100, 100, (0.5, 0.5, 0.52, 0.9))
    with pytest.raises(CropTooSmall):
        bbox_to_pixels(3, 3, None)


def test_transform_crops_what_the_box_says(tiny):
    # Left half red, right half blue: a tight crop of the right half is pure blue.
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, :40, 0] = 255
    array[:, 40:, 2] = 255
    embedder = Embedder(tiny, context=0.0, device="cpu")
    tensor = embedder.transform(Image.fromarray(array), (0.5, 0.0, 1.0, 1.0))
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    # mean = std = 0.5: 0 -> -1, 255 -> +1
    assert torch.allclose(tensor[0], torch.full((64, 64), -1.0))
    assert torch.allclose(tensor[2], torch.full((64, 64), 1.0))


def test_normalisation_matches_definition(tiny):
    image = _image()
    preprocess = Preprocess(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.0)
    tensor = to_tensor(image, None, preprocess)
    resized = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    expected = (resized - np.asarray(preprocess.mean)) / np.asarray(preprocess.std)
    np.testing.assert_allclose(tensor.numpy(), expected.transpose(2, 0, 1), atol=1e-5)


def test_load_image_decodes_rgb_and_rejects_garbage():
    buffer = io.BytesIO()
    Image.new("L", (10, 8), 128).save(buffer, format="PNG")
    image = load_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (10, 8)
    with pytest.raises(OSError):
        load_image(b"not an image")


@pytest.mark.parametrize("orientation, transpose", [(1, None), (6, Image.Transpose.ROTATE_270),
                                                    (3, Image.Transpose.ROTATE_180)])
def test_load_image_applies_exif_orientation(orientation, transpose):
    # Phone photos are stored sideways with an EXIF Orientation tag; the bbox refers to the upright picture.
    stored = _image(40, 24)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    image = load_image(buffer.getvalue())
    expected = stored if transpose is None else stored.transpose(transpose)
    assert image.mode == "RGB" and image.size == expected.size
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


# --- one vector per input, whichever path computes it --------------------------------------------------


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_all_paths_give_the_same_vector(tiny, with_head, channels_last):
    head = _head() if with_head else None
    embedder = Embedder(tiny, head, context=0.1, device="cpu", channels_last=channels_last)
    images = [_image(seed=seed) for seed in range(3)]
    boxes = [(0.1, 0.2, 0.6, 0.9), (0.0, 0.0, 1.0, 1.0), (0.3, 0.1, 0.9, 0.5)]

    pairs = list(zip(images, boxes, strict=True))
    single = np.concatenate([embedder.embed([image], [box], "scene") for image, box in pairs])
    batch = torch.stack([embedder.transform(image, box) for image, box in pairs])
    batched = embedder.embed_batch(batch, "scene")
    cached = embedder.project(embedder.backbone_features(batch).numpy(), "scene")

    assert single.dtype == np.float32 and single.shape == (3, embedder.dim)
    np.testing.assert_allclose(single, batched, atol=1e-5)
    np.testing.assert_allclose(single, cached, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, atol=1e-5)
    # different crops are different vectors (the test would pass trivially on a constant embedder)
    assert not np.allclose(single[0], single[2], atol=1e-3)


def test_channels_last_does_not_change_features(tiny):
    batch = torch.stack([Embedder(tiny, device="cpu").transform(_image(seed=s)) for s in range(2)])
    plain = Embedder(tiny, device="cpu", channels_last=False).backbone_features(batch)
    nhwc = Embedder(tiny, device="cpu", channels_last=True).backbone_features(batch)
    torch.testing.assert_close(plain, nhwc, atol=1e-5, rtol=1e-5)


def test_head_left_in_train_mode_is_run_in_eval_and_restored(tiny):
    head = _head()
    embedder = Embedder(tiny, head, device="cpu")
    images = [_image(seed=seed) for seed in range(4)]
    reference = embedder.embed(images, None, "product")

    head.train()  # e.g. a trainer validating mid-epoch with the head it is training
    assert np.allclose(embedder.embed(images, None, "product"), reference, atol=1e-6)
    assert head.training, "the caller's mode must be given back"
    # Sanity: in train mode the head itself really does differ (BatchNorm batch stats, dropout).
    with torch.no_grad():
        features = embedder.backbone_features(torch.stack([embedder.transform(image) for image in images]))
        raw = head(features, "product").numpy()
    assert not np.allclose(raw, reference, atol=1e-3)
    head.eval()
    # a single image works too (BatchNorm in train mode would refuse a batch of one)
    assert embedder.embed(images[:1], None, "product").shape == (1, 16)


def test_output_dim_follows_head(tiny):
    assert Embedder(tiny, device="cpu").dim == 32
    embedder = Embedder(tiny, _head(out_dim=8), device="cpu")
    vectors = embedder.embed([_image()], [None], "scene")
    assert embedder.dim == 8 and vectors.shape == (1, 8) and vectors.dtype == np.float32
    assert embedder.embed([], None, "scene").shape == (0, 8)


def test_bad_inputs_are_clear_errors(tiny):
    embedder = Embedder(tiny, device="cpu")
    with pytest.raises(ValueError, match="2 images but 1 bboxes"):
        embedder.embed([_image(), _image()], [None], "scene")
    with pytest.raises(ValueError, match="backbone features"):
        embedder.project(np.zeros((2, 5), dtype=np.float32), "scene")
    with pytest.raises(ValueError, match="kind"):
        embedder.project(np.zeros((2, 32), dtype=np.float32), "shoe")
    with pytest.raises(ValueError, match="context"):
        Embedder(tiny, context=-0.1, device="cpu")


# --- fingerprint and checkpoints -------------------------------------------------------------------------


def test_fingerprint_contents(tiny):
    embedder = Embedder(tiny, _head(out_dim=16), context=0.25, device="cpu", head_sha256="abc")
    fingerprint = embedder.fingerprint()
    assert fingerprint == {
        "backbone": "tiny",
        "backbone_weights_sha256": tiny.weights_sha256,
        "preprocess": {"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "context": 0.25,
                       "jpeg_draft": False},
        "head_sha256": "abc",
        "dim": 16,
        "metric": METRIC,
    }
    assert len(tiny.weights_sha256) == 64
    other = Embedder(tiny, context=0.0, device="cpu").preprocess
    assert other.sha256() != embedder.preprocess.sha256()
    assert Preprocess.from_dict(embedder.preprocess.to_dict()) == embedder.preprocess


def _checkpoint(tiny, preprocess: Preprocess) -> Checkpoint:
    head = _head()
    return Checkpoint(head.config, head.state_dict(), "tiny", tiny.weights_sha256, preprocess)


def test_from_checkpoint_round_trip(tiny, tmp_path):
    preprocess = Preprocess(tiny.image_size, tiny.mean, tiny.std, 0.2)
    sha = save_checkpoint(tmp_path / "head.pt", _checkpoint(tiny, preprocess))
    embedder = load_embedder(tmp_path / "head.pt", device="cpu")
    assert embedder.preprocess == preprocess and embedder.head_sha256 == sha and embedder.dim == 16
    direct = Embedder(tiny, _head(), context=0.2, device="cpu")
    np.testing.assert_allclose(embedder.embed([_image()], None, "scene"), direct.embed([_image()], None, "scene"),
                               atol=1e-6)


def test_from_checkpoint_refuses_other_preprocessing(tiny, tmp_path):
    preprocess = Preprocess(128, tiny.mean, tiny.std, 0.2)  # trained at another resolution
    save_checkpoint(tmp_path / "head.pt", _checkpoint(tiny, preprocess))
    with pytest.raises(CheckpointMismatch, match="preprocessing"):
        load_embedder(tmp_path / "head.pt", device="cpu")


def test_jpeg_draft_decodes_big_photos_smaller_but_keeps_the_crop(tiny, tmp_path):
    from training.model.preprocess import load_crop

    path = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    # smooth content, so the reduced-scale decode approximates the full one
    gradient = np.linspace(0, 255, 1024, dtype=np.float32)
    array = np.stack([np.tile(gradient, (768, 1)), np.tile(gradient[:768, None], (1, 1024)),
                      rng.uniform(100, 140, (768, 1024))], axis=-1).astype(np.uint8)
    Image.fromarray(array).save(path, quality=95)
    full = Embedder(tiny, context=0.0, device="cpu")
    draft = Embedder(tiny, context=0.0, device="cpu", jpeg_draft=True)
    assert full.load_image(path).size == (1024, 768)
    assert draft.load_image(path).size == (128, 96)  # 1/8 scale still gives >= 64 px (tiny's input size)
    # a small crop needs more pixels: only 1/2 scale keeps 0.2 * 512 >= 64
    assert draft.load_image(path, (0.1, 0.1, 0.3, 0.5)).size == (512, 384)
    assert draft.preprocess.sha256() != full.preprocess.sha256()
    close = load_crop(path, (0.1, 0.1, 0.6, 0.6), draft.preprocess)
    exact = load_crop(path, (0.1, 0.1, 0.6, 0.6), full.preprocess)
    assert (close - exact).abs().mean() < 0.05


def test_cpu_freeze_matches_the_eager_backbone() -> None:
    frozen = Embedder(load_backbone("tiny"), device="cpu", freeze=True)
    eager = Embedder(load_backbone("tiny"), device="cpu", freeze=False)
    assert isinstance(frozen.model, torch.jit.ScriptModule)
    assert not isinstance(eager.model, torch.jit.ScriptModule)
    images = [Image.new("RGB", (80, 60), (200, 40, 90)), Image.new("RGB", (50, 70), (10, 160, 220))]
    np.testing.assert_allclose(frozen.embed(images, None, "product"), eager.embed(images, None, "product"), atol=1e-5)
