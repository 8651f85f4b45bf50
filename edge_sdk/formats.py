"""Enumerations shared by converters, bundles and runtimes."""

from __future__ import annotations

from enum import Enum

__all__ = ["Format", "Framework", "Precision", "Task", "parse_list"]


class _Choice(str, Enum):  # noqa: UP042 (StrEnum is 3.11+)
    """A str-valued choice; ``str()`` and f-strings give the value (as ``enum.StrEnum`` does on 3.11+).

    Not ``StrEnum`` itself: that is 3.11+, and the device side runs on 3.10 (Jetson, Ubuntu 22.04).
    """

    @classmethod
    def parse(cls, value: str) -> _Choice:
        """Parse a user-given name; unknown names raise a ValueError listing the choices."""
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls.__name__.lower()} {value!r}: choose from {choices}") from None

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Format(_Choice):
    """Artifact formats. ``ort`` is produced by the ``onnx`` target alongside the .onnx file.

    A new format is a member here plus the same name in the manifest schema's ``format`` enum; the converters that
    produce it and the runtimes that run it declare it themselves (``target`` / ``formats``) and register through
    their registries (entry points for third-party packages). tests/test_registries.py checks that all of these
    agree: every format has a converter, a runtime and a plot marker.
    """

    TFLITE = "tflite"
    COREML = "coreml"
    OPENVINO = "openvino"
    ONNX = "onnx"
    ORT = "ort"
    WEB = "web"  # a folder: ONNX model + predict.js + demo page + vendored ONNX Runtime Web (WASM)


class Precision(_Choice):
    """Numeric precisions.

    ``int8`` means, per target: TFLite full-integer with int8 inputs/outputs; ONNX static QDQ
    (per-channel weights, uint8 activations); OpenVINO NNCF post-training quantization;
    Core ML int8 linear weight quantization. ``dynamic`` is dynamic-range (weights int8,
    activations quantized at run time). ``palettized`` is Core ML k-means weight palettization.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    DYNAMIC = "dynamic"
    INT8 = "int8"
    PALETTIZED = "palettized"


class Framework(_Choice):
    """Source model frameworks."""

    PYTORCH = "pytorch"
    KERAS = "keras"
    ONNX = "onnx"
    TFLITE = "tflite"  # an existing .tflite, bundled as it is (validated against itself)
    OPENVINO = "openvino"  # an existing OpenVINO IR (.xml + .bin), bundled as it is


class Task(_Choice):
    """What the model's output means; classifiers get top-k / confidence handling."""

    CLASSIFICATION = "classification"
    OTHER = "other"


def parse_list(text: str, enum: type[_Choice]) -> list:
    """Parse a comma-separated list of enum names, keeping order and dropping duplicates."""
    out: list = []
    for part in text.split(","):
        if part.strip():
            item = enum.parse(part)
            if item not in out:
                out.append(item)
    if not out:
        raise ValueError(f"empty {enum.__name__.lower()} list: give at least one of "
                         + ", ".join(m.value for m in enum))
    return out
