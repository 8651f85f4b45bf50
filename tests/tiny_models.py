"""Small deterministic torch models for pipeline tests (importable for --model-class tiny_models:TinyCNN)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """3x32x32 -> 10 logits; weights dominate the file size so int8 shrinks it ~4x."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_tiny(seed: int = 0) -> TinyCNN:
    """A TinyCNN with fixed random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = TinyCNN()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()
