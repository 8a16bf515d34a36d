"""The numpy preprocessing is pixel-identical to the torch path, and its geometry errors are the same."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from training.model import arrays
from training.model.arrays import to_array
from training.model.preprocess import Preprocess, bbox_to_pixels, to_tensor

BOXES = [None, (0.25, 0.1, 0.75, 0.9), (0.0, 0.0, 1.0, 1.0), (0.3, 0.3, 0.7, 0.7), (0.9, 0.85, 1.0, 1.0),
         (0.05, 0.6, 0.31, 0.99)]


def _image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("preprocess", [
    Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.1),
    Preprocess(37, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), context=0.0),
    Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.25),
])
def test_to_array_equals_to_tensor_bit_for_bit(preprocess):
    for seed, (width, height) in enumerate([(80, 60), (333, 517), (640, 427)]):
        image = _image(width, height, seed)
        for bbox in BOXES:
            array = to_array(image, bbox, preprocess)
            assert array.dtype == np.float32 and array.shape == (3, preprocess.image_size, preprocess.image_size)
            assert array.flags.c_contiguous
            assert np.array_equal(array, to_tensor(image, bbox, preprocess).numpy()), (seed, bbox)


@pytest.mark.parametrize("bbox", [(0.2, 0.3, 0.6, 0.8), None])  # None: the whole image, resized uncropped
def test_to_array_is_the_normalised_bilinear_crop(bbox):
    """An independent reference (plain float64 arithmetic), now that to_tensor wraps to_array."""
    preprocess = Preprocess(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), context=0.1)
    image = _image(200, 150, 7)
    box = bbox_to_pixels(200, 150, bbox, 0.1)
    crop = np.asarray(image.crop(box).resize((48, 48), Image.Resampling.BILINEAR), dtype=np.float64)
    expected = ((crop / 255.0 - np.array(preprocess.mean)) / np.array(preprocess.std)).transpose(2, 0, 1)
    np.testing.assert_allclose(to_array(image, bbox, preprocess), expected, atol=2e-6)


def _pixels_or_error(function, *args):
    try:
        return function(*args)
    except ValueError as exc:
        return type(exc).__name__, str(exc)


def test_bbox_geometry_and_errors_match_preprocess():
    outcomes = []
    for bbox in [*BOXES, (0.1, 0.2, 0.1000001, 0.9)]:
        for context in (0.0, 0.1, 0.5):
            expected = _pixels_or_error(bbox_to_pixels, 97, 45, bbox, context)
            assert _pixels_or_error(arrays.bbox_to_pixels, 97, 45, bbox, context) == expected
            outcomes.append(expected)
    assert any(outcome[0] == "CropTooSmall" for outcome in outcomes)  # the error path was compared too


def test_crop_too_small_is_a_data_error():
    from training.errors import DataError

    preprocess = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(DataError):
        to_array(_image(100, 100, 0), (0.5, 0.5, 0.51, 0.51), preprocess)


def test_arrays_imports_no_torch():
    code = "import sys, training.model.arrays; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_array_writes_into_a_row_of_a_batch_and_refuses_a_wrong_one():
    preprocess = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.1)
    image = _image(90, 70, seed=4)
    batch = np.full((2, 3, 32, 32), np.nan, dtype=np.float32)
    written = to_array(image, BOXES[1], preprocess, out=batch[1])
    assert np.shares_memory(written, batch)
    assert np.array_equal(batch[1], to_array(image, BOXES[1], preprocess))
    assert np.isnan(batch[0]).all()  # the other row is untouched
    with pytest.raises(ValueError, match="out must be float32"):
        to_array(image, None, preprocess, out=np.empty((3, 31, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="out must be float32"):
        to_array(image, None, preprocess, out=np.empty((3, 32, 32), dtype=np.float64))


def test_reducing_gap_resizes_a_small_source_exactly_and_a_big_one_closely() -> None:
    plain = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.0)
    gapped = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.0, reducing_gap=2.0)
    small = _image(60, 50, seed=1)  # under 2x the output a side: no reduce() step
    assert np.array_equal(to_array(small, None, plain), to_array(small, None, gapped))
    big = _image(400, 300, seed=2).resize((400, 300), Image.Resampling.BICUBIC)
    exact, fast = to_array(big, None, plain), to_array(big, None, gapped)
    assert not np.array_equal(exact, fast)
    assert float(np.abs(exact - fast).max()) <= 8 / 255 / 0.5  # a few grey levels at most, normalised


def test_reducing_gap_is_left_out_of_an_older_fingerprint() -> None:
    plain = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.1)
    assert "reducing_gap" not in plain.to_dict()  # every preprocessing written before it keeps its sha256
    gapped = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), context=0.1, reducing_gap=2.0)
    assert Preprocess.from_dict(gapped.to_dict()) == gapped and gapped.sha256() != plain.sha256()
    assert Preprocess.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="reducing_gap"):
        Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), reducing_gap=0.5)
