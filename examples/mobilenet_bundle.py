"""The real ImageNet MobileNetV2 as a bundle, built once at a path (benchmarks share it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ensure_mobilenet_bundle"]


def ensure_mobilenet_bundle(path: Path, *, to: str = "onnx", n_val: int = 8) -> Path:
    """The MobileNetV2 fp32 bundle (formats ``to``) at ``path``, converted with ``n_val`` real photo crops as
    validation data when ``path`` holds no bundle yet."""
    if (path / "manifest.json").is_file():
        return path
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    import edge_sdk

    print(f"building the MobileNetV2 bundle in {path} ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    val = path.parent / "mobilenet_val.npy"
    np.save(val, photo_crops(n=n_val, seed=0))
    edge_sdk.convert(mobilenet_v2_weights_path(), model_class="torch_models:MobileNetV2", input_shape=[1, 3, 224, 224],
                     out=path, to=to, precision="fp32", ort=False, val=val,
                     preprocessing=edge_sdk.Preprocessing.imagenet(), name="mobilenet-v2", version="1",
                     overwrite=True, quiet=True)
    return path
