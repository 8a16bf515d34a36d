"""The synthetic STL-format catalogue: `plan` samples it, `draw` renders it, `products` describes it (title,
labels, price...), `generate` writes a dataset.

The planning function `plan.plan` is exported as `plan_catalogue`: exporting it as `plan` would shadow the
`plan` module (`import training.data.synth.plan as m` would then give the function).
"""

from training.data.synth.plan import (
    CONFIG_FILE,
    DEFAULT_CATEGORIES_SOURCE,
    DUPLICATES_FILE,
    FALLBACK_CATEGORIES,
    GENERATOR_VERSION,
    Catalogue,
    OutputExists,
    SynthConfig,
    SynthSummary,
    generate,
    load_category_counts,
    product_records,
    read_duplicates,
)
from training.data.synth.plan import plan as plan_catalogue

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CATEGORIES_SOURCE",
    "DUPLICATES_FILE",
    "FALLBACK_CATEGORIES",
    "GENERATOR_VERSION",
    "Catalogue",
    "OutputExists",
    "SynthConfig",
    "SynthSummary",
    "generate",
    "load_category_counts",
    "plan_catalogue",
    "product_records",
    "read_duplicates",
]
