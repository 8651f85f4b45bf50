"""Keras / TensorFlow sources: a ``keras.Model``, a ``.keras`` / ``.h5`` file, or a SavedModel directory.

Keras models are NHWC and usually have a dynamic batch, which is pinned to 1 (other dynamic axes need
``--input-shape``). A Keras 2 ``.h5`` that Keras 3 cannot read is retried with ``tf_keras``; a SavedModel is read
through its ``serving_default`` signature, and a Keras model is exported to one (fixed shapes) when a converter
needs it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, require
from edge_sdk.bundle import sha256_path
from edge_sdk.converters.source_common import (
    ShapeSpec,
    SourceBase,
    flatten,
    guess_layout,
    import_class,
    pin_shapes,
    resolve_dtypes,
)
from edge_sdk.errors import SourceModelError, first_line
from edge_sdk.formats import Framework

__all__ = ["KERAS_SUFFIXES", "KerasSource", "load_keras"]

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


class KerasSource(SourceBase):
    """A Keras model or a TensorFlow SavedModel directory (NHWC images)."""

    framework = Framework.KERAS

    def __init__(self, model: Any, input_shapes: list[list[int]], path: Path | None = None,
                 saved_model: Path | None = None) -> None:
        self.model = model
        self.path = path
        self.sha256 = sha256_path(path) if path else None
        self.input_shapes = input_shapes
        self._saved_model = saved_model
        self._tmp: Path | None = None
        self._signature: Any = None
        if model is not None:
            self.input_names = [t.name.split(":")[0] for t in model.inputs]
            self.output_names = [t.name.split(":")[0] for t in model.outputs]
            if type(model).__module__.startswith("tf_keras") and len(getattr(model, "output_names", [])) == len(
                    self.output_names):  # Keras 2 tensors are named "dense_7/Softmax": use the layer names
                self.output_names = list(model.output_names)
        else:
            sig = self._serving_signature()
            _, kwargs = sig.structured_input_signature
            self.input_names = sorted(kwargs)
            self.output_names = sorted(sig.structured_outputs)
        self.signature_input_names = list(self.input_names)
        dts = [str(getattr(getattr(t, "dtype", "float32"), "name", getattr(t, "dtype", "float32")))
               for t in model.inputs] if model is not None else ["float32"] * len(self.input_names)
        self.input_dtypes = resolve_dtypes(None, self.input_names,
                                           [np.dtype(d).name if d != "string" else d for d in dts])
        self.layout = guess_layout(input_shapes[0]) if self.input_dtypes[0].startswith("float") else ""

    def _serving_signature(self) -> Any:
        if self._signature is None:
            tf = require("tensorflow", "keras")
            loaded = tf.saved_model.load(str(self._saved_model))
            if "serving_default" not in loaded.signatures:
                raise SourceModelError(f"SavedModel {self._saved_model} has no serving_default signature: "
                                       "export it with model.export(path) or tf.saved_model.save(..., signatures=)")
            self._loaded = loaded
            self._signature = loaded.signatures["serving_default"]
        return self._signature

    def saved_model_dir(self) -> Path:
        """A SavedModel directory with a fixed-shape ``serving_default`` signature (exported once)."""
        if self._saved_model is None:
            tf = require("tensorflow", "keras")
            self._tmp = Path(tempfile.mkdtemp(prefix="edge_sdk_savedmodel_"))
            out = self._tmp / "saved_model"
            specs = [tf.TensorSpec(s, tf.as_dtype(dt), name=n) for s, n, dt in zip(
                self.input_shapes, self.input_names, self.input_dtypes, strict=True)]
            if type(self.model).__module__.startswith("tf_keras"):  # a legacy Keras 2 model (see load_keras)
                model = self.model
                fn = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False))
                tf.saved_model.save(model, str(out), signatures=fn.get_concrete_function(*specs))
            else:
                self.model.export(str(out), format="tf_saved_model", input_signature=specs, verbose=False)
            self._saved_model = out
            self.signature_input_names = sorted(self._serving_signature().structured_input_signature[1])
        return self._saved_model

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model (inference mode) and return numpy outputs."""
        if self.model is not None:
            feed = inputs[0] if len(inputs) == 1 else dict(zip(self.input_names, inputs, strict=True))
            out = self.model(feed, training=False)
            return [np.asarray(o) for o in flatten(out)]
        sig = self._serving_signature()
        tf = require("tensorflow", "keras")
        res = sig(**{n: tf.constant(x) for n, x in zip(self.input_names, inputs, strict=True)})
        return [res[k].numpy() for k in self.output_names]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _custom_objects(specs: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``module:name`` strings (or a ready mapping) -> the ``custom_objects`` Keras needs for custom layers."""
    if not specs:
        return {}
    if isinstance(specs, Mapping):
        return dict(specs)
    out: dict[str, Any] = {}
    for spec in specs:
        obj = import_class(spec, "--custom-objects")
        out[spec.partition(":")[2]] = obj
    return out


def _saved_model_source(path: Path, input_shape: ShapeSpec | None) -> KerasSource:
    tf = require("tensorflow", "keras")
    try:
        loaded = tf.saved_model.load(str(path))
        sig = loaded.signatures["serving_default"]
    except Exception as exc:  # TF raises many types for a broken SavedModel
        raise SourceModelError(f"{path} is not a loadable SavedModel with a serving_default signature "
                               f"({first_line(exc, 120)})") from None
    _, kwargs = sig.structured_input_signature
    names = sorted(kwargs)
    shapes = pin_shapes([list(kwargs[n].shape) for n in names], names, input_shape, "SavedModel")
    src = KerasSource(None, shapes, path, saved_model=path)
    src.input_dtypes = [kwargs[n].dtype.as_numpy_dtype().dtype.name if kwargs[n].dtype.is_numpy_compatible
                        else "float32" for n in names]
    return src


def _load_legacy_h5(path: Path, objects: dict[str, Any]) -> Any:
    """A Keras 2 ``.h5`` that Keras 3 cannot read (old recurrent layer configs), loaded with ``tf_keras`` — the
    Keras 2 that TensorFlow still ships for exactly this; None when tf_keras is absent or fails too."""
    if not has_module("tf_keras"):
        return None
    import tf_keras

    try:
        return tf_keras.models.load_model(str(path), compile=False, custom_objects=objects or None)
    except Exception:  # the Keras 3 error is the one reported to the user
        return None


def load_keras(path: Path | None, model: Any, input_shape: ShapeSpec | None,
               custom_objects: Sequence[str] | Mapping[str, Any] | None = None) -> KerasSource:
    """A Keras source from a loaded ``model``, else from ``path`` (a model file or a SavedModel directory)."""
    if model is None:
        keras = require("keras", "keras", "loading Keras models")
        require("tensorflow", "keras", "loading Keras models")
        if path is not None and path.is_dir():
            return _saved_model_source(path, input_shape)
        objects = _custom_objects(custom_objects)
        try:
            model = keras.models.load_model(str(path), compile=False, custom_objects=objects or None)
        except Exception as exc:  # Keras raises anything from a deserialization failure
            legacy = _load_legacy_h5(path, objects) if path is not None and path.suffix.lower() in (".h5", ".hdf5") \
                else None
            if legacy is not None:
                return load_keras(path, legacy, input_shape)
            first = first_line(exc, 160)
            hint = ("if it uses custom layers, pass --custom-objects module:ClassName" if
                    any(w in str(exc) for w in ("Unknown", "custom", "not found", "Could not locate"))
                    else "the file may be truncated or corrupt")
            raise SourceModelError(f"{path} is not a loadable Keras model ({first}): {hint}") from None
    names = [t.name.split(":")[0] for t in model.inputs]
    shapes = pin_shapes([list(t.shape) for t in model.inputs], names, input_shape, "Keras")
    return KerasSource(model, shapes, path)
