"""Load a source model — PyTorch, Keras/TensorFlow or ONNX — into a :class:`SourceModel`.

Accepted sources:
- PyTorch: an ``nn.Module``; a TorchScript file; a ``torch.export`` program (``.pt2``); a state_dict
  (``.pt``/``.pth``) together with ``model_class="pkg.module:Class"``.
- Keras / TensorFlow: a ``keras.Model``; ``.keras``; ``.h5``; a SavedModel directory.
- ONNX: a ``.onnx`` file.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.bundle import sha256_path
from edge_sdk.errors import SourceModelError
from edge_sdk.formats import Framework

__all__ = ["KerasSource", "OnnxSource", "TorchSource", "import_class", "load_source"]

_TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript", ".jit")
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def _guess_layout(shape: list[int]) -> str:
    if len(shape) == 4:
        if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
            return "NCHW"
        if shape[3] in (1, 3, 4):
            return "NHWC"
    return ""


def _check_shape(shape: Any) -> list[int]:
    try:
        out = [int(s) for s in shape]
    except (TypeError, ValueError):
        raise SourceModelError(f"input shape {shape!r} is not a list of integers: use e.g. 1,3,224,224") from None
    if not out or any(s <= 0 for s in out):
        raise SourceModelError(f"input shape {out} must be positive integers: use e.g. 1,3,224,224")
    return out


class _Base:
    framework: Framework
    path: Path | None = None
    sha256: str | None = None
    input_names: list[str]
    input_shapes: list[list[int]]
    output_names: list[str]
    layout: str = ""

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` entry."""
        return {"framework": self.framework.value, "file": self.path.name if self.path else None,
                "sha256": self.sha256, "kind": type(self).__name__}

    def close(self) -> None:
        """Remove temporary files made while loading."""


