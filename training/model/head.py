"""The paper's embedding head: Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> L2 normalise."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from training.data.stl import Kind


@dataclass(frozen=True)
class HeadConfig:
    in_dim: int
    hidden_dim: int = 512
    out_dim: int = 128
    dropout: float = 0.2
    separate: bool = False  # one tower for scene crops and one for products, instead of a shared one

    def to_dict(self) -> dict:
        return asdict(self)


class EmbeddingHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(features), dim=-1)


class CompatibilityHead(nn.Module):
    """Maps backbone features of scene crops and product images into one unit-norm space."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        make = lambda: EmbeddingHead(config.in_dim, config.hidden_dim, config.out_dim, config.dropout)  # noqa: E731
        self.scene = make()
        self.product = make() if config.separate else self.scene

    def forward(self, features: torch.Tensor, kind: Kind) -> torch.Tensor:
        if kind not in ("scene", "product"):
            raise ValueError(f"kind must be 'scene' or 'product', got {kind!r}")
        return (self.scene if kind == "scene" else self.product)(features)
