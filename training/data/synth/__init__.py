"""The synthetic STL-format catalogue: `plan` samples it, `draw` renders it."""
