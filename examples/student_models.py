"""Small student networks for knowledge distillation (`edge_sdk.optimize.distill`).

`SmallFashionCNN` has about 55 k parameters, 13% of the teacher `FashionCNN` (about 422 k): same input
(1x1x28x28 float32 in [0, 1], NCHW), 10 logits out.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallFashionCNN"]


class SmallFashionCNN(nn.Module):
    """Fashion-MNIST student: conv3x3(16)-BN-ReLU-pool, conv3x3(32)-BN-ReLU-pool, fc(1568->32)-ReLU, fc(32->10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 32),
            nn.ReLU(inplace=True),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, num_classes)."""
        return self.classifier(self.features(x))
