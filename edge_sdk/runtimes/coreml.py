"""Core ML (``.mlpackage``) through coremltools' ``MLModel.predict`` — macOS only.

Core ML itself ships with macOS / iOS; coremltools can read a package's spec anywhere but can only
run it on macOS. On other hosts :meth:`CoreMLRuntime.is_available` is False and :meth:`load` raises
an InferenceError that points at the bundle's portable artifacts. Core ML picks its own threads and
compute units (CPU / GPU / Neural Engine), so ``threads`` is accepted and ignored.

Image models are converted with an ``ImageType`` input (so Vision can feed camera frames): Core ML itself then
computes ``pixel * scale + bias`` per channel as the program's first ops. The agent still hands this runtime the
tensor the manifest's preprocessing made; :class:`ImageInput` turns it back into the exact 8-bit image (the
tensor came from 8-bit pixels, so the inversion is exact and refused when it is not), and Core ML's own
normalisation then gives the agent and Vision the same input. Classifier packages also output ``classLabel``
and a probability dictionary for Vision; the session returns only the tensor outputs, as for any runtime.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, installed_version, require
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, first_line
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import check_inputs, run_failed

__all__ = ["INPUTS_KEY", "RUNTIME", "CoreMLRuntime", "CoreMLSession", "ImageInput", "image_inputs", "package_io"]

# FeatureTypes.proto ArrayFeatureType.ArrayDataType
_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}
# FeatureTypes.proto ImageFeatureType.ColorSpace
_COLOR_SPACES = {10: "GRAY", 20: "RGB", 30: "BGR", 40: "GRAY"}  # 40: GRAYSCALE_FLOAT16
INPUTS_KEY = "edge_sdk.inputs"  # userDefined metadata: {name: {"layout": "NCHW", "shape": [...]}} of image inputs
_MAX_PIXEL_ERROR = 0.05  # a tensor further than this (in 8-bit levels) from an image was not made from one


@dataclass(frozen=True)
class ImageInput:
    """An ``ImageType`` input as Core ML runs it: ``tensor = pixel * scale + bias`` per channel, in ``color`` order.

    ``shape`` / ``layout`` are those of the tensor the agent feeds (the source model's input).
    """

    name: str
    color: str  # RGB | BGR | GRAY: the channel order of the tensor (Core ML reorders the image's pixels to it)
    height: int
    width: int
    scale: tuple[float, ...]  # one per channel (Core ML's single scale, or the per-channel first op)
    bias: tuple[float, ...]
    layout: str = "NCHW"

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    @property
    def shape(self) -> list[int]:
        c, h, w = self.channels, self.height, self.width
        return [1, c, h, w] if self.layout == "NCHW" else [1, h, w, c]

    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """What Core ML computes from an 8-bit image (H, W, C in ``color`` order): the model's input tensor."""
        x = pixels.astype(np.float32).reshape(self.height, self.width, self.channels)
        x = x * np.asarray(self.scale, np.float32) + np.asarray(self.bias, np.float32)
        return (x.transpose(2, 0, 1) if self.layout == "NCHW" else x)[None]

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """The 8-bit image (H, W, C in ``color`` order) a preprocessed tensor was made from; InputError if none."""
        a = np.asarray(x, np.float64).reshape(self.shape)[0]
        hwc = a.transpose(1, 2, 0) if self.layout == "NCHW" else a
        pix = (hwc - np.asarray(self.bias)) / np.asarray(self.scale)
        rounded = np.rint(pix)
        off = float(np.abs(pix - rounded).max()) if pix.size else 0.0
        if off > _MAX_PIXEL_ERROR or rounded.min() < 0 or rounded.max() > 255:
            raise InputError(f"input {self.name!r} of this Core ML package is an image: the tensor was not made "
                             "from an 8-bit image by the manifest's preprocessing (off by "
                             f"{off:.2f} levels); feed images through Preprocessing.apply")
        return rounded.astype(np.uint8)

    def to_image(self, x: np.ndarray) -> Any:
        """The Pillow image ``MLModel.predict`` takes for this input (RGB or L; Core ML applies the order)."""
        pil = require("PIL.Image", "agent", "feeding Core ML image inputs")
        pix = self.to_pixels(x)
        if self.color == "GRAY":
            return pil.fromarray(pix[:, :, 0], mode="L")
        return pil.fromarray(np.ascontiguousarray(pix[:, :, ::-1] if self.color == "BGR" else pix), mode="RGB")


def _const(block: Any, op: Any, key: str) -> list[float] | None:
    """Float values of an op's argument ``key``: an inline value or a ``const`` op of the block."""
    if key not in op.inputs or not op.inputs[key].arguments:
        return None
    arg = op.inputs[key].arguments[0]
    if arg.WhichOneof("binding") == "value":
        value = arg.value
    else:
        src = next((o for o in block.operations if o.type == "const" and o.outputs[0].name == arg.name), None)
        if src is None:
            return None
        value = src.attributes["val"]
    tensor = value.immediateValue.tensor
    if tensor.WhichOneof("value") == "floats":
        return [float(v) for v in tensor.floats.values]
    if tensor.WhichOneof("value") == "bytes":  # fp16 constants are stored as raw bytes
        return [float(v) for v in np.frombuffer(tensor.bytes.values, np.float16)]
    return None


def _batch_norm(block: Any, op: Any) -> tuple[list[float], list[float]]:
    """Per-channel (scale, bias) of a ``batch_norm`` op: coremltools' ``fuse_elementwise_to_batchnorm`` pass turns
    the image ``mul`` / ``add`` into one when a saved package is re-exported (compressing it does), and Core ML then
    computes (x - mean) / sqrt(variance + epsilon) * gamma + beta."""
    gamma, beta = _const(block, op, "gamma") or [1.0], _const(block, op, "beta") or [0.0]
    mean, var = _const(block, op, "mean") or [0.0], _const(block, op, "variance") or [1.0]
    eps = (_const(block, op, "epsilon") or [1e-5])[0]
    n = max(len(gamma), len(beta), len(mean), len(var))
    g, b, m, v = (np.broadcast_to(np.asarray(a, np.float64), (n,)) for a in (gamma, beta, mean, var))
    scale = g / np.sqrt(v + eps)
    return [float(x) for x in scale], [float(x) for x in b - m * scale]


def image_inputs(spec: Any) -> dict[str, ImageInput]:
    """The ``ImageType`` inputs of a package spec, with the scale / bias ops Core ML runs on them."""
    layouts = json.loads(spec.description.metadata.userDefined.get(INPUTS_KEY) or "{}")
    ops: dict[str, Any] = {}
    block = None
    if spec.WhichOneof("Type") == "mlProgram" and "main" in spec.mlProgram.functions:
        func = spec.mlProgram.functions["main"]
        block = func.block_specializations[func.opset]
        ops = {o.outputs[0].name: o for o in block.operations if o.outputs}
    out = {}
    for f in spec.description.input:
        if f.type.WhichOneof("Type") != "imageType":
            continue
        img = f.type.imageType
        color = _COLOR_SPACES.get(img.colorSpace, "RGB")
        n = 1 if color == "GRAY" else 3
        scaled, biased = ops.get(f"{f.name}__scaled__"), ops.get(f"{f.name}__biased__")
        if biased is not None and biased.type == "batch_norm":
            scale, bias = _batch_norm(block, biased)
        else:
            scale = (_const(block, scaled, "y") if scaled is not None else None) or [1.0]
            bias = (_const(block, biased, "y") if biased is not None else None) or [0.0]
        out[f.name] = ImageInput(f.name, color, int(img.height), int(img.width),
                                 tuple(scale * n if len(scale) == 1 else scale),
                                 tuple(bias * n if len(bias) == 1 else bias),
                                 str(layouts.get(f.name, {}).get("layout", "NCHW")))
    return out


def _specs(features: Any, images: dict[str, ImageInput] | None = None) -> list[TensorSpec]:
    """Tensor specs of the features: image inputs as the tensor the agent feeds; a classifier's label and
    probability-dictionary outputs (for Vision) are left out when ``images`` is None (outputs)."""
    out = []
    for f in features:
        kind = f.type.WhichOneof("Type")
        if images is not None and f.name in images:
            out.append(TensorSpec(name=f.name, shape=images[f.name].shape, dtype="float32"))
            continue
        if images is None and kind in ("stringType", "int64Type", "dictionaryType"):
            continue
        if kind != "multiArrayType":
            raise InferenceError(f"Core ML feature {f.name!r} is a {kind}, not a tensor: only multi-array and "
                                 "image inputs and multi-array outputs are supported; re-convert with edge_sdk")
        arr = f.type.multiArrayType
        out.append(TensorSpec(name=f.name, shape=[int(s) for s in arr.shape],
                              dtype=_ARRAY_DTYPES.get(arr.dataType, str(arr.dataType))))
    return out


def _load_errors() -> tuple[type[BaseException], ...]:
    from google.protobuf.message import DecodeError  # protobuf is a coremltools dependency

    return (RuntimeError, OSError, ValueError, DecodeError)


def _load_spec(path: Path) -> Any:
    """The package's protobuf spec (readable on any OS), or a one-line InferenceError."""
    ct = require("coremltools", "coreml", "reading Core ML packages")
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise InferenceError(f"{path} is not a Core ML package (no Manifest.json): re-copy the bundle")
    try:
        spec = ct.utils.load_spec(str(path))
    except _load_errors() as exc:
        raise InferenceError(f"cannot read Core ML package {path.name} ({first_line(exc)}): the package may be "
                             "truncated or corrupt; re-copy the bundle") from None
    return spec


def package_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a ``.mlpackage`` read from its spec (works on any OS with coremltools)."""
    spec = _load_spec(Path(path))
    return _specs(spec.description.input, image_inputs(spec)), _specs(spec.description.output)


class CoreMLSession:
    """A compiled Core ML model (macOS), run with ``MLModel.predict``."""

    def __init__(self, model: Any, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 images: dict[str, ImageInput] | None = None) -> None:
        self._model = model
        self._images = images or {}
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        self._in_names = [s.name for s in inputs]
        self._out_names = [s.name for s in outputs]
        self._in_dtypes = [np.dtype(s.dtype) for s in inputs]

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run one batch; returns outputs in spec order (float32 unless ``raw``)."""
        if self._model is None:
            raise InferenceError(f"session for {self.path.name} is closed: load the model again")
        check_inputs(inputs, self.inputs)
        feed = {}
        for name, want, x in zip(self._in_names, self._in_dtypes, inputs, strict=True):
            if name in self._images:  # an ImageType input: the image the tensor was made from
                feed[name] = self._images[name].to_image(x)
                continue
            if x.dtype != want:
                if x.dtype.kind not in "fiu":
                    raise InputError(f"input {name!r} has dtype {x.dtype}, the model expects {want}: "
                                     "pass a numeric array")
                x = x.astype(want)
            feed[name] = np.ascontiguousarray(x)
        try:
            result = self._model.predict(feed)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise run_failed("Core ML", self.path, exc) from None
        outs = [np.asarray(result[n]) for n in self._out_names]
        return outs if raw else [o.astype(np.float32, copy=False) for o in outs]

    def close(self) -> None:
        """Release the model."""
        self._model = None


class CoreMLRuntime:
    """Core ML through coremltools (macOS only; compute units ALL: CPU, GPU and Neural Engine)."""

    name = "coreml"
    formats = (Format.COREML,)
    extra = "coreml"
    rank = 40
    bench_modules = ("coremltools",)
    plot_markers = (("coreml", "P"),)  # (format, matplotlib marker)

    def is_available(self) -> bool:
        """True on macOS when coremltools can be imported (checked without importing it)."""
        return sys.platform == "darwin" and has_module("coremltools")

    def version(self) -> str | None:
        """The installed coremltools version, or None."""
        return installed_version("coremltools")

    def load(self, path: Path, *, threads: int | None = None) -> CoreMLSession:
        """Compile and load a ``.mlpackage``; off macOS raise an InferenceError naming the alternatives."""
        path = Path(path)
        if sys.platform != "darwin":
            raise InferenceError(f"Core ML runs only on macOS/iOS: cannot run {path.name} on {sys.platform}; "
                                 "use the tflite/onnx/openvino artifact on this host")
        ct = require("coremltools", self.extra, "running Core ML models")
        if not path.exists():
            raise InferenceError(f"model package {path} does not exist: check the bundle path")
        spec = _load_spec(path)
        images = image_inputs(spec)
        inputs, outputs = _specs(spec.description.input, images), _specs(spec.description.output)
        try:
            model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
        except _load_errors() as exc:
            raise InferenceError(f"Core ML cannot load {path.name} ({first_line(exc)}): the package may be "
                                 "truncated or corrupt, or need a newer macOS") from None
        return CoreMLSession(model, path, inputs, outputs, images)


RUNTIME = CoreMLRuntime()
