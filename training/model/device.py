"""Device choice shared by training, index build and service: CUDA when present, else CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available; asking for `cuda` on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu")
    if device.type not in {"cpu", "cuda"}:
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return device
