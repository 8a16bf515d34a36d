"""Device choice shared by training, index build and service: CUDA when present, else CPU."""

from __future__ import annotations

import torch

from training.errors import DataError, Unavailable


class DeviceUnavailable(Unavailable, ValueError):
    """A device was asked for that this machine does not have (a ValueError too, for older callers)."""


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available; asking for `cuda` on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch's own message for a string it cannot parse
        raise DataError(f"unsupported device {name!r}; use auto, cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu")
    if device.type not in {"cpu", "cuda"}:
        raise DataError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return device
