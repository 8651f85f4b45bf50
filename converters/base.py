"""The converter protocol with its capabilities, and the context every converter receives.

A converter module registers itself at import time (the registry is converters/registry.py)::

    @register
    class OnnxToOpenVINO:
        sources = (Framework.PYTORCH, Framework.KERAS, Framework.ONNX)
        target = Format.OPENVINO
        precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
        calibrated_precisions = (Precision.INT8,)        # precisions that need --calib data
        budget_ladder = (LadderStep("calibration:mean-quantile", ...), LadderStep("mixed", mixed="openvino"), ...)
        extra_options = (OptionSpec("openvino_preset", str, "mixed", ("mixed", "performance")), ...)
        def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]: ...

The capability attributes are optional (:func:`needs_calibration`, :func:`budget_ladder_of`,
:func:`extra_options_of` supply the defaults), so a minimal plugin converter needs only the first four.
Heavy frameworks are imported inside ``convert``, never at module top.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edge_sdk.calibration import SampleSet
from edge_sdk.converters.registry import get_converter, register, registered
from edge_sdk.errors import CalibrationError, ConversionError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = [
    "ArtifactDraft",
    "ConversionContext",
    "ConvertOptions",
    "Converter",
    "LadderStep",
    "OptionSpec",
    "SourceModel",
    "budget_ladder_of",
    "check_options",
    "check_precision",
    "extra_options_of",
    "get_converter",
    "needs_calibration",
    "produce",
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

    def adopt(self, draft: ArtifactDraft) -> None:
        """Make ``draft`` this context's ONNX export of its precision (the accuracy budget kept it), so formats
        derived from ONNX (the .ort file) are made from it; drafts of other formats are not cached."""
        if draft.format is Format.ONNX:
            self._onnx[draft.precision] = draft

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


@dataclass(frozen=True)
class LadderStep:
    """One rung of the accuracy-budget fallback ladder a converter offers (converters/accuracy_budget.py runs it).

    ``options``: ConvertOptions fields / ``extra`` entries the rung sets; ``precision``: what it produces (fp16
    for the last rung); ``mixed``: a recipe name ("onnx" | "openvino" | "tflite") that expands the rung into
    ``mixed:kN`` rungs keeping the N most sensitive layers in float; ``not_offered``: why the rung does not apply
    (reported, not tried); ``unless``: ``extra`` values that make the rung pointless (it is skipped); ``qat``: the rung
    converts a quantization-aware fine-tuned copy of a PyTorch source (converters/qat.py) instead of the source;
    ``best_calibration``: the rung also takes the options of the ``calibration:*`` rung that measured best before
    it (none when plain int8 measured better).
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    precision: Precision = Precision.INT8
    mixed: str = ""
    not_offered: str = ""
    unless: tuple[tuple[str, Any], ...] = ()
    qat: bool = False
    best_calibration: bool = False


@dataclass(frozen=True)
class OptionSpec:
    """A ``ConvertOptions.extra`` key a converter reads: its type, default and allowed values (checked by
    :func:`check_options` before any conversion runs, so a typo is a one-line error, not a silently ignored key)."""

    name: str
    type: type | tuple[type, ...]
    default: Any = None
    choices: tuple[Any, ...] = ()
    help: str = ""


class Converter(Protocol):
    """Converts one source framework (or several) to one target format.

    Optional capabilities (read with defaults): ``calibrated_precisions`` (precisions needing calibration data;
    default int8), ``budget_ladder`` (:class:`LadderStep` rungs; default none: judged without fallback),
    ``extra_options`` (:class:`OptionSpec` of the ``ConvertOptions.extra`` keys it reads).
    """

    sources: tuple[Framework, ...]
    target: Format
    precisions: tuple[Precision, ...]

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Produce the artifact(s) for ``precision``; raise ConversionError subclasses on failure."""
        ...


def check_precision(conv: Converter, precision: Precision) -> None:
    """Raise UnsupportedConversionError if the converter cannot produce ``precision``."""
    if precision not in conv.precisions:
        raise UnsupportedConversionError(
            f"{conv.target.value} cannot be produced in {precision.value}: choose from "
            + ", ".join(p.value for p in conv.precisions))


def produce(ctx: ConversionContext, conv: Converter, precision: Precision) -> list[ArtifactDraft]:
    """The drafts ``conv`` makes in ``ctx``. ONNX, the format other targets are derived from, goes through
    ``ctx.onnx`` so each precision is exported once per context and shared."""
    if conv.target is Format.ONNX:
        return [ctx.onnx(precision)]
    return conv.convert(ctx, precision)


def needs_calibration(conv: Converter, precision: Precision) -> bool:
    """Does ``conv`` need calibration data for ``precision``? (``calibrated_precisions``, default int8 only)."""
    return precision in getattr(conv, "calibrated_precisions", (Precision.INT8,))


def budget_ladder_of(conv: Converter) -> tuple[LadderStep, ...]:
    """The fallback rungs ``conv`` offers for an int8 artifact over the accuracy budget (none by default)."""
    return tuple(getattr(conv, "budget_ladder", ()))


def extra_options_of(conv: Converter) -> tuple[OptionSpec, ...]:
    """The ``ConvertOptions.extra`` keys ``conv`` reads."""
    return tuple(getattr(conv, "extra_options", ()))


def check_options(options: ConvertOptions, converters: list[Converter]) -> None:
    """Refuse ``options.extra`` keys none of ``converters`` reads, and values of the wrong type or not among the
    declared choices (one line: what is wrong, the valid keys or values)."""
    specs: dict[str, OptionSpec] = {}
    for conv in converters:
        for spec in extra_options_of(conv):
            specs.setdefault(spec.name, spec)
    for key, value in options.extra.items():
        spec = specs.get(key)
        if spec is None:
            raise ConversionError(f"ConvertOptions.extra[{key!r}] is not read by any converter of this "
                                  f"conversion: use one of {', '.join(sorted(specs)) or '(none)'}")
        types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
        want = (*types, int) if float in types else types
        if not isinstance(value, want) or (bool not in types and isinstance(value, bool)):
            raise ConversionError(f"ConvertOptions.extra[{key!r}] must be {' or '.join(t.__name__ for t in types)}"
                                  f", got {type(value).__name__} {value!r}")
        if spec.choices and (value.strip().lower() if isinstance(value, str) else value) not in spec.choices:
            raise ConversionError(f"ConvertOptions.extra[{key!r}] = {value!r} is not supported: choose from "
                                  + ", ".join(map(str, spec.choices)))
