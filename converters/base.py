"""The converter protocol, the registry keyed by (source framework, target format), and the context
every converter receives.

A converter module registers itself at import time::

    @register
    class OnnxToOpenVINO:
        sources = (Framework.PYTORCH, Framework.KERAS, Framework.ONNX)
        target = Format.OPENVINO
        precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
        def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]: ...

Heavy frameworks are imported inside ``convert``, never at module top.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edge_sdk.calibration import SampleSet
from edge_sdk.errors import CalibrationError, ConversionError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = [
    "ArtifactDraft",
    "ConversionContext",
    "ConvertOptions",
    "Converter",
    "SourceModel",
    "get_converter",
    "register",
    "registered",
]


@dataclass(frozen=True)
class ConvertOptions:
    """Per-target options. Defaults are what a careful user would choose on a typical device."""

    calib_limit: int = 200
    onnx_opset: int = 18
    onnx_activation_type: str = "uint8"  # uint8 activations were measured faster than int8 on x86 ORT
    onnx_per_channel: bool = True
    ort_target_platform: str = "amd64"  # "arm" for phones / Pi; "amd64" keeps x86 speed
    coreml_minimum_deployment_target: str = "iOS16"
    coreml_palette_bits: int = 6
    tflite_int8_io: bool = True  # full-integer models take and return int8 (Edge TPU / MCU NPUs)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SourceModel(Protocol):
    """A loaded source model, whatever its framework."""

    framework: Framework
    path: Path | None
    model: Any
    input_names: list[str]
    input_shapes: list[list[int]]
    output_names: list[str]
    layout: str  # "NCHW" for PyTorch-style image inputs, "NHWC" for Keras-style, "" when not an image
    input_dtypes: list[str]  # numpy dtype name per input ("float32", or "int64" for token ids and masks)

    def predict(self, inputs: list[Any]) -> list[Any]:
        """Run the source model on batch-1 float32 numpy inputs; return numpy outputs."""
        ...


@dataclass
class ArtifactDraft:
    """What a converter produced, before it is hashed, validated and placed in the bundle."""

    format: Format
    precision: Precision
    path: Path
    tool_versions: dict[str, str] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_layout: str | None = None  # set when the artifact's input layout differs from the source's
    validation_skipped: str | None = None  # numeric validation impossible on this host, and why
    spec_checks: dict[str, Any] = field(default_factory=dict)  # structural checks done instead
    files: list[Path] = field(default_factory=list)  # side files (e.g. required_operators.config)
    route: str = ""  # the route (converters/routes.py) that produced it; set by the pipeline


class ConversionContext:
    """What a converter gets: the source, calibration samples, options and a work directory.

    Intermediate ONNX files are produced once per precision and shared by every converter that needs
    them (OpenVINO, ORT format) through :meth:`onnx`.
    """

    def __init__(self, source: SourceModel, workdir: Path, *, calibration: SampleSet | None = None,
                 options: ConvertOptions | None = None) -> None:
        self.source = source
        self.workdir = Path(workdir)
        self.calibration = calibration
        self.options = options or ConvertOptions()
        self._onnx: dict[Precision, ArtifactDraft] = {}
        self._onnx_errors: dict[Precision, Exception] = {}
        self.derived: dict[Any, ConversionContext] = {}  # contexts of other routes (via ONNX, other options)
        self.owns_source = True  # False for a context sharing its parent's source

    def close(self) -> None:
        """Close the sources of derived contexts (their temporary files); the parent's source is the caller's."""
        for sub in self.derived.values():
            sub.close()
            close = getattr(sub.source, "close", None)
            if close is not None and sub.owns_source:
                close()
        self.derived.clear()

    def require_calibration(self, purpose: str) -> SampleSet:
        """The calibration samples, or a CalibrationError saying how to provide them."""
        if self.calibration is None or len(self.calibration) == 0:
            raise CalibrationError(f"{purpose} needs calibration data: pass --calib FILE.npy or an image "
                                   "folder (100-500 representative inputs)")
        return self.calibration.take(self.options.calib_limit)

    def path_for(self, fmt: Format, precision: Precision, suffix: str) -> Path:
        """A fresh path in the work directory for an artifact (suffix '' gives a directory name)."""
        d = self.workdir / fmt.value
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{precision.value}{suffix}"

    def onnx(self, precision: Precision = Precision.FP32) -> ArtifactDraft:
        """The ONNX artifact of this precision for the current source, converted once and cached."""
        if precision in self._onnx_errors:  # a failed export is not retried by every target that needs it
            raise self._onnx_errors[precision]
        if precision not in self._onnx:
            try:
                drafts = get_converter(self.source.framework, Format.ONNX).convert(self, precision)
            except Exception as exc:
                self._onnx_errors[precision] = exc
                raise
            self._onnx[precision] = drafts[0]
        return self._onnx[precision]

    def scratch(self, name: str) -> Path:
        """A fresh scratch directory (removed with the work directory)."""
        d = self.workdir / "_scratch" / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d


class Converter(Protocol):
    """Converts one source framework (or several) to one target format."""

    sources: tuple[Framework, ...]
    target: Format
    precisions: tuple[Precision, ...]

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Produce the artifact(s) for ``precision``; raise ConversionError subclasses on failure."""
        ...


_REGISTRY: dict[tuple[Framework, Format], Converter] = {}


def register(cls: type, *, overwrite: bool = False) -> type:
    """Class decorator: instantiate and register a converter for each of its sources."""
    inst = cls()
    for src in inst.sources:
        key = (src, inst.target)
        if key in _REGISTRY and not overwrite and type(_REGISTRY[key]) is not cls:
            raise ConversionError(f"a converter for {src.value} -> {inst.target.value} is already registered "
                                  f"({type(_REGISTRY[key]).__name__}); pass overwrite=True to replace it")
        _REGISTRY[key] = inst
    return cls


def registered() -> dict[tuple[Framework, Format], Converter]:
    """A copy of the registry (importing edge_sdk.converters fills it)."""
    return dict(_REGISTRY)


def get_converter(source: Framework, target: Format) -> Converter:
    """The converter for (source, target), or UnsupportedConversionError naming what exists."""
    try:
        return _REGISTRY[(source, target)]
    except KeyError:
        have = sorted(t.value for (s, t) in _REGISTRY if s == source)
        raise UnsupportedConversionError(
            f"no converter from {source.value} to {target.value}: {source.value} sources convert to "
            f"{', '.join(have) or 'nothing registered'}; register one with edge_sdk.converters.register"
        ) from None


def check_precision(conv: Converter, precision: Precision) -> None:
    """Raise UnsupportedConversionError if the converter cannot produce ``precision``."""
    if precision not in conv.precisions:
        raise UnsupportedConversionError(
            f"{conv.target.value} cannot be produced in {precision.value}: choose from "
            + ", ".join(p.value for p in conv.precisions))
