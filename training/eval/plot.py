"""The HR@K curves of several models against the random reference, as a PNG (the paper's Figure 6)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

# The object API with an explicit Agg canvas never touches pyplot's global backend or figure list,
# so it is safe in servers, threads and tests.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOG = logging.getLogger(__name__)


def plot_hr_curves(
    results: Mapping[str, Mapping[int, float]], random_curve: Mapping[int, float], path: str | Path,
    title: str = "HR@K on the test split",
) -> Path:
    """HR@K against K (as the paper's Figure 6): one solid curve per model, random dashed; writes a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    all_ks: set[int] = set(random_curve)
    for name, curve in results.items():
        ks = sorted(int(k) for k in curve)
        all_ks.update(ks)
        axes.plot(ks, [curve[k] for k in ks], marker="o", markersize=3, label=name)
    random_ks = sorted(int(k) for k in random_curve)
    axes.plot(random_ks, [random_curve[k] for k in random_ks], linestyle="--", color="gray", label="random")
    axes.set_xscale("log")  # K spans 1..100: a log axis keeps the small-K region readable
    ticks = sorted(all_ks)
    axes.set_xticks(ticks, [str(k) for k in ticks])
    axes.minorticks_off()
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("K")
    axes.set_ylabel("HR@K")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    LOG.info("wrote %s", path)
    return path
