"""Load a source model — PyTorch, Keras/TensorFlow or ONNX — into a :class:`SourceModel`.

Accepted sources:
- PyTorch: an ``nn.Module``; a TorchScript file; a ``torch.export`` program (``.pt2``); a state_dict
  (``.pt``/``.pth``) together with ``model_class="pkg.module:Class"``.
- Keras / TensorFlow: a ``keras.Model``; ``.keras``; ``.h5``; a SavedModel directory.
- ONNX: a ``.onnx`` file; symbolic axes are pinned from ``input_shape`` (converters/onnx_shapes.py).
- An existing ``.tflite`` or OpenVINO IR ``.xml``: bundled as it is (converters/prebuilt.py).

``input_shape`` is one shape (the first input) or a mapping ``{input name: shape}`` for multi-input
models; ``input_dtypes`` a mapping ``{input name: "int64"}`` for integer inputs (token ids, masks).
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, require
from edge_sdk.bundle import sha256_path
from edge_sdk.errors import SourceModelError, first_line
from edge_sdk.formats import Framework

__all__ = ["InputDtypes", "KerasSource", "OnnxSource", "ShapeSpec", "TorchSource", "import_class", "load_source"]

#: One shape (the first input's) or ``{input name: shape}``.
ShapeSpec = Sequence[int] | Mapping[str, Sequence[int]]
#: ``{input name: numpy dtype name}`` or one dtype name per input, in order.
InputDtypes = Mapping[str, str] | Sequence[str]

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


def _given(spec: ShapeSpec | None, k: int, name: str) -> list[int] | None:
    """The shape the user gave for input ``k`` called ``name`` (None when none was given for it)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _check_shape(spec[name]) if name in spec else None
    return _check_shape(spec) if k == 0 else None


def _check_names(spec: ShapeSpec | Mapping[str, Any] | None, names: list[str], what: str) -> None:
    if isinstance(spec, Mapping):
        unknown = [n for n in spec if n not in names]
        if unknown:
            raise SourceModelError(f"{what} names {unknown} that the model does not have: its inputs are "
                                   f"{names}")


def _dtypes(spec: InputDtypes | None, names: list[str], default: list[str] | None = None) -> list[str]:
    """numpy dtype names per input (float32 unless given)."""
    out = list(default or ["float32"] * len(names))
    if spec is None:
        return out
    if isinstance(spec, str):
        spec = [spec]
    _check_names(spec, names, "--input-dtype")
    items = spec.items() if isinstance(spec, Mapping) else zip(names, spec, strict=False)
    for name, dt in items:
        try:
            out[names.index(name)] = np.dtype(str(dt)).name
        except TypeError:
            raise SourceModelError(f"--input-dtype {dt!r} for {name!r} is not a numpy dtype: use e.g. int64, "
                                   "int32, float32") from None
    return out


