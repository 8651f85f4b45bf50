"""Load a source model — PyTorch, Keras/TensorFlow or ONNX — into a SourceModel: the one entry point.

Accepted sources:
- PyTorch: an ``nn.Module``; a TorchScript file; a ``torch.export`` program (``.pt2``); a state_dict
  (``.pt``/``.pth``) together with ``model_class="pkg.module:Class"`` (converters/source_torch.py).
- Keras / TensorFlow: a ``keras.Model``; ``.keras``; ``.h5``; a SavedModel directory (converters/source_keras.py).
- ONNX: a ``.onnx`` file; symbolic axes are pinned from ``input_shape`` (converters/source_onnx.py).
- An existing ``.tflite`` or OpenVINO IR ``.xml``: bundled as it is (converters/prebuilt.py).

``input_shape`` is one shape (the first input) or a mapping ``{input name: shape}`` for multi-input
models; ``input_dtypes`` a mapping ``{input name: "int64"}`` for integer inputs (token ids, masks); both are read
the same way for every framework (converters/source_common.py). This module picks the loader by object type or
file suffix and re-exports the source classes, so ``from edge_sdk.converters.sources import ...`` keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_sdk.converters.source_common import InputDtypes, ShapeSpec, import_class
from edge_sdk.converters.source_keras import KERAS_SUFFIXES, KerasSource, load_keras
from edge_sdk.converters.source_onnx import OnnxSource
from edge_sdk.converters.source_torch import TORCH_SUFFIXES, TorchSource, load_torch_file, torch_shapes, with_dynamic
from edge_sdk.errors import SourceModelError

__all__ = ["InputDtypes", "KerasSource", "OnnxSource", "ShapeSpec", "TorchSource", "import_class", "load_source"]


def _no_dynamic(dynamic: Sequence[str], what: str) -> None:
    if dynamic:
        raise SourceModelError(f"--dynamic applies to ONNX and PyTorch sources, not {what}: the artifacts keep the "
                               "static --input-shape")


def load_source(source: Any, *, input_shape: ShapeSpec | None = None, model_class: str | None = None,
                framework: str | None = None, input_dtypes: InputDtypes | None = None,
                custom_objects: Sequence[str] | Mapping[str, Any] | None = None,
                dynamic: Sequence[str] = ()) -> Any:
    """Load any supported source into a SourceModel; raise SourceModelError with a fix on failure."""
    if not isinstance(source, (str, Path)):
        mod = type(source).__module__
        if "torch" in sys.modules and isinstance(source, sys.modules["torch"].nn.Module):
            shapes, names = torch_shapes(input_shape, "an nn.Module")
            return with_dynamic(TorchSource(source.eval(), shapes, None, "module", names, input_dtypes), dynamic)
        if mod.startswith(("keras", "tf_keras", "tensorflow")):
            return load_keras(None, source, input_shape)
        raise SourceModelError(f"unsupported source object {type(source).__name__}: pass an nn.Module, a "
                               "keras.Model or a model file path")
    path = Path(source)
    if not path.exists():
        raise SourceModelError(f"source model {path} does not exist")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return load_keras(path, None, input_shape)
        raise SourceModelError(f"{path} is a directory without saved_model.pb: give a model file or a "
                               "SavedModel directory")
    if path.stat().st_size == 0:
        raise SourceModelError(f"source model {path} is empty (0 bytes): re-export it")
    suffix = path.suffix.lower()
    kind = framework or ("onnx" if suffix == ".onnx" else "pytorch" if suffix in TORCH_SUFFIXES
                         else "keras" if suffix in KERAS_SUFFIXES
                         else "tflite" if suffix == ".tflite" else "openvino" if suffix == ".xml" else None)
    if kind == "onnx":
        return OnnxSource(path, input_shape, dynamic, input_dtypes)
    if kind == "pytorch":
        return with_dynamic(load_torch_file(path, input_shape, model_class, input_dtypes), dynamic)
    if kind == "keras":
        _no_dynamic(dynamic, "Keras")
        return load_keras(path, None, input_shape, custom_objects)
    if kind in ("tflite", "openvino"):
        _no_dynamic(dynamic, "an existing .tflite / IR")
        from edge_sdk.converters.prebuilt import load_prebuilt

        return load_prebuilt(path, input_shape, framework=kind)
    raise SourceModelError(f"cannot tell the framework of {path.name}: use .onnx, .pt/.pth/.pt2, .keras/.h5, "
                           ".tflite, an OpenVINO .xml or a SavedModel directory (or pass --framework)")
