"""The synthetic STL-format catalogue: `plan` samples it, `draw` renders it, `generate` writes a dataset.

The planning function `plan.plan` is exported as `plan_catalogue`: exporting it as `plan` would shadow the
`plan` module (`import training.data.synth.plan as m` would then give the function).
"""

from training.data.synth.plan import (
    CONFIG_FILE,
    DEFAULT_CATEGORIES_SOURCE,
    FALLBACK_CATEGORIES,
    GENERATOR_VERSION,
    Catalogue,
    OutputExists,
    SynthConfig,
    SynthSummary,
    generate,
    load_category_counts,
)
from training.data.synth.plan import plan as plan_catalogue

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CATEGORIES_SOURCE",
    "FALLBACK_CATEGORIES",
    "GENERATOR_VERSION",
    "Catalogue",
    "OutputExists",
    "SynthConfig",
    "SynthSummary",
    "generate",
    "load_category_counts",
    "plan_catalogue",
]