class _Base:
    framework: Framework
    path: Path | None = None
    sha256: str | None = None
    input_names: list[str]
    input_shapes: list[list[int]]
    output_names: list[str]
    input_dtypes: list[str]
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

    def __init__(self, model: Any, input_shapes: list[list[int]], path: Path | None = None, kind: str = "module",
                 input_names: list[str] | None = None, input_dtypes: InputDtypes | None = None):
        self.model = model
        self.path = path
        self.sha256 = sha256_path(path) if path else None
        self.kind = kind
        self.input_shapes = input_shapes
        self.input_names = input_names or (["input"] if len(input_shapes) == 1
                                           else [f"input_{i}" for i in range(len(input_shapes))])
        self.input_dtypes = _dtypes(input_dtypes, self.input_names)
        self.layout = _guess_layout(input_shapes[0]) if self.input_dtypes[0].startswith("float") else ""
        outs = self.predict([np.zeros(s, dt) for s, dt in zip(input_shapes, self.input_dtypes, strict=True)])
        self.output_names = _output_names(self._raw_out) or (
            ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])

    def example_inputs(self) -> tuple[Any, ...]:
        """Zero tensors of the input shapes."""
        torch = require("torch", "torch")
        return tuple(torch.from_numpy(np.zeros(s, dt)) for s, dt in zip(self.input_shapes, self.input_dtypes,
                                                                         strict=True))

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model (no grad) and return numpy outputs, flattened from tuples/lists/dicts."""
        torch = require("torch", "torch")
        with torch.no_grad():
            try:
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(x, dt))
                                   for x, dt in zip(inputs, self.input_dtypes, strict=True)])
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shapes = [list(x.shape) for x in inputs]
                first = str(exc).strip().splitlines()[0][:200]
                raise SourceModelError(f"the PyTorch model rejects inputs of shape {shapes} ({first}): "
                                       "pass the --input-shape the model was built for") from None
        self._raw_out = out
        return [t.detach().cpu().numpy() for t in _flatten(out)]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["kind"] = self.kind
        return d


def _output_names(out: Any, prefix: str = "") -> list[str] | None:
    """Names for outputs returned as a dict (its keys, nested keys joined with '.'); None otherwise."""
    if not isinstance(out, dict):
        return None
    names: list[str] = []
    for k, v in out.items():
        sub = _output_names(v, f"{prefix}{k}.")
        if sub is not None:
            names += sub
        elif isinstance(v, (list, tuple)):
            names += [f"{prefix}{k}_{i}" for i in range(len(_flatten(v)))]
        else:
            names.append(f"{prefix}{k}")
    return names


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
        self.input_dtypes = _dtypes(None, self.input_names, [np.dtype(d).name if d != "string" else d for d in dts])
        self.layout = _guess_layout(input_shapes[0]) if self.input_dtypes[0].startswith("float") else ""

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
            if type(self.model).__module__.startswith("tf_keras"):  # a legacy Keras 2 model (see _load_keras)
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
    """An ONNX file, run with ONNX Runtime for reference outputs.

    Symbolic input axes are pinned to ``input_shape`` (batch alone defaults to 1) in a copy
    (``self.model``) that every converter reads; ``dynamic`` names axes the ONNX / OpenVINO artifacts keep
    symbolic (``self.dynamic_model``). ``self.path`` stays the user's file (its name and sha256 go in the
    manifest).
    """

    framework = Framework.ONNX

    def __init__(self, path: Path, input_shape: ShapeSpec | None = None, dynamic: Sequence[str] = (),
                 input_dtypes: InputDtypes | None = None) -> None:
        onnx = require("onnx", "onnx", "reading ONNX models")
        from google.protobuf.message import DecodeError

        from edge_sdk.converters.onnx_shapes import input_dims, pin_onnx, resolve_dynamic_axes

        self.path = self.model = self.dynamic_model = path
        self._tmp: Path | None = None
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
        inputs = input_dims(proto)
        self.input_names = [n for n, _, _ in inputs]
        # sequence / map outputs (ONNX-ML ZipMap "probabilities") are not tensors: no target or check uses them
        self.output_names = [o.name for o in proto.graph.output if o.type.HasField("tensor_type")]
        self.dropped_outputs = [o.name for o in proto.graph.output if not o.type.HasField("tensor_type")]
        _check_names(input_shape, self.input_names, "--input-shape")
        helper = onnx.helper
        self.input_dtypes = _dtypes(input_dtypes, self.input_names,
                                    [np.dtype(helper.tensor_dtype_to_np_dtype(t)).name if t else "float32"
                                     for _, _, t in inputs])
        shapes, symbolic = [], False
        for k, (name, dims, _) in enumerate(inputs):
            given = _given(input_shape, k, name)
            if given is not None:
                if len(given) != len(dims) or any(isinstance(d, int) and d != g
                                                  for d, g in zip(dims, given, strict=True)):
                    raise SourceModelError(f"--input-shape {given} does not fit the ONNX input {name!r} "
                                           f"{[d if isinstance(d, int) else '?' for d in dims]}: pass a shape "
                                           "that matches the model")
                dims_out = given
            else:
                dims_out = [d if isinstance(d, int) else None for d in dims]
                if dims_out and dims_out[0] is None:
                    dims_out[0] = 1
                if any(d is None for d in dims_out):
                    shown = [d if isinstance(d, int) else (d or "?") for d in dims]
                    raise SourceModelError(f"ONNX input {name!r} has dynamic dimensions {shown}: pass --input-shape "
                                           f"{name}={','.join(str(d) if isinstance(d, int) else 'N' for d in dims)}"
                                           " with concrete sizes")
            symbolic = symbolic or any(not isinstance(d, int) for d in dims)
            shapes.append([int(d) for d in dims_out])
        self.input_shapes = shapes
        self.layout = _guess_layout(shapes[0]) if shapes and self.input_dtypes[0].startswith("float") else ""
        self.pin_notes: list[str] = []
        if symbolic:
            self._tmp = Path(tempfile.mkdtemp(prefix="edge_sdk_onnx_"))
            pinned = self._tmp / path.name
            by_name = dict(zip(self.input_names, shapes, strict=True))
            try:
                self.pin_notes = pin_onnx(path, pinned, by_name)
                self.model = self.dynamic_model = pinned
                keep = {n: resolve_dynamic_axes(dynamic, s, self.layout) for n, s in by_name.items()} if dynamic else {}
                if any(keep.values()):
                    self.dynamic_model = self._tmp / f"dynamic_{path.name}"
                    pin_onnx(path, self.dynamic_model, by_name, keep)
            except (ValueError, OSError, DecodeError) as exc:
                raise SourceModelError(f"could not pin the input shapes of {path.name} "
                                       f"({str(exc).splitlines()[0][:160]}): re-export it with static shapes") from None
        self._session: Any = None

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run with ONNX Runtime (CPU, fp32) on the pinned model."""
        if self._session is None:
            ort = require("onnxruntime", "onnx", "running the ONNX source")
            try:
                self._session = ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own non-Python-standard types
                raise SourceModelError(f"ONNX Runtime cannot load {self.path.name} "
                                       f"({str(exc).strip().splitlines()[0][:200]}): the source must run in "
                                       "ONNX Runtime to be the reference") from None
        feeds = {n: np.ascontiguousarray(x, dt) for n, x, dt in zip(self.input_names, inputs, self.input_dtypes,
                                                                     strict=True)}
        try:
            return list(self._session.run(self.output_names, feeds))
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument derive from RuntimeError only
            shapes = [list(x.shape) for x in inputs]
            raise SourceModelError(f"the ONNX model rejects inputs of shape {shapes} "
                                   f"({str(exc).strip().splitlines()[0][:200]}): pass the --input-shape the "
                                   "model was built for") from None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


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