class TorchSource(_Base):
    """A PyTorch model in eval mode with known input shapes."""

    framework = Framework.PYTORCH

    def __init__(self, model: Any, input_shapes: list[list[int]], path: Path | None = None, kind: str = "module"):
        self.model = model
        self.path = path
        self.sha256 = sha256_path(path) if path else None
        self.kind = kind
        self.input_shapes = input_shapes
        self.input_names = ["input"] if len(input_shapes) == 1 else [f"input_{i}" for i in range(len(input_shapes))]
        self.layout = _guess_layout(input_shapes[0])
        outs = self.predict([np.zeros(s, np.float32) for s in input_shapes])
        self.output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]

    def example_inputs(self) -> tuple[Any, ...]:
        """Zero tensors of the input shapes."""
        torch = require("torch", "torch")
        return tuple(torch.zeros(s) for s in self.input_shapes)

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model (no grad) and return numpy outputs, flattened from tuples/lists/dicts."""
        torch = require("torch", "torch")
        with torch.no_grad():
            try:
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in inputs])
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shapes = [list(x.shape) for x in inputs]
                first = str(exc).strip().splitlines()[0][:200]
                raise SourceModelError(f"the PyTorch model rejects inputs of shape {shapes} ({first}): "
                                       "pass the --input-shape the model was built for") from None
        return [t.detach().cpu().numpy() for t in _flatten(out)]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["kind"] = self.kind
        return d


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, dict):
        return [v for k in out for v in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [v for o in out for v in _flatten(o)]
    return [out]


class KerasSource(_Base):
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
        else:
            sig = self._serving_signature()
            _, kwargs = sig.structured_input_signature
            self.input_names = sorted(kwargs)
            self.output_names = sorted(sig.structured_outputs)
        self.signature_input_names = list(self.input_names)
        self.layout = _guess_layout(input_shapes[0])

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
            specs = [tf.TensorSpec(s, tf.float32, name=n) for s, n in zip(self.input_shapes, self.input_names,
                                                                             strict=True)]
            self.model.export(str(out), format="tf_saved_model", input_signature=specs, verbose=False)
            self._saved_model = out
            self.signature_input_names = sorted(self._serving_signature().structured_input_signature[1])
        return self._saved_model

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model (inference mode) and return numpy outputs."""
        if self.model is not None:
            feed = inputs[0] if len(inputs) == 1 else dict(zip(self.input_names, inputs, strict=True))
            out = self.model(feed, training=False)
            return [np.asarray(o) for o in _flatten(out)]
        sig = self._serving_signature()
        tf = require("tensorflow", "keras")
        res = sig(**{n: tf.constant(x) for n, x in zip(self.input_names, inputs, strict=True)})
        return [res[k].numpy() for k in self.output_names]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class OnnxSource(_Base):
    """An ONNX file, run with ONNX Runtime for reference outputs."""

    framework = Framework.ONNX

    def __init__(self, path: Path, input_shape: list[int] | None = None) -> None:
        onnx = require("onnx", "onnx", "reading ONNX models")
        from google.protobuf.message import DecodeError
        self.path = self.model = path
        try:
            proto = onnx.load(str(path), load_external_data=False)
            onnx.checker.check_model(str(path))  # by path: also checks external data files
        except (onnx.checker.ValidationError, ValueError, OSError) as exc:
            raise SourceModelError(f"{path} is not a valid ONNX model ({str(exc).splitlines()[0][:160]}): "
                                   "re-export it, the file may be truncated or corrupt") from None
        except DecodeError:
            raise SourceModelError(f"{path} is not a valid ONNX model (protobuf decode failed): "
                                   "re-export it, the file may be truncated or corrupt") from None
        self.sha256 = sha256_path(path)
        inits = {i.name for i in proto.graph.initializer}
        graph_inputs = [i for i in proto.graph.input if i.name not in inits]
        self.input_names = [i.name for i in graph_inputs]
        self.output_names = [o.name for o in proto.graph.output]
        shapes = []
        for k, inp in enumerate(graph_inputs):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
            if input_shape is not None and k == 0:
                given = _check_shape(input_shape)
                if len(given) != len(dims) or any(d not in (None, g) for d, g in zip(dims, given, strict=True)):
                    raise SourceModelError(f"--input-shape {given} does not fit the ONNX input "
                                           f"{inp.name!r} {['?' if d is None else d for d in dims]}: "
                                           "pass a shape that matches the model")
                dims = given
            if dims and dims[0] is None:
                dims[0] = 1
            if any(d is None for d in dims):
                raise SourceModelError(f"ONNX input {inp.name!r} has dynamic dimensions {dims}: pass "
                                       "--input-shape with concrete sizes")
            shapes.append([int(d) for d in dims])
        self.input_shapes = shapes
        self.layout = _guess_layout(shapes[0]) if shapes else ""
        self._session: Any = None

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run with ONNX Runtime (CPU, fp32)."""
        if self._session is None:
            ort = require("onnxruntime", "onnx", "running the ONNX source")
            self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        feeds = {n: np.ascontiguousarray(x) for n, x in zip(self.input_names, inputs, strict=True)}
        return list(self._session.run(None, feeds))


def import_class(spec: str, what: str = "--model-class") -> Any:
    """Import ``package.module:Class``; raise SourceModelError naming ``what`` (the flag it came from) on failure."""
    mod_name, _, cls_name = spec.partition(":")
    if not mod_name or not cls_name:
        raise SourceModelError(f"{what} {spec!r} must look like package.module:ClassName")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SourceModelError(f"cannot import {mod_name!r} for {what} ({exc}): make sure it is on "
                               "PYTHONPATH") from None
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise SourceModelError(f"module {mod_name!r} has no class {cls_name!r} ({what})") from None


def _load_torch_file(path: Path, input_shape: list[int] | None, model_class: str | None) -> TorchSource:
    torch = require("torch", "torch", "loading PyTorch models")
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise SourceModelError(f"{path} is not a readable torch.export program ({str(exc)[:120]}): "
                                   "re-save it with torch.export.save") from None
        shapes = [list(t.shape) for t in _flatten(program.example_inputs[0])]
        return TorchSource(program.module(), [_check_shape(input_shape)] if input_shape else shapes, path, "export")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.split("/", 1)[-1].startswith("code/") for n in names) or any(n.endswith("constants.pkl")
                                                                             for n in names):
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                raise SourceModelError(f"{path} is not a loadable TorchScript file ({str(exc)[:120]})") from None
            if input_shape is None:
                raise SourceModelError("TorchScript sources need --input-shape (e.g. 1,3,224,224)")
            return TorchSource(module.eval(), [_check_shape(input_shape)], path, "torchscript")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SourceModelError(f"{path} is not a readable PyTorch file ({str(exc).splitlines()[0][:120]}): "
                               "the file may be truncated or corrupt; save a state_dict, TorchScript or .pt2") from None
    except pickle.UnpicklingError:  # weights_only refuses a pickled module
        raise SourceModelError(f"{path} holds a pickled object, not a state_dict: save model.state_dict() and "
                               "pass --model-class, or save TorchScript / torch.export") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SourceModelError(f"{path} does not hold a state_dict: save model.state_dict()")
    if not model_class:
        raise SourceModelError(f"{path} is a state_dict: pass --model-class package.module:Class to rebuild "
                               "the model")
    cls = import_class(model_class)
    try:
        module = cls()
        module.load_state_dict(obj, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise SourceModelError(f"state_dict {path.name} does not fit {model_class} "
                               f"({str(exc).splitlines()[0][:160]}): check --model-class") from None
    if input_shape is None:
        raise SourceModelError("state_dict sources need --input-shape (e.g. 1,3,224,224)")
    return TorchSource(module.eval(), [_check_shape(input_shape)], path, "state_dict")


def _load_keras(path: Path | None, model: Any, input_shape: list[int] | None) -> KerasSource:
    if model is None:
        keras = require("keras", "keras", "loading Keras models")
        require("tensorflow", "keras", "loading Keras models")
        if path is not None and path.is_dir():
            tf = require("tensorflow", "keras")
            try:
                loaded = tf.saved_model.load(str(path))
                sig = loaded.signatures["serving_default"]
            except (OSError, ValueError, KeyError, tf.errors.OpError) as exc:
                raise SourceModelError(f"{path} is not a loadable SavedModel with a serving_default signature "
                                       f"({str(exc).splitlines()[0][:120]})") from None
            _, kwargs = sig.structured_input_signature
            shapes = []
            for name in sorted(kwargs):
                dims = list(kwargs[name].shape)
                if dims and dims[0] is None:
                    dims[0] = 1
                shapes.append(dims)
            if input_shape:
                shapes[0] = _check_shape(input_shape)
            if any(d is None for s in shapes for d in s):
                raise SourceModelError("SavedModel inputs have dynamic dimensions: pass --input-shape")
            if any(d is None for s in shapes for d in s) or any(
                    len(s) != len(kwargs[n].shape) for s, n in zip(shapes, sorted(kwargs), strict=True)):
                raise SourceModelError(f"--input-shape {input_shape} does not fit the SavedModel inputs")
            return KerasSource(None, [[int(d) for d in s] for s in shapes], path, saved_model=path)
        try:
            model = keras.models.load_model(str(path), compile=False)
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
            raise SourceModelError(f"{path} is not a loadable Keras model ({str(exc).splitlines()[0][:120]}): "
                                   "the file may be truncated or corrupt") from None
    shapes = []
    for k, t in enumerate(model.inputs):
        dims = list(t.shape)
        if dims and dims[0] is None:
            dims[0] = 1
        if input_shape and k == 0:
            given = _check_shape(input_shape)
            if len(given) != len(dims) or any(d not in (None, g) for d, g in zip(dims, given, strict=True)):
                raise SourceModelError(f"--input-shape {given} does not fit the Keras input "
                                       f"{['?' if d is None else d for d in dims]}: pass a matching shape")
            dims = given
        if any(d is None for d in dims):
            raise SourceModelError(f"Keras input {t.name!r} has dynamic dimensions {dims}: pass --input-shape")
        shapes.append([int(d) for d in dims])
    return KerasSource(model, shapes, path)


def load_source(source: Any, *, input_shape: list[int] | None = None, model_class: str | None = None,
                framework: str | None = None) -> TorchSource | KerasSource | OnnxSource:
    """Load any supported source into a SourceModel; raise SourceModelError with a fix on failure."""
    if not isinstance(source, (str, Path)):
        mod = type(source).__module__
        if "torch" in sys.modules and isinstance(source, sys.modules["torch"].nn.Module):
            if input_shape is None:
                raise SourceModelError("an nn.Module source needs input_shape (e.g. [1, 3, 224, 224])")
            return TorchSource(source.eval(), [_check_shape(input_shape)])
        if mod.startswith(("keras", "tf_keras", "tensorflow")):
            return _load_keras(None, source, input_shape)
        raise SourceModelError(f"unsupported source object {type(source).__name__}: pass an nn.Module, a "
                               "keras.Model or a model file path")
    path = Path(source)
    if not path.exists():
        raise SourceModelError(f"source model {path} does not exist")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return _load_keras(path, None, input_shape)
        raise SourceModelError(f"{path} is a directory without saved_model.pb: give a model file or a "
                               "SavedModel directory")
    if path.stat().st_size == 0:
        raise SourceModelError(f"source model {path} is empty (0 bytes): re-export it")
    suffix = path.suffix.lower()
    kind = framework or ("onnx" if suffix == ".onnx" else "pytorch" if suffix in _TORCH_SUFFIXES
                         else "keras" if suffix in _KERAS_SUFFIXES else None)
    if kind == "onnx":
        return OnnxSource(path, input_shape)
    if kind == "pytorch":
        return _load_torch_file(path, input_shape, model_class)
    if kind == "keras":
        return _load_keras(path, None, input_shape)
    raise SourceModelError(f"cannot tell the framework of {path.name}: use .onnx, .pt/.pth/.pt2, .keras/.h5 "
                           "or a SavedModel directory (or pass --framework)")
