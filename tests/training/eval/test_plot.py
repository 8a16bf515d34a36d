import numpy as np
from PIL import Image

from training.eval.plot import plot_hr_curves


def test_plot_writes_a_png(tmp_path):
    path = plot_hr_curves(
        {"popularity": {1: 0.1, 10: 0.4, 100: 0.9}, "trained": {1: 0.2, 10: 0.6, 100: 0.95}},
        {1: 0.01, 10: 0.1, 100: 0.8},
        tmp_path / "plots" / "hr.png",
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 450)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 0  # something was drawn