def _torch_shapes(input_shape: ShapeSpec | None, what: str) -> tuple[list[list[int]], list[str] | None]:
    """Shapes (and names, for a mapping) of a PyTorch source's inputs; they cannot be read from the file."""
    if input_shape is None:
        raise SourceModelError(f"{what} sources need --input-shape (e.g. 1,3,224,224; for several inputs "
                               "--input-shape input_ids=1,128 --input-shape attention_mask=1,128)")
    if isinstance(input_shape, Mapping):
        return [_check_shape(v) for v in input_shape.values()], [str(k) for k in input_shape]
    return [_check_shape(input_shape)], None


def _load_torch_file(path: Path, input_shape: ShapeSpec | None, model_class: str | None,
                     input_dtypes: InputDtypes | None = None) -> TorchSource:
    torch = require("torch", "torch", "loading PyTorch models")
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise SourceModelError(f"{path} is not a readable torch.export program ({str(exc)[:120]}): "
                                   "re-save it with torch.export.save") from None
        shapes, names = ([[int(d) for d in t.shape] for t in _flatten(program.example_inputs[0])], None)
        if input_shape is not None:
            shapes, names = _torch_shapes(input_shape, "torch.export")
        dts = input_dtypes or [str(t.dtype).replace("torch.", "") for t in _flatten(program.example_inputs[0])]
        return TorchSource(program.module(), shapes, path, "export", names, dts)
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
            shapes, names = _torch_shapes(input_shape, "TorchScript")
            return TorchSource(module.eval(), shapes, path, "torchscript", names, input_dtypes)
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
    shapes, names = _torch_shapes(input_shape, "state_dict")
    return TorchSource(module.eval(), shapes, path, "state_dict", names, input_dtypes)


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
    _check_names(input_shape, names, "--input-shape")
    shapes = []
    for k, name in enumerate(names):
        dims = list(kwargs[name].shape)
        given = _given(input_shape, k, name)
        if given is not None:
            if len(given) != len(dims) or any(d not in (None, g) for d, g in zip(dims, given, strict=True)):
                raise SourceModelError(f"--input-shape {given} does not fit the SavedModel input {name!r} {dims}")
            dims = given
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            raise SourceModelError(f"SavedModel input {name!r} has dynamic dimensions {dims}: pass --input-shape "
                                   f"{name}=...")
        shapes.append([int(d) for d in dims])
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


def _load_keras(path: Path | None, model: Any, input_shape: ShapeSpec | None,
                custom_objects: Sequence[str] | Mapping[str, Any] | None = None) -> KerasSource:
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
                return _load_keras(path, legacy, input_shape)
            first = first_line(exc, 160)
            hint = ("if it uses custom layers, pass --custom-objects module:ClassName" if
                    any(w in str(exc) for w in ("Unknown", "custom", "not found", "Could not locate"))
                    else "the file may be truncated or corrupt")
            raise SourceModelError(f"{path} is not a loadable Keras model ({first}): {hint}") from None
    names = [t.name.split(":")[0] for t in model.inputs]
    _check_names(input_shape, names, "--input-shape")
    shapes = []
    for k, t in enumerate(model.inputs):
        dims = list(t.shape)
        given = _given(input_shape, k, names[k])
        if given is not None:
            if len(given) != len(dims) or any(d not in (None, g) for d, g in zip(dims, given, strict=True)):
                raise SourceModelError(f"--input-shape {given} does not fit the Keras input "
                                       f"{['?' if d is None else d for d in dims]}: pass a matching shape")
            dims = given
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            raise SourceModelError(f"Keras input {t.name!r} has dynamic dimensions {dims}: pass --input-shape")
        shapes.append([int(d) for d in dims])
    return KerasSource(model, shapes, path)


def _no_dynamic(dynamic: Sequence[str], what: str) -> None:
    if dynamic:
        raise SourceModelError(f"--dynamic applies to ONNX and PyTorch sources, not {what}: the artifacts keep the "
                               "static --input-shape")


def _with_dynamic(src: TorchSource, dynamic: Sequence[str]) -> TorchSource:
    """Record the axes ``--dynamic`` names (the ONNX export keeps them symbolic; static tools get them pinned)."""
    from edge_sdk.converters.onnx_shapes import resolve_dynamic_axes

    src.dynamic_axes = {n: resolve_dynamic_axes(dynamic, s, src.layout)
                        for n, s in zip(src.input_names, src.input_shapes, strict=True)} if dynamic else {}
    return src


def load_source(source: Any, *, input_shape: ShapeSpec | None = None, model_class: str | None = None,
                framework: str | None = None, input_dtypes: InputDtypes | None = None,
                custom_objects: Sequence[str] | Mapping[str, Any] | None = None,
                dynamic: Sequence[str] = ()) -> Any:
    """Load any supported source into a SourceModel; raise SourceModelError with a fix on failure."""
    if not isinstance(source, (str, Path)):
        mod = type(source).__module__
        if "torch" in sys.modules and isinstance(source, sys.modules["torch"].nn.Module):
            shapes, names = _torch_shapes(input_shape, "an nn.Module")
            return _with_dynamic(TorchSource(source.eval(), shapes, None, "module", names, input_dtypes), dynamic)
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
                         else "keras" if suffix in _KERAS_SUFFIXES
                         else "tflite" if suffix == ".tflite" else "openvino" if suffix == ".xml" else None)
    if kind == "onnx":
        return OnnxSource(path, input_shape, dynamic, input_dtypes)
    if kind == "pytorch":
        return _with_dynamic(_load_torch_file(path, input_shape, model_class, input_dtypes), dynamic)
    if kind == "keras":
        _no_dynamic(dynamic, "Keras")
        return _load_keras(path, None, input_shape, custom_objects)
    if kind in ("tflite", "openvino"):
        _no_dynamic(dynamic, "an existing .tflite / IR")
        from edge_sdk.converters.prebuilt import load_prebuilt

        return load_prebuilt(path, input_shape, framework=kind)
    raise SourceModelError(f"cannot tell the framework of {path.name}: use .onnx, .pt/.pth/.pt2, .keras/.h5, "
                           ".tflite, an OpenVINO .xml or a SavedModel directory (or pass --framework)")
